"""Hugging Face -> Mistral's native layout (params.json + consolidated.safetensors + tekken.json), for a Mistral
decoder and for Mistral3 (Magistral Small 2509: vision_encoder.*, vision_language_adapter.*, patch_merger.*,
pre_mm_projector_norm, and params.json's vision_encoder block; model_files/native_vision.py).

The name tables and the rotary row reordering (HF rows -> interleaved pairs, `to_native`) live in
model_files/native.py, next to the other direction that `base_model: <native folder>` uses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import Mistral3Config, MistralConfig

from magistune.export.names import param_names
from magistune.model.load import check_model_dir
from magistune.model_files.native import native_names, rotary_heads, to_native
from magistune.model_files.native_vision import check_vision, vision_params
from magistune.model_files.shards import TensorReader, TensorSpec, checkpoint_files, read_specs, write_safetensors
from magistune.model_files.system_prompt import SYSTEM_PROMPT_FILE
from magistune.tokenizer import SpecialIds, find_tokenizer_file, load_tokenizer


class ExportError(ValueError):
    pass


def text_config(model_dir: Path, what: str, vision: bool = False) -> MistralConfig | Mistral3Config:
    """The model's config, refusing what Mistral's layouts cannot hold. A Mistral3 (vision) model is refused
    unless `vision`; then its tower and projector must have a native form (native_vision.check_vision)."""
    config = check_model_dir(model_dir)
    if isinstance(config, Mistral3Config) and vision:
        problem = check_vision(config)
        if problem:
            raise ExportError(f"{model_dir}: {problem}: {what} cannot write it")
        if config.tie_word_embeddings:
            raise ExportError(f"{model_dir}: tied embeddings are not supported by {what}")
        check_decoder(config.text_config, model_dir, what)
        return config
    if type(config) is not MistralConfig:  # Mistral3Config (vision) holds a MistralConfig but is not one
        raise ExportError(f"{model_dir}: {type(config).__name__}: {what} supports text models (MistralForCausalLM) "
                          "only here")
    check_decoder(config, model_dir, what)
    return config


def check_decoder(config: MistralConfig, model_dir: Path, what: str) -> None:
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"{model_dir}: rope_type {rope.get('rope_type')} is not supported by {what} (only default rotary)")
    if config.tie_word_embeddings:
        raise ExportError(f"{model_dir}: tied embeddings are not supported by {what}")


def native_params(config: MistralConfig) -> dict:
    """params.json as mistral-inference's TransformerArgs and vLLM's Mistral format read it. vLLM takes the
    context length from `max_position_embeddings` (128,000 when absent, whatever the model was trained for),
    mistral-inference from `max_seq_len`: both are written, from the config's max_position_embeddings."""
    params = {
        "dim": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "head_dim": config.head_dim,
        "hidden_dim": config.intermediate_size,
        "n_heads": config.num_attention_heads,
        "n_kv_heads": config.num_key_value_heads,
        "norm_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "rope_theta": config.rope_parameters["rope_theta"],
        "max_seq_len": config.max_position_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "tied_embeddings": False,  # text_config refuses tied ones; vLLM's default, written so nothing is guessed
    }
    if config.sliding_window is not None:
        params["sliding_window"] = config.sliding_window
    return params


def declared_dtype(config) -> torch.dtype:
    """The dtype config.json declares (a CPU full fine-tune trains in fp32 but keeps the base's, see
    model.adapt.save_trained); bf16 when it declares none."""
    for holder in (config, getattr(config, "text_config", None)):
        value = getattr(holder, "dtype", None) if holder is not None else None
        if value is not None:
            return value if isinstance(value, torch.dtype) else getattr(torch, str(value))
    return torch.bfloat16


def hf_to_native(model_dir: Path, out_dir: Path, tokenizer_file: Path | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write params.json, consolidated.safetensors and tekken.json of the HF model in `model_dir`: a Mistral
    decoder, or Mistral3 (Pixtral tower + projector + decoder, with params.json's vision_encoder block). Tensors are
    written in `dtype`, by default the one config.json declares (not the fp32 a CPU run trained in)."""
    config = text_config(Path(model_dir), "the native export", vision=True)
    tokenizer_file = Path(tokenizer_file) if tokenizer_file else find_tokenizer_file(Path(model_dir))
    if tokenizer_file.name == "tokenizer.json":
        raise ExportError(f"{tokenizer_file}: Mistral's native layout carries a mistral-common tokenizer (tekken.json); "
                          "this model has a Hugging Face tokenizer.json: export it as hf or gguf instead")
    params = native_params(config.text_config if isinstance(config, Mistral3Config) else config)
    if isinstance(config, Mistral3Config):
        ids = SpecialIds.of(load_tokenizer(tokenizer_file))
        if ids.img_break is None or ids.img_end is None:
            raise ExportError(f"{tokenizer_file}: no [IMG_BREAK] / [IMG_END] tokens; not a vision tokenizer")
        params["vision_encoder"] = vision_params(config, ids.img_break, ids.img_end)
    located = read_specs(checkpoint_files(Path(model_dir)))
    loaded_name = param_names(config, [s.name for _, s in located])  # checkpoint key → parameter name
    native = native_names(config)
    unknown = [s.name for _, s in located if loaded_name[s.name] not in native]
    if unknown:
        raise ExportError(f"{model_dir}: tensors with no native name: {unknown[:5]}")
    names = {s.name: native[loaded_name[s.name]] for _, s in located}
    heads = rotary_heads(config)
    dtype = dtype or declared_dtype(config)
    reader = TensorReader({s.name: path for path, s in located})
    specs = [TensorSpec(names[s.name], dtype, s.shape) for _, s in located]
    source = {names[s.name]: s.name for _, s in located}

    def produce(spec: TensorSpec) -> torch.Tensor:
        w = reader.get(source[spec.name])
        n = heads.get(spec.name)
        return (to_native(w, n).contiguous() if n else w).to(dtype)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        write_safetensors(out_dir / "consolidated.safetensors", specs, produce)
    finally:
        reader.close()
    (out_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
    _copy_tokenizer(Path(model_dir), out_dir, tokenizer_file)
    return out_dir


def _copy_tokenizer(model_dir: Path, out_dir: Path, tokenizer_file: Path | None) -> None:
    src = Path(tokenizer_file) if tokenizer_file else find_tokenizer_file(model_dir)
    shutil.copyfile(src, out_dir / src.name)
    if (model_dir / SYSTEM_PROMPT_FILE).is_file():  # Mistral's folders carry it too
        shutil.copyfile(model_dir / SYSTEM_PROMPT_FILE, out_dir / SYSTEM_PROMPT_FILE)
