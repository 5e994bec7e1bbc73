"""Shared fixtures: the tiny models are written once per machine (cached), the tokenizer is loaded once."""

from __future__ import annotations

import pytest
import torch

from magistune.config import parse_config
from magistune.model_files import materialize_tiny
from magistune.tokenizer import load_tokenizer



def _make_cfg(base_model: str = "tiny-random-vision", **keys):
    cfg, _ = parse_config({"base_model": base_model, "datasets": [{"path": "unused"}], **keys})
    return cfg


@pytest.fixture
def make_cfg():
    """make_cfg(base_model="tiny-random-vision", **yaml_keys) -> a validated Config."""
    return _make_cfg


@pytest.fixture(scope="session")
def text_dir():
    return materialize_tiny("tiny-random")


@pytest.fixture(scope="session")
def vision_dir():
    return materialize_tiny("tiny-random-vision")


@pytest.fixture(scope="session")
def tok(text_dir):
    return load_tokenizer(text_dir / "tekken.json")


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(100, 131072, (2, 12), generator=g)
