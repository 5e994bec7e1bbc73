"""The preprocessing cache: tokenised samples under `dataset_prepared_path` (or `output_dir/prepared`).

The key hashes everything that changes the samples: the data options of the config, the tokenizer file's
bytes, every dataset's contents and the encoder's version. Same key → reuse; any change → a new folder.
Layout of one entry (`<prepared>/<key[:16]>/`), written to a temporary folder and renamed when complete:
    tokens.npz    input_ids and labels as flat int32 arrays + offsets (4 + 4 bytes a token)
    images.bin    the original bytes of every image, back to back (memory-mapped on load)
    samples.json  source (file:line), split and image byte ranges of every sample, the report, the tokenizer
A preference pair is stored as two consecutive token rows (chosen, rejected); a KTO example as one row, with its
label in samples.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np

from magistune import __version__
from magistune.config import Config
from magistune.data.errors import DataError
from magistune.data.images import local_file_stamp
from magistune.data.report import DataReport
from magistune.data.sample import KTOSample, PreferenceSample, PreparedData, Sample
from magistune.data.sources import SourceError, open_source, source_fingerprint, system_prompt_for
from magistune.tokenizer import file_digest

ENCODER_VERSION = 2  # bump when the encoding or labelling logic changes
_DATA_KEYS = ("datasets", "sequence_len", "excess_length_strategy", "val_set_size", "system_prompt", "seed",
              "base_model", "tokenizer_path", "allow_image_urls", "max_images_per_sample", "max_image_tokens_per_sample",
              "max_image_pixels", "allow_image_paths_outside_dataset", "rl", "shuffle_merged_datasets",
              "added_tokens_overrides", "tokens", "special_tokens")


def cache_key(cfg: Config, tokenizer_file: Path) -> str:
    h = hashlib.sha256()
    h.update(f"magistune {__version__} encoder {ENCODER_VERSION}\n".encode())
    h.update(json.dumps(cfg.model_dump(include=set(_DATA_KEYS), mode="json"), sort_keys=True).encode())
    h.update(file_digest(tokenizer_file).encode())
    for ds in cfg.datasets:
        h.update((system_prompt_for(ds, cfg) or "").encode())
        try:
            h.update(source_fingerprint(open_source(ds, cfg)).encode())
        except SourceError as e:
            raise DataError(str(e)) from None
    return h.hexdigest()


def _entry(root: Path, key: str) -> Path:
    return root / key[:16]


def save_cached(root: Path, key: str, data: PreparedData) -> Path:
    """Write atomically: a temporary folder renamed into place, so a crash never leaves half an entry."""
    final = _entry(root, key)
    tmp = root / f".{key[:16]}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_entry(tmp, key, data)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave half an entry behind
        raise
    return final


def _rows(s) -> list[tuple[list[int], list[int]]]:
    """A sample's token rows: (input_ids, labels), twice for a preference pair."""
    if isinstance(s, PreferenceSample):
        return [(s.chosen_input_ids, s.chosen_labels), (s.rejected_input_ids, s.rejected_labels)]
    return [(s.input_ids, s.labels)]


def _kind(samples: list) -> str:
    return "pair" if samples and isinstance(samples[0], PreferenceSample) else (
        "kto" if samples and isinstance(samples[0], KTOSample) else "sft")


def _write_entry(tmp: Path, key: str, data: PreparedData) -> None:
    samples = data.train + data.eval
    rows = [row for s in samples for row in _rows(s)]
    lengths = np.array([len(ids) for ids, _ in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = lambda k: np.fromiter((t for row in rows for t in row[k]), dtype=np.int32, count=int(offsets[-1]))  # noqa: E731
    np.savez(tmp / "tokens.npz", input_ids=flat(0), labels=flat(1), offsets=offsets)
    # Images: the original file bytes back to back in images.bin (memory-mapped when loaded), and per sample
    # the (start, end) byte range of each. Pixels are recomputed from them exactly when batches are built.
    ranges, pos = [], 0
    with open(tmp / "images.bin", "wb") as f:
        for s in samples:
            ranges.append([])
            for img in s.images:
                f.write(img)
                ranges[-1].append([pos, pos + len(img)])
                pos += len(img)
    meta = {
        "image_ranges": ranges,
        "key": key,
        "tokenizer_file": str(data.tokenizer_file),
        "sources": [s.source for s in samples],
        "sample_kind": _kind(samples),
        "kto_labels": [s.label for s in samples] if _kind(samples) == "kto" else None,
        "n_train": len(data.train),
        "report": data.report.to_json(),
    }
    (tmp / "samples.json").write_text(json.dumps(meta), encoding="utf-8")


def load_cached(root: Path, key: str) -> PreparedData | None:
    """The cached samples, or None when there are none for this key, an image file changed, or the entry is
    damaged (a note says so; the caller rebuilds it and the rename replaces the damaged one)."""
    entry = _entry(root, key)
    meta_file, tokens_file = entry / "samples.json", entry / "tokens.npz"
    if not (meta_file.is_file() and tokens_file.is_file()):
        return None
    try:
        return _read_entry(entry, key)
    except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError, zipfile.BadZipFile) as e:
        print(f"note: the data cache {entry} is damaged ({type(e).__name__}: {e}); rebuilding it", file=sys.stderr)
        return None


def _read_entry(entry: Path, key: str):
    meta = json.loads((entry / "samples.json").read_text(encoding="utf-8"))
    if meta.get("key") != key:
        return None
    with np.load(entry / "tokens.npz", allow_pickle=False) as arrays:  # plain arrays only: no code from the cache
        ids, labels, offsets = arrays["input_ids"].tolist(), arrays["labels"].tolist(), arrays["offsets"].tolist()
    sources, ranges, n = meta["sources"], meta["image_ranges"], meta["n_train"]
    kind = meta.get("sample_kind", "sft")
    per_sample = 2 if kind == "pair" else 1  # a preference pair is two token rows: chosen, rejected
    if not (len(offsets) == per_sample * len(sources) + 1 and len(sources) == len(ranges)
            and offsets[-1] == len(ids) == len(labels)
            and 0 <= n <= len(sources)):
        raise ValueError("the token arrays and samples.json do not agree")
    report = DataReport.from_json(meta["report"])
    if any(local_file_stamp(path) != tuple(stamp) for path, stamp in report.image_stamps.items()):
        return None  # an image file changed since the cache was written
    blob = np.memmap(entry / "images.bin", dtype=np.uint8, mode="r") if any(ranges) else None
    if blob is not None and max(y for imgs in ranges for _, y in imgs) > len(blob):
        raise ValueError(f"images.bin has {len(blob)} bytes, fewer than samples.json refers to")
    rows = [(ids[a:b], labels[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    images = [[blob[x:y] for x, y in imgs] for imgs in ranges]  # type: ignore[index]
    if kind == "pair":
        samples = [PreferenceSample(*rows[2 * i], *rows[2 * i + 1], src, imgs)
                   for i, (src, imgs) in enumerate(zip(sources, images))]
    elif kind == "kto":
        samples = [KTOSample(*row, src, imgs, label=label)
                   for row, src, imgs, label in zip(rows, sources, images, meta["kto_labels"])]
    else:
        samples = [Sample(*row, src, imgs) for row, src, imgs in zip(rows, sources, images)]
    return PreparedData(samples[:n], samples[n:], Path(meta["tokenizer_file"]), report, from_cache=True)
