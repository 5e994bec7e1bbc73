"""Session fixtures: tiny-random is materialised once, the scripted model written once, loaded once."""

from __future__ import annotations

import pytest

from infer_helpers import write_scripted_model
from magistune.infer.loading import load_for_inference, resolve_source
from magistune.model import pick_device
from magistune.infer.prompts import load_chat_tokenizer
from magistune.model_files import materialize_tiny
from magistune.tokenizer import SpecialIds


@pytest.fixture(scope="session")
def tiny_dir():
    return materialize_tiny("tiny-random")


@pytest.fixture(scope="session")
def chat_tok(tiny_dir):
    return load_chat_tokenizer(tiny_dir / "tekken.json")


@pytest.fixture(scope="session")
def special(chat_tok):
    return SpecialIds.of(chat_tok)


@pytest.fixture(scope="session")
def scripted_dir(tiny_dir, chat_tok, tmp_path_factory):
    return write_scripted_model(tiny_dir, tmp_path_factory.mktemp("scripted"), chat_tok)


@pytest.fixture(scope="session")
def scripted(scripted_dir):
    """The scripted model, loaded for inference (fp32 on the CPU)."""
    return load_for_inference(resolve_source(None, model=str(scripted_dir)), pick_device("cpu"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return load_for_inference(resolve_source(None, model=str(tiny_dir)), pick_device("cpu"))
