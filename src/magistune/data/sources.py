"""Where records come from: .jsonl, .json (a list), .parquet, a `datasets.save_to_disk` folder, or a
Hugging Face dataset name through `datasets.load_dataset` (offline: the local cache only).

Each source yields (location, record) where location is `file:line` (JSON lines) or `file:row N`
(0-based rows of JSON lists, parquet and datasets). A line that is not valid JSON, or a record whose text is
not valid UTF-8, yields a `BadLine` so the caller reports it like any other bad record; nothing is skipped
silently. A UTF-8 byte-order mark (what Windows editors write) is accepted; a UTF-16 file is refused whole. A dataset's
system prompt (its own, else the config's) is decided here too: the encoder and the cache key both need it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from magistune.config import Config, DatasetConfig
from magistune.model_files.system_prompt import resolve_system_prompt


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
        kind = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}.get(self.path.suffix.lower(), "unknown")
        if kind == "unknown" and self.cfg.ds_type == "parquet":
            return "parquet"
        if self.cfg.ds_type in ("json", "jsonl") and kind in ("json", "unknown"):
            return _json_or_lines(self.path)  # Axolotl's `json` reads a list or JSON lines, as datasets' loader does
        return kind


def _json_or_lines(path: Path) -> str:
    """`json` when the file holds one JSON value (a list, or one record), `jsonl` when it holds one per line."""
    with open(path, "rb") as f:
        head = f.read(1 << 16).lstrip(UTF8_BOM).lstrip()
    if head.startswith(b"["):
        return "json"
    try:
        json.loads(path.read_bytes().decode("utf-8-sig", errors="surrogateescape"))
        return "json"
    except ValueError:
        return "jsonl"


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
        records = _iter_jsonl(src)
    elif kind == "json":
        records = _iter_json(src)
    elif kind == "parquet":
        records = _iter_parquet(src)
    else:
        records = _iter_datasets(src)
    for where, record in records:
        bad = None if isinstance(record, BadLine) else not_text(record)
        yield where, BadLine("invalid_utf8", bad) if bad else record


UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _refuse_utf16(head: bytes, label: str) -> None:
    if head.startswith(_UTF16_BOMS):
        raise SourceError(f"{label}: the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8")


def iter_text_lines(path: Path, label: str) -> Iterator[tuple[int, str | BadLine]]:
    """(line number, text) of every line of a UTF-8 file; a line that is not UTF-8 comes as a BadLine
    instead of ending the file (a UnicodeDecodeError would). A leading UTF-8 byte-order mark is dropped."""
    with open(path, "rb") as f:
        _refuse_utf16(f.read(2), label)
        f.seek(0)
        for n, raw in enumerate(f, start=1):
            if n == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM):]
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, BadLine("invalid_utf8", f"not valid UTF-8: byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                                                 "of the line (save the file as UTF-8)")


def not_text(value: Any, where: str = "") -> str | None:
    """Where a string of a record holds a surrogate code point, and what it was: a byte that was not UTF-8
    (decoded with errors="surrogateescape" it becomes U+DC80..U+DCFF) or a lone \\uD800-\\uDFFF escape, which
    is no character either (the tokenizer would train on garbage). None when every string is text."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")  # fails exactly on surrogates, at C speed
            return None
        except UnicodeEncodeError as e:
            bad = value[e.start]
        if "\udc80" <= bad <= "\udcff":
            return f"{where or 'the record'}: not valid UTF-8 (byte 0x{ord(bad) - 0xdc00:02x}; save the file as UTF-8)"
        return f"{where or 'the record'}: a lone surrogate \\u{ord(bad):04x} is not a character"
    if isinstance(value, dict):
        children = [(k, f"{where}.{k}" if where else str(k)) for k in value]
    elif isinstance(value, list):
        children = [(i, f"{where}[{i}]") for i in range(len(value))]
    else:
        return None
    for key, path in children:
        found = (not_text(key, where) if isinstance(key, str) else None) or not_text(value[key], path)
        if found:
            return found
    return None


def _iter_jsonl(src: Source) -> Iterator[tuple[str, Any]]:
    for n, line in iter_text_lines(src.path, src.label):  # type: ignore[arg-type]
        where = f"{src.label}:{n}"
        if isinstance(line, BadLine):
            yield where, line
            continue
        if not line.strip():
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            yield where, BadLine("invalid_json", f"invalid JSON: {e}")


def _iter_json(src: Source) -> Iterator[tuple[str, Any]]:
    raw = src.path.read_bytes()  # type: ignore[union-attr]
    _refuse_utf16(raw, src.label)
    # Bytes that are not UTF-8 become surrogates here, so one bad record does not sink the file:
    # iter_records reports that record alone (not_text).
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    try:
        data = json.loads(text)
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
        try:
            rows = batch.to_pylist()
        except UnicodeDecodeError:  # a string column holds bytes that are not UTF-8: find the row(s)
            rows = [_one_row(lambda: batch.slice(j, 1).to_pylist()[0]) for j in range(batch.num_rows)]
        for rec in rows:
            yield f"{src.label}:row {row}", rec
            row += 1


def _one_row(read) -> Any:
    try:
        return read()
    except UnicodeDecodeError as e:
        return BadLine("invalid_utf8", f"a string is not valid UTF-8 ({e.reason} at byte {e.start + 1})")


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
    loaded = _load_datasets(src)
    for start in range(0, len(loaded), 1024):
        end = min(start + 1024, len(loaded))
        try:
            rows = list(loaded.select(range(start, end)))
        except UnicodeDecodeError:  # a string that is not UTF-8: find the row(s), keep the others
            rows = [_one_row(lambda: loaded[i]) for i in range(start, end)]
        for i, rec in enumerate(rows, start=start):
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
    """The config's system prompt (chat and generate use it too): system_prompt_file's text, system_prompt
    ("" turns it off), else the base model's SYSTEM_PROMPT.txt (model_files/system_prompt.py)."""
    return resolve_system_prompt(cfg)


def system_prompt_for(ds: DatasetConfig, cfg: Config) -> str | None:
    """The dataset's own system_prompt ("" turns it off), else the config's."""
    if ds.system_prompt is not None:
        return ds.system_prompt or None
    return config_system_prompt(cfg)
