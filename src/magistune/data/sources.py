"""Where records come from: .jsonl, .json (a list), .parquet, a `datasets.save_to_disk` folder, or a
Hugging Face dataset name through `datasets.load_dataset` (offline: the local cache only).

Each source yields (location, record) where location is `file:line` (JSON lines) or `file:row N`
(0-based rows of JSON lists, parquet and datasets). A line that is not valid JSON yields a `BadLine`
so the caller reports it like any other bad record; nothing is skipped silently. A dataset's system prompt
(its own, else the config's) is decided here too: the encoder and the cache key both need it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from magistune.config import Config, ConfigError, DatasetConfig


class SourceError(ValueError):
    """A dataset that cannot be opened at all (missing path, unreadable file, unknown hub name)."""


@dataclass
class BadLine:
    reason: str
    message: str


@dataclass
class Source:
    cfg: DatasetConfig
    label: str  # what locations start with: the path as written in the config
    path: Path | None  # local file or folder; None for a hub dataset

    @property
    def kind(self) -> str:
        if self.path is None:
            return "hub"
        if self.path.is_dir():
            return "disk"
        return {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}.get(self.path.suffix.lower(), "unknown")


def open_source(ds: DatasetConfig, cfg: Config) -> Source:
    local = cfg.resolve(ds.path)
    if local is not None and local.exists():
        src = Source(ds, ds.path, local)
        if src.kind == "unknown":
            raise SourceError(f"{ds.path}: unsupported file type '{local.suffix}' (use .jsonl, .json, .parquet or a save_to_disk folder)")
        return src
    looks_local = ds.path.startswith((".", "/", "~")) or Path(ds.path).suffix.lower() in (".jsonl", ".json", ".parquet")
    if looks_local or ds.path.count("/") > 1:
        raise SourceError(f"{ds.path}: dataset file not found (resolved to {local})")
    return Source(ds, ds.path, None)


def iter_records(src: Source) -> Iterator[tuple[str, Any]]:
    kind = src.kind
    if kind == "jsonl":
        yield from _iter_jsonl(src)
    elif kind == "json":
        yield from _iter_json(src)
    elif kind == "parquet":
        yield from _iter_parquet(src)
    else:
        yield from _iter_datasets(src)


def _iter_jsonl(src: Source) -> Iterator[tuple[str, Any]]:
    with open(src.path, "r", encoding="utf-8") as f:  # type: ignore[arg-type]
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{src.label}:{n}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, BadLine("invalid_json", f"invalid JSON: {e}")


def _iter_json(src: Source) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(src.path.read_text(encoding="utf-8"))  # type: ignore[union-attr]
    except json.JSONDecodeError as e:
        raise SourceError(f"{src.label}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if isinstance(data, dict) and src.cfg.field_messages in data:
        data = [data]
    if not isinstance(data, list):
        raise SourceError(f"{src.label}: a .json dataset must hold a list of records")
    for i, rec in enumerate(data):
        yield f"{src.label}:row {i}", rec


def _iter_parquet(src: Source) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(src.path)
    except Exception as e:
        raise SourceError(f"{src.label}: cannot read parquet: {e}") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            yield f"{src.label}:row {row}", rec
            row += 1


def _load_datasets(src: Source):
    import datasets

    ds = src.cfg
    try:
        if src.path is not None:
            loaded = datasets.load_from_disk(str(src.path))
        else:
            loaded = datasets.load_dataset(ds.path, ds.name, data_files=ds.data_files, split=ds.split)
    except Exception as e:
        where = "local folder" if src.path is not None else "Hugging Face dataset (from the local cache; there is no hub access)"
        raise SourceError(f"{src.label}: cannot load {where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if ds.split not in loaded:
            raise SourceError(f"{src.label}: no split '{ds.split}' (has {', '.join(loaded)})")
        loaded = loaded[ds.split]
    return loaded


def _iter_datasets(src: Source) -> Iterator[tuple[str, Any]]:
    for i, rec in enumerate(_load_datasets(src)):
        yield f"{src.label}:row {i}", rec


def source_fingerprint(src: Source) -> str:
    """Changes whenever the data changes: file contents for local data, the datasets fingerprint for hub data."""
    h = hashlib.sha256()
    if src.path is None:
        h.update(str(getattr(_load_datasets(src), "_fingerprint", src.label)).encode())
        return h.hexdigest()
    files = sorted(p for p in src.path.rglob("*") if p.is_file()) if src.path.is_dir() else [src.path]
    for p in files:
        h.update(str(p.relative_to(src.path) if src.path.is_dir() else p.name).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def config_system_prompt(cfg: Config) -> str | None:
    """The config's system prompt: system_prompt, or system_prompt_file's text (chat and generate use it too)."""
    if cfg.system_prompt_file:
        path = cfg.resolve(cfg.system_prompt_file)
        if not path.is_file():
            raise ConfigError(f"system_prompt_file: {path} not found")
        return path.read_text(encoding="utf-8").strip()
    return cfg.system_prompt


def system_prompt_for(ds: DatasetConfig, cfg: Config) -> str | None:
    return ds.system_prompt if ds.system_prompt is not None else config_system_prompt(cfg)
