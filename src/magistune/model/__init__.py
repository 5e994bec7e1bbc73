"""The model stage: config -> a model ready to train (load, quantise, adapt).

    model, info = build_model(cfg, device)
    print(format_model_info(info))

is resolve_model_dir (model_files/) -> load_model -> (load_adapter | apply_lora | full fine-tuning), each usable alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from magistune.config import Config
from magistune.model.adapt import (
    apply_lora, enable_checkpointing, freeze_vision, load_adapter, lora_target_regex, save_trained,
)
from magistune.model.fused import apply_fused_parts
from magistune.model.load import (
    ModelError,
    ModelInfo,
    check_model_dir,
    format_model_info,
    freeze_except,
    load_model,
    model_info,
    pick_device,
    resolve_dtype,
    resolve_model_dir,
)


def build_model(cfg: Config, device: torch.device, tokenizer=None) -> tuple[nn.Module, ModelInfo, Path]:
    """Everything the config says about the model, in order. Returns the model, its sizes and its folder."""
    model_dir = resolve_model_dir(cfg.base_model, cfg.config_dir)
    model, _ = load_model(cfg, model_dir, torch.device(device), tokenizer=tokenizer, training=True)
    notes = apply_fused_parts(model, cfg, torch.device(device))  # tiled MLP / liger kernels, before LoRA wraps
    if cfg.adapter and cfg.lora_model_dir:  # continue training a saved adapter
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        model = load_adapter(model, cfg.resolve(cfg.lora_model_dir), is_trainable=True)
    elif cfg.adapter:
        model = apply_lora(model, cfg)
    else:
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        freeze_vision(model, cfg)
    return model, dataclasses.replace(model_info(model), notes=tuple(notes)), model_dir


__all__ = [
    "ModelError", "ModelInfo", "apply_lora", "build_model", "check_model_dir", "enable_checkpointing",
    "format_model_info", "freeze_except", "load_adapter", "load_model", "lora_target_regex", "model_info",
    "pick_device", "resolve_dtype", "resolve_model_dir", "save_trained",
]
