"""The tiny model folders (written once per machine, cached) and their tokenizer."""

from __future__ import annotations

import pytest

from magistune.model_files import materialize_tiny
from magistune.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def text_dir():
    return materialize_tiny("tiny-random")


@pytest.fixture(scope="session")
def vision_dir():
    return materialize_tiny("tiny-random-vision")


@pytest.fixture(scope="session")
def tok(text_dir):
    return load_tokenizer(text_dir / "tekken.json")
