"""Config -> model: check the folder (model_files/ resolves it), load it (optionally as 4-bit NF4), choose what trains.

Everything that can be checked before the weights load is (config class, weight files, vocabulary size),
so a 24B load never starts only to fail at the end.

Precision policy (`bf16:`):
    true   -> bf16 weights;   false -> fp32 weights
    "auto" -> bf16 on a CUDA device that supports it, fp32 everywhere else (the CPU: exact tests, no
              emulated bf16 matmuls)
QLoRA quantises the decoder's linears to NF4 with double quantisation and computes in that same dtype;
the vision tower, the projector, the embeddings, the norms and lm_head stay unquantised in it. An NF4
weight costs 4 bits + its block's absmax (8 bits / 64 weights) + the nested fp32 absmax (32 bits / 64*256
weights) = 4.127 bits. Magistral Small: 22.23B decoder linears x 4.127 / 8 = 11.47 GB, plus embed_tokens and
lm_head in bf16 (1.34B x 2 = 2.68 GB) = 14.15 GB = 13.2 GiB, against 47.1 GB in bf16.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoConfig, BitsAndBytesConfig, MistralConfig, PretrainedConfig

from magistune.config import Config
from magistune.model import varlen_attention
from magistune.model.parts import model_class, model_kind, outside_decoder
from magistune.model.vocab import GROWN_ATTR, grow_vocab, unfreeze_embeddings
from magistune.model_files import ModelError, check_layout, resolve_model_dir
from magistune.hf_tokenizer import load_any_tokenizer
from magistune.tokenizer import find_tokenizer_file, vocab_size


# --- is it a model we can train -------------------------------------------------------------------------


def check_model_dir(path: Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """Validate a model folder before any weight loads; returns its config."""
    path = Path(path)
    check_layout(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # json errors, unknown model_type, remote code refused ...
        raise ModelError(f"{path / 'config.json'}: cannot be read as a model config ({type(e).__name__}: {e})") from None
    if model_class(config) is None:
        raise ModelError(
            f"{path / 'config.json'}: {type(config).__name__} (model_type '{config.model_type}') is not supported; "
            "magistune trains MistralConfig (MistralForCausalLM) and Mistral3Config (Mistral3ForConditionalGeneration)"
        )
    text = config.get_text_config()
    if not isinstance(text, MistralConfig):  # Mistral3's language model must itself be a Mistral decoder
        raise ModelError(f"{path / 'config.json'}: the text model is {type(text).__name__}; only MistralConfig is supported")
    _check_weights(path)
    return config


def _check_weights(path: Path) -> None:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError) as e:
            raise ModelError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ModelError(f"{path}: {len(missing)} weight shard(s) listed in {index.name} are missing: {missing[:3]}")
        return
    if not (path / "model.safetensors").is_file():
        raise ModelError(f"{path}: no model.safetensors or model.safetensors.index.json (Hugging Face safetensors weights)")


def check_vocab(config: PretrainedConfig, tokenizer_vocab: int, where: str) -> None:
    """A tokenizer with more tokens than embedding rows grows the model after loading (model/vocab.py); one with
    fewer is the wrong tokenizer."""
    rows = config.get_text_config().vocab_size
    if rows > tokenizer_vocab:
        raise ModelError(
            f"{where}: the tokenizer has {tokenizer_vocab} tokens but the model's embedding has {rows} rows; "
            "a tokenizer needs at least as many tokens as the model has rows (is tokenizer_path the model's own tokenizer?)"
        )


# --- loading ----------------------------------------------------------------------------------------------


def pick_device(name: str | None = None) -> torch.device:
    """`name` ("cpu", "cuda:1", ...) if given, else the current CUDA device, else the CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.bf16 == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cfg.bf16 else torch.float32


def resolve_attn(cfg: Config, device: torch.device, training: bool = False) -> str:
    """The attn_implementation to load with. Training with sample_packing on CUDA, when the config names no
    attention, uses torch's variable-length flash kernel (varlen_attention.py) instead of sdpa + a dense mask; on
    the CPU the same function attends sample by sample (a dense mask of a long packed row would not fit)."""
    want = cfg.attn_implementation or ("flash_attention_2" if cfg.flash_attention else "sdpa")
    if want == "flash_attention_2":
        if device.type != "cuda":
            print(f"note: flash_attention_2 needs a CUDA device; using sdpa on {device.type}", file=sys.stderr)
            return "sdpa"
        if importlib.util.find_spec("flash_attn") is None:
            print("note: flash_attention_2 requested but flash_attn is not installed; using sdpa", file=sys.stderr)
            return "sdpa"
    explicit = cfg.attn_implementation is not None or cfg.flash_attention
    if training and cfg.sample_packing and not explicit and (device.type == "cpu" or varlen_attention.available(device)):
        if device.type == "cuda":
            print("note: sample_packing on CUDA: attention through torch.nn.attention.varlen (packed rows as "
                  "cumulative lengths, no mask); set attn_implementation to choose another", file=sys.stderr)
        return varlen_attention.register()  # on the CPU: one attention per sample, no T × T mask
    return want


def load_model(cfg: Config, model_dir: Path, device: torch.device, tokenizer=None,
               training: bool = False) -> tuple[nn.Module, "ModelInfo"]:
    """Load the model in `model_dir` onto `device` as `cfg` says.

    Full fine-tuning honours unfrozen_parameters; with an adapter every weight is still trainable here and
    apply_lora / load_adapter freeze them. `tokenizer` (a MistralTokenizer) defaults to cfg.tokenizer_path,
    else the model folder's own; only its vocabulary size is used: a larger one grows the embeddings and lm_head
    (model/vocab.py). `training`: see resolve_attn.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    config = check_model_dir(model_dir, trust_remote_code=cfg.trust_remote_code)
    if tokenizer is None:
        tok_path = cfg.resolve(cfg.tokenizer_path) or find_tokenizer_file(Path(model_dir))
        tokenizer = load_any_tokenizer(tok_path)
    check_vocab(config, vocab_size(tokenizer), str(model_dir))

    cls = model_class(config)
    dtype = resolve_dtype(cfg, device)
    kwargs = dict(dtype=dtype, attn_implementation=resolve_attn(cfg, device, training), device_map={"": device})
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = _nf4_config(cls, config, dtype, sharded=cfg.fsdp)
    model = cls.from_pretrained(model_dir, config=config, **kwargs)
    if cfg.load_in_4bit and device.type == "cpu":
        keep_4bit_layout_on_cpu(model)
    grown = grow_vocab(model, vocab_size(tokenizer))

    if cfg.adapter is None and cfg.unfrozen_parameters:
        freeze_except(model, cfg.unfrozen_parameters)
    if grown and cfg.adapter is None:
        unfreeze_embeddings(model)  # the new rows must learn
    return model, model_info(model)


def keep_4bit_layout_on_cpu(model: nn.Module) -> int:
    """bitsandbytes (>= 0.48) on a CPU with AVX512-BF16 repacks a Linear4bit's weight in place on its first eval-mode
    forward and from then on multiplies with its `gemv_4bit` CPU kernel, which has no autograd: after a mid-training
    eval, training backpropagates through it (torch warns "silently incorrect behavior"), and the eval after that
    differs from a freshly loaded model's (magistune evaluate: 3e-5 on tiny-random). Turning that path off keeps one
    layout and one kernel (dequantise + matmul) in training, training's evals and inference alike, so `evaluate`
    equals the training eval bit for bit. Returns the number of layers set."""
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def empty_model(cfg: Config, model_dir: Path, device: torch.device, n_tokens: int | None = None) -> nn.Module:
    """The model of `model_dir` on the meta device: its modules and shapes, no weights, no memory. What load_model
    would build for `device` (same dtype and attention), before anything is loaded into it; `n_tokens` (the
    tokenizer's size) above the model's rows builds it grown, as load_model grows it."""
    config = check_model_dir(model_dir, trust_remote_code=cfg.trust_remote_code)
    config._attn_implementation = resolve_attn(cfg, device, training=True)
    rows = config.get_text_config().vocab_size
    if n_tokens is not None and n_tokens > rows:
        config.get_text_config().vocab_size = n_tokens
    with torch.device("meta"):
        model = model_class(config)._from_config(config, dtype=resolve_dtype(cfg, device))
    if n_tokens is not None and n_tokens > rows:
        setattr(model, GROWN_ATTR, (rows, n_tokens))
    return model


def _nf4_config(cls: type[nn.Module], config: PretrainedConfig, dtype: torch.dtype,
                sharded: bool = False) -> BitsAndBytesConfig:
    # The skip list comes from a weightless (meta-device) copy of the model, so it names the modules
    # exactly as this transformers version lays them out. `sharded` (fsdp): the packed 4-bit weights are stored in
    # tensors of the compute dtype (2 bf16 elements = 4 bytes = 8 weights) instead of uint8, so that FSDP2 shards,
    # gathers and "casts" them like the bf16 tensors around them; the bits are the same.
    with torch.device("meta"):
        skeleton = cls(config)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",  # 4-bit NormalFloat: 16 levels at the quantiles of a normal distribution
        bnb_4bit_use_double_quant=True,  # absmax: 1 byte per 64 weights, plus 4 bytes per 256 absmaxes
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=outside_decoder(skeleton),  # vision tower, projector, lm_head stay unquantised
        bnb_4bit_quant_storage=dtype if sharded else torch.uint8,
    )


def freeze_except(model: nn.Module, patterns: list[str]) -> int:
    """Axolotl's unfrozen_parameters: only parameters whose names match a regex (re.match) train.

    Returns the number of trainable parameters.
    """
    for p in patterns:
        if re.fullmatch(r".*\[\d*:\d*\]", p):
            raise ModelError(f"unfrozen_parameters: '{p}': row ranges ([start:end]) are not supported; unfreeze the whole tensor")
    compiled = [re.compile(p) for p in patterns]
    names = [name for name, _ in model.named_parameters()]
    matched = 0
    for name, param in model.named_parameters():
        param.requires_grad = any(c.match(name) for c in compiled)
        matched += param.numel() if param.requires_grad else 0
    if matched == 0:
        raise ModelError(f"unfrozen_parameters: no parameter name matches {patterns}; some names: {names[:3] + names[-3:]}")
    return matched


# --- what did we load -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    kind: str  # "text" | "vision"
    config_class: str
    total_params: int
    trainable_params: int
    weight_bytes: int  # what the parameters occupy, 4-bit storage and its quantisation constants included
    dtype: str  # the unquantised parameters' dtype
    quantized: bool
    notes: tuple[str, ...] = ()  # what was swapped in (model/fused.py), for the run log


def _param_numel(p: torch.Tensor) -> int:
    qs = getattr(p, "quant_state", None)  # bitsandbytes Params4bit packs 2 weights per uint8
    return qs.shape.numel() if qs is not None else p.numel()


def _param_bytes(p: torch.Tensor) -> int:
    n = p.numel() * p.element_size()
    qs = getattr(p, "quant_state", None)
    if qs is not None:  # 1 absmax per 64-weight block (uint8 when double quantised) + nested fp32 absmax
        n += qs.absmax.numel() * qs.absmax.element_size()
        if qs.state2 is not None:
            n += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    return n


def model_info(model: nn.Module) -> ModelInfo:
    """Sizes of a loaded (possibly quantised, possibly PEFT-wrapped) model."""
    params = list(model.parameters())
    floats = [p.dtype for p in params if p.is_floating_point() and getattr(p, "quant_state", None) is None]
    base = getattr(model, "get_base_model", lambda: model)()
    return ModelInfo(
        kind=model_kind(base.config),
        config_class=type(base.config).__name__,
        total_params=sum(_param_numel(p) for p in params),
        trainable_params=sum(_param_numel(p) for p in params if p.requires_grad),
        weight_bytes=sum(_param_bytes(p) for p in params),
        dtype=str(max(set(floats), key=floats.count)).removeprefix("torch.") if floats else "none",
        quantized=any(getattr(p, "quant_state", None) is not None for p in params),
    )


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def format_model_info(info: ModelInfo) -> str:
    """'trainable 21.0M / total 24.0B params (0.09%), weights 13.2 GiB (bfloat16 + nf4)'."""
    pct = 100 * info.trainable_params / max(info.total_params, 1)
    gib = info.weight_bytes / 2**30
    size = f"{gib:.1f} GiB" if gib >= 0.1 else f"{info.weight_bytes / 2**20:.1f} MiB"
    dtype = info.dtype + (" + nf4" if info.quantized else "")
    return (f"{info.config_class} ({info.kind}): trainable {_count(info.trainable_params)} / total "
            f"{_count(info.total_params)} params ({pct:.2f}%), weights {size} ({dtype})")


# ModelError and resolve_model_dir live in model_files/ (below data and model); importable from here too.
__all__ = ["ModelError", "ModelInfo", "check_model_dir", "check_vocab", "empty_model", "format_model_info",
           "freeze_except", "load_model", "model_info", "pick_device", "resolve_attn", "resolve_dtype", "resolve_model_dir"]
