"""The model stage: config -> a model ready to train (load, quantise, adapt).

    model, info = build_model(cfg, device)
    print(format_model_info(info))

is resolve_model_dir (model_files/) -> load_model (or empty_model: on the meta device) -> adapt_model (fused parts,
then load_adapter | apply_lora | full fine-tuning, then the fused LoRA kernels), each usable alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from magistune.config import Config
from magistune.model.adapt import (
    apply_lora, enable_checkpointing, freeze_vision, grown_embeddings, load_adapter, lora_target_regex, save_trained,
)
from magistune.model.fp8 import apply_base_fp8
from magistune.model.fused import apply_fused_parts, apply_lora_kernels
from magistune.model.vocab import vocab_growth
from magistune.tokenizer import vocab_size
from magistune.model.load import (
    ModelError,
    ModelInfo,
    check_model_dir,
    empty_model,
    format_model_info,
    freeze_except,
    load_model,
    model_info,
    pick_device,
    resolve_dtype,
    resolve_model_dir,
)


def build_model(cfg: Config, device: torch.device, tokenizer=None,
                meta: bool = False) -> tuple[nn.Module, ModelInfo, Path]:
    """Everything the config says about the model, in order. Returns the model, its sizes and its folder.

    `meta`: the same model without weights, on the meta device (no memory): what FSDP2 shards before rank 0's
    weights arrive (train/sharding.py). Every run (one GPU, FSDP2, DDP) builds its model here."""
    model_dir = resolve_model_dir(cfg.base_model, cfg.config_dir)
    device = torch.device(device)
    if meta:
        model = empty_model(cfg, model_dir, device, vocab_size(tokenizer) if tokenizer is not None else None)
    else:
        model, _ = load_model(cfg, model_dir, device, tokenizer=tokenizer, training=True)
    model, notes = adapt_model(model, cfg, device, adapter_weights=not meta)
    return model, dataclasses.replace(model_info(model), notes=tuple(notes)), model_dir


def adapt_model(model: nn.Module, cfg: Config, device: torch.device,
                adapter_weights: bool = True) -> tuple[nn.Module, list[str]]:
    """What follows loading: fused parts, then LoRA (new, or a saved adapter) or full fine-tuning, with
    checkpointing. Module swaps only, so it also runs on a weightless (meta-device) model; `adapter_weights`:
    False leaves a saved adapter's tensors unread (they arrive later). Returns the model and notes for the log."""
    notes = apply_fused_parts(model, cfg, device)  # tiled MLP / liger kernels, before LoRA wraps
    notes += apply_base_fp8(model, cfg, device)  # FP8 products for the frozen base linears, before LoRA wraps
    if cfg.adapter and cfg.lora_model_dir:  # continue training a saved adapter
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        model = load_adapter(model, cfg.resolve(cfg.lora_model_dir), is_trainable=True, weights=adapter_weights)
    elif cfg.adapter:
        grown = grown_embeddings(model)
        model = apply_lora(model, cfg)
        if grown:
            old, new = vocab_growth(model)
            notes.append(f"the vocabulary grew from {old} to {new} tokens: {' and '.join(grown)} train in full beside "
                         "LoRA and are saved with the adapter (PEFT modules_to_save)")
    else:
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        freeze_vision(model, cfg)
    notes += apply_lora_kernels(model, cfg)  # after PEFT wrapped the linears (adapters only)
    return model, notes


__all__ = [
    "ModelError", "ModelInfo", "adapt_model", "apply_lora", "build_model", "check_model_dir", "enable_checkpointing",
    "format_model_info", "freeze_except", "load_adapter", "load_model", "lora_target_regex", "model_info",
    "pick_device", "resolve_dtype", "resolve_model_dir", "save_trained",
]
