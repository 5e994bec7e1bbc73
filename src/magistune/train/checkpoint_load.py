"""Resuming: a checkpoint's adapter, optimizer, scheduler and RNG restored into a one-process run (checkpoint.py
writes and finds checkpoints; dist_checkpoint.py restores sharded ones)."""

from __future__ import annotations

from pathlib import Path

import torch

from magistune.train.checkpoint import DCP_DIR, MARKER, RNG_FILE, CheckpointError, is_complete, load_rng, read_state
from magistune.train.rng import restore_rng


def is_sharded(path: Path) -> bool:
    """Written by several processes (dist_checkpoint.py): the model and optimizer are in a dcp/ folder."""
    return (Path(path) / DCP_DIR).is_dir()


def parallel_info(path: Path) -> dict:
    """A sharded checkpoint's "parallel" entry: mode, world_size, kind (adapter | full), dtype."""
    try:
        return read_state(path).get("parallel") or {}
    except (OSError, ValueError):
        return {}


def check_not_sharded(path: Path) -> None:
    """A one-process run cannot resume a sharded checkpoint: say how to use it instead."""
    if is_sharded(path):
        n = parallel_info(path).get("world_size", "several")
        raise CheckpointError(
            f"{path}: a sharded checkpoint written by {n} processes; resume it with the same number of processes "
            f"(magistune train CONFIG --nproc {n}), or turn it into a model folder with "
            f"`magistune consolidate {path} --output DIR`")


def holds_adapter(path: Path) -> bool:
    return (path / "adapter_model.safetensors").is_file()


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy a checkpoint's adapter into `model` in place, or check that a full model came from it.

    A LoRA adapter is loaded by PEFT (its tensor names are the model's own module names). A full model's
    weights are not copied here: transformers renames some tensors when it saves (Mistral3's
    `model.language_model.*` is stored as `language_model.model.*`), so the recipe builds the model from the
    checkpoint folder itself with from_pretrained, which maps the names back (`full_model_source`).
    """
    if holds_adapter(path):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        if not hasattr(model, "peft_config"):
            raise CheckpointError(f"{path}: holds a LoRA adapter but the config trains the full model")
        result = set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
        if result.unexpected_keys:
            raise CheckpointError(f"{path}: adapter tensors that this model does not have: "
                                  f"{result.unexpected_keys[:5]} (lora_target_modules changed?)")
        return
    if hasattr(model, "peft_config"):
        raise CheckpointError(f"{path}: holds a full model but the config trains an adapter")
    if not (path / "config.json").is_file() or not any(path.glob("model*.safetensors")):
        raise CheckpointError(f"{path}: no adapter_model.safetensors, and no config.json + model*.safetensors")


def full_model_source(cfg, resume: Path | None):
    """The config to build the model from: a full fine-tune resumes from the checkpoint's own weights."""
    if resume is None or cfg.adapter is not None:
        return cfg
    if holds_adapter(resume):
        raise CheckpointError(f"{resume}: holds a LoRA adapter but the config trains the full model")
    return cfg.model_copy(update={"base_model": str(resume.resolve())})


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    restore_rng_now: bool = True) -> dict:
    """Restore the adapter, optimizer, scheduler (and RNG) from `path`; returns the trainer state.

    A full model must already have been built from `path` (full_model_source)."""
    if not is_complete(path):
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MARKER} marker)")
    load_weights(model, path)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if restore_rng_now:
        restore_rng(load_rng(path / RNG_FILE))
    return read_state(path)
