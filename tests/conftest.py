"""Shared test fixtures. Nothing may reach a hub: offline mode is set before anything imports `datasets`."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from magistune.tokenizer import file_digest, load_tokenizer, shipped_tokenizer_file, tiny_tokenizer_path  # noqa: E402

_LOADED: dict = {}


def load_tokenizer_cached(path):
    """`load_tokenizer`, memoised on the file name and contents (a Tekken file takes seconds to load)."""
    path = Path(path)
    if not path.is_file():
        return load_tokenizer(path)  # raises TokenizerError
    key = (path.name, file_digest(path))  # loading depends on the name (tekken*.json or *.model*) and bytes only
    if key not in _LOADED:
        _LOADED[key] = load_tokenizer(path)
    return _LOADED[key]


@pytest.fixture(scope="module")
def fast_tokenizers():
    """The data pipeline loads its tokenizer through the memo above (same file bytes → same tokenizer)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("magistune.data.build.load_tokenizer", load_tokenizer_cached)
        yield


@pytest.fixture(scope="module")
def fast_tokenizer(fast_tokenizers):
    """For in-process train() calls: magistune.tokenizer.load_tokenizer memoises on (path, size, mtime) itself,
    and data.build goes through the memo above."""
    yield


@pytest.fixture(scope="session")
def tokenizer_loader():
    return load_tokenizer_cached


@pytest.fixture(scope="session")
def tiny_tok():
    return load_tokenizer_cached(tiny_tokenizer_path())


@pytest.fixture(scope="session")
def v3_tok():
    """mistral-common's shipped tekken_240911.json: a v3 Tekken tokenizer without [THINK]."""
    return load_tokenizer_cached(shipped_tokenizer_file("tekken_240911.json"))


def _write_jsonl(path: Path, records) -> Path:
    """One line per item: a str is written as is (for bad JSON and blank lines), anything else as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def write_jsonl():
    return _write_jsonl


@pytest.fixture
def write_config(tmp_path):
    """write_config(**keys) → config.yaml in tmp_path: tiny-random, data.jsonl, output_dir out, plus `keys`."""

    def write(name: str = "config.yaml", **keys) -> Path:
        cfg = {"base_model": "tiny-random", "datasets": [{"path": "data.jsonl"}], "sequence_len": 512,
               "output_dir": "out"}
        cfg.update(keys)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        return path

    return write
