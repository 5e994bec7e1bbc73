"""Adapters for the export tests, saved exactly as training saves them (apply_lora, then PEFT's save)."""

from __future__ import annotations

from pathlib import Path

import torch

from magistune.config import parse_config


def adapter_config(base_model: str, **keys):
    cfg, _ = parse_config({"base_model": base_model, "datasets": [{"path": "-"}], "adapter": "lora",
                           "lora_target_linear": True, "lora_r": 4, **keys})
    return cfg


def save_random_adapter(base_model: str, out_dir: Path, seed: int = 0, **keys) -> Path:
    """apply_lora on the base (4-bit when keys say qlora), then B (and both embedding matrices, which PEFT
    starts at A = 0) filled with noise, so that the merge has something to add."""
    from magistune.model import build_model

    model, _, _ = build_model(adapter_config(base_model, **keys), torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(out_dir)
    return Path(out_dir)
