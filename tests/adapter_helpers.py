"""Adapters for the export and inference tests, saved exactly as training saves them (build_model → apply_lora,
then PEFT's save_pretrained)."""

from __future__ import annotations

from pathlib import Path

import torch

from magistune.config import parse_config


def adapter_config(base_model: str, **keys):
    cfg, _ = parse_config({"base_model": base_model, "datasets": [{"path": "-"}], "adapter": "lora",
                           "lora_target_linear": True, "lora_r": 4, **keys})
    return cfg


def save_adapter(base_model: str, out_dir: Path, random_b: bool = True, seed: int = 0, **keys) -> Path:
    """A LoRA adapter on `base_model` (4-bit when keys say qlora). random_b=False keeps PEFT's initialisation
    (B = 0: the adapter changes nothing); True fills B, and both embedding matrices (PEFT starts their A at 0),
    with noise, so that a merge or a forward pass has something to add."""
    from magistune.model import build_model

    model, _, _ = build_model(adapter_config(base_model, **keys), torch.device("cpu"))
    if random_b:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name or "lora_embedding" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(out_dir)
    return Path(out_dir)
