"""bench/random_model.py: the real Magistral Small shapes, and random_model() building the same quantised layout
that load_model() gives a checkpoint."""

import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import torch.nn as nn

from magistune.config import parse_config
from magistune.model.load import load_model
from magistune.model.parts import model_class
from magistune.model_files import resolve_model_dir, tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from random_model import magistral_small_config, magistral_small_vision_config, random_model  # noqa: E402


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


@pytest.mark.parametrize("make", [magistral_small_config, magistral_small_vision_config])
def test_magistral_small_shapes(make):
    config = make()
    text = config.get_text_config()
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (40, 5120, 32768)
    assert text.rope_parameters["rope_theta"] == 1e9 and text.tie_word_embeddings is False
    with torch.device("meta"):
        model = model_class(config)(config)
    n = sum(p.numel() for p in model.parameters())
    assert 23.5e9 < n < 24.1e9, n  # "24B"
    assert make is magistral_small_config or sum(p.numel() for p in model.model.vision_tower.parameters()) > 0.3e9


def test_vision_config_can_cut_layers():
    assert magistral_small_vision_config(num_layers=2).text_config.num_hidden_layers == 2
