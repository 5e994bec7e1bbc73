"""random_model(): the benchmark path builds the same quantised layout that load_model() gives a checkpoint."""

import bitsandbytes as bnb
import torch
import torch.nn as nn

from magistune.config import parse_config
from magistune.model.load import load_model, resolve_model_dir
from magistune.model.random_init import random_model
from magistune.model.tiny import tiny_config


def _cfg(base):
    return parse_config({"base_model": base, "datasets": [{"path": "x.jsonl"}], "adapter": "qlora",
                         "load_in_4bit": True, "lora_target_linear": True})[0]


def _layout(model):
    return {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, (nn.Linear, bnb.nn.Linear4bit))}


def test_random_model_matches_the_checkpoint_layout():
    for base in ("tiny-random", "tiny-random-vision"):
        cfg = _cfg(base)
        loaded, loaded_info = load_model(cfg, resolve_model_dir(base), torch.device("cpu"))
        built, info = random_model(tiny_config(base), cfg, torch.device("cpu"))
        assert _layout(built) == _layout(loaded)
        assert any(v == "Linear4bit" for v in _layout(built).values())
        assert (info.total_params, info.weight_bytes) == (loaded_info.total_params, loaded_info.weight_bytes)
