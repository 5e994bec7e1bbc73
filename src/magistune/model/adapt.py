"""LoRA / QLoRA adapters, activation checkpointing, and saving what was trained.

Which modules get LoRA (`lora_target_linear`, `lora_target_modules`):
    lora_target_linear: true     every linear of the language model: q, k, v, o, gate, up, down in each layer
    lora_target_modules: [names] module-name suffixes, as in PEFT. A name that exists in the language model
                                 means the language model's modules only ("q_proj" does not reach Pixtral's
                                 q_proj); a name found only outside it ("lm_head", "multi_modal_projector.linear_1",
                                 "attention.q_proj" for Pixtral) targets it there: you listed it explicitly.
    lora_target_modules: "regex" a PEFT regex (re.fullmatch on the qualified module name), used as given.
Both set: the union. Everything becomes one regex in adapter_config.json, so PeftModel.from_pretrained on the
same base model picks exactly the same modules.

QLoRA: we do not call peft.prepare_model_for_kbit_training. It casts every unquantised parameter to fp32:
for Magistral Small 2509 that is embed_tokens + lm_head (2 x 131072 x 5120 = 1.34B) + Pixtral and projector
(0.44B) + norms = 1.78B params going from 3.6 GB to 7.1 GB, all of them frozen: memory spent for nothing. Its other
two steps we do ourselves: get_peft_model freezes the base model, and `enable_checkpointing` is the
non-reentrant checkpointing we want anyway. The LoRA matrices themselves are fp32 (PEFT's
autocast_adapter_dtype): for r=16 on all 280 linears of the 24B model that is 92M params, 0.37 GB.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model

from magistune.hf_tokenizer import copy_tokenizer_files
from magistune.config import Config
from magistune.model.load import ModelError
from magistune.model.parts import decoder_prefix, in_decoder, vision_parts
from magistune.model.vocab import embedding_module_names, vocab_growth
from magistune.model_files.system_prompt import resolve_system_prompt, write_prompt_file

# Module types LoRA can wrap (bitsandbytes' Linear4bit is an nn.Linear).
LORA_TYPES = (nn.Linear, nn.Embedding, nn.Conv2d)


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing: each decoder layer's activations are recomputed in backward.

    Non-reentrant checkpointing lets gradients reach LoRA weights inside a checkpointed layer even when its
    input does not require grad, so no input-embedding hook is needed (transformers adds one regardless).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _suffix(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def lora_target_regex(model: nn.Module, cfg: Config) -> str:
    """The `target_modules` regex for `model` (see the module docstring); errors if it matches nothing."""
    if not cfg.lora_target_linear and not cfg.lora_target_modules:
        raise ModelError("adapter: set lora_target_linear: true, or lora_target_modules, to say which modules get LoRA")
    prefix = decoder_prefix(model)
    wrappable = [n for n, m in model.named_modules() if isinstance(m, LORA_TYPES)]
    decoder = [n for n in wrappable if in_decoder(n, prefix)]
    lm = re.escape(prefix) + r"\.(?:.*\.)?"  # any module inside the language model
    parts = []
    if cfg.lora_target_linear:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in decoder if isinstance(model.get_submodule(n), nn.Linear)})
        parts.append(lm + "(?:" + "|".join(map(re.escape, leaves)) + ")")
    if isinstance(cfg.lora_target_modules, str):
        parts.append(cfg.lora_target_modules)
    elif cfg.lora_target_modules:
        for entry in cfg.lora_target_modules:
            if any(_suffix(n, entry) for n in decoder):
                parts.append(lm + re.escape(entry))
            elif any(_suffix(n, entry) for n in wrappable):
                parts.append(r"(?:.*\.)?" + re.escape(entry))
            else:
                raise ModelError(f"lora_target_modules: '{entry}' matches no linear module; {_examples(wrappable, prefix)}")
    regex = "|".join(f"(?:{p})" for p in parts)
    matched = [n for n, _ in model.named_modules() if re.fullmatch(regex, n)]
    if not matched:
        raise ModelError(f"lora_target_modules: '{regex}' matches no module; {_examples(wrappable, prefix)}")
    unwrappable = [n for n in matched if n not in set(wrappable)]
    if unwrappable:
        raise ModelError(f"lora_target_modules: matches modules LoRA cannot wrap (not Linear/Embedding/Conv2d): {unwrappable[:5]}")
    return regex


def _examples(names: list[str], prefix: str) -> str:
    inside = [n for n in names if in_decoder(n, prefix)][:7]
    outside = [n for n in names if not in_decoder(n, prefix)][:3]
    return f"modules LoRA can wrap include {inside + outside}"


def vision_modules_to_train(model: nn.Module, cfg: Config) -> list[str]:
    """The vision tower and/or projector names that train_vision_tower / train_projector unfreeze."""
    parts = vision_parts(model)
    wanted = [parts[k] for k, on in (("vision_tower", cfg.train_vision_tower), ("projector", cfg.train_projector)) if on]
    if (cfg.train_vision_tower or cfg.train_projector) and not parts:
        raise ModelError("train_vision_tower / train_projector: this model has no vision tower (not Mistral3)")
    return wanted


def freeze_vision(model: nn.Module, cfg: Config) -> None:
    """Full fine-tuning of Mistral3: the vision tower and projector stay frozen unless the config asks."""
    parts = vision_parts(model)
    unfreeze = set(vision_modules_to_train(model, cfg))
    for name in parts.values():
        if name not in unfreeze:
            for p in model.get_submodule(name).parameters():
                p.requires_grad = False


def grown_embeddings(model: nn.Module) -> list[str]:
    """embed_tokens and lm_head when the model grew to its tokenizer (model/vocab.py): their new rows must train."""
    return embedding_module_names(model) if vocab_growth(model) else []


def apply_lora(model: nn.Module, cfg: Config) -> PeftModel:
    """Wrap `model` in LoRA adapters as cfg says (lora_r, lora_alpha, ...); only the adapters train."""
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,  # the update is (alpha / r) * B @ A, or alpha / sqrt(r) with rslora
        lora_dropout=cfg.lora_dropout,
        use_dora=cfg.peft_use_dora,
        use_rslora=cfg.peft_use_rslora,
        target_modules=lora_target_regex(model, cfg),
        # trained in full, saved with the adapter: the vision parts asked for, a grown vocabulary's embeddings
        modules_to_save=vision_modules_to_train(model, cfg) + grown_embeddings(model) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def load_adapter(model: nn.Module, adapter_dir: str | Path, is_trainable: bool = False,
                 weights: bool = True) -> PeftModel:
    """A saved PEFT adapter on top of `model` (loaded as for training: same quantisation, same dtype).
    `weights=False`: its modules only (adapter_config.json), for a meta-device model whose tensors come later."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"lora_model_dir: {adapter_dir}: no adapter_config.json; not a saved PEFT adapter")
    if not weights:
        lora = LoraConfig.from_pretrained(str(adapter_dir))
        lora.inference_mode = not is_trainable
        return get_peft_model(model, lora)
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable)


def keep_declared_dtype(out_dir: Path, cfg: Config) -> None:
    """config.json's `dtype` (and text_config's) back to what the base model's config.json declares."""
    import json

    from magistune.model_files import resolve_model_dir

    base = json.loads((resolve_model_dir(cfg.base_model, cfg.config_dir) / "config.json").read_text(encoding="utf-8"))
    saved = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    changed = False
    for src, dst in ((base, saved), (base.get("text_config") or {}, saved.get("text_config") or {})):
        declared = src.get("dtype", src.get("torch_dtype"))
        if declared and dst.get("dtype", declared) != declared:
            dst["dtype"], changed = declared, True
    if changed:
        (out_dir / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_trained(model: nn.Module, out_dir: str | Path, cfg: Config, tokenizer_file: str | Path | None = None) -> Path:
    """Save what was trained to `out_dir`.

    Adapters: adapter_config.json + adapter_model.safetensors (the base model is not copied).
    Full fine-tuning: config.json + model*.safetensors, loadable with from_pretrained.
    A full model keeps the weights as trained (fp32 on a CPU), so evaluate and resume see exactly them, and the
    base model's declared dtype in config.json, which `export` writes by default (bf16 for Magistral, not twice that).
    `tokenizer_file` (tekken.json) is copied next to them, so the folder can be used as a base_model, and the
    system prompt the data was encoded with is kept as SYSTEM_PROMPT.txt, so inference uses the same one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.adapter is not None and not isinstance(model, PeftModel):
        raise ModelError(f"adapter: {cfg.adapter} but the model to save has no PEFT adapter")
    if isinstance(model, PeftModel):
        model.save_pretrained(out_dir)
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
        keep_declared_dtype(out_dir, cfg)
    if tokenizer_file is not None:
        copy_tokenizer_files(tokenizer_file, out_dir)  # tekken.json, or tokenizer.json and its siblings
    write_prompt_file(out_dir, resolve_system_prompt(cfg))
    return out_dir
