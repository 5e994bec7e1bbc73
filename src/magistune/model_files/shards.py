"""Safetensors files written and read one tensor at a time, so no conversion ever holds a whole model in memory.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header
({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, space-padded to a multiple of 8),
then the tensors' bytes back to back. Every writer (export/, native.py) knows each output tensor's name, dtype
and shape before computing any of them (a merge or a rename never changes a shape), so the header is written
first and each tensor is streamed after it as soon as it is computed, then freed.

`write_safetensors` writes one file; `write_sharded` plans shards of at most `max_shard_bytes` in order and
writes them with Hugging Face's names (model-00001-of-00003.safetensors + model.safetensors.index.json; a
single shard is model.safetensors). The files are read back by the safetensors library in the tests.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

DTYPES = {  # torch dtype → safetensors dtype string
    torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DEFAULT_SHARD_BYTES = 5 * 2**30  # 5 GiB, transformers' default: Magistral Small in bf16 = 10 shards


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    entries: dict = {"__metadata__": metadata}
    offset = 0
    for s in specs:
        if s.dtype not in DTYPES:
            raise ValueError(f"{s.name}: dtype {s.dtype} cannot be written to safetensors")
        entries[s.name] = {"dtype": DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned


def write_safetensors(path: Path, specs: list[TensorSpec], produce: Callable[[TensorSpec], torch.Tensor],
                      metadata: dict[str, str] | None = None) -> int:
    """Write `specs` in order to `path`, calling produce(spec) for each tensor just before writing it.
    Returns the bytes of tensor data written. A produced tensor must match its spec exactly."""
    header = _header(specs, {"format": "pt", **(metadata or {})})
    tmp = path.with_name(path.name + ".partial")
    total = 0
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for s in specs:
            t = produce(s)
            if t.dtype != s.dtype or tuple(t.shape) != s.shape:
                raise ValueError(f"{s.name}: produced {t.dtype} {tuple(t.shape)}, planned {s.dtype} {s.shape}")
            data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))
            total += data.nbytes
            del t, data
    tmp.replace(path)
    return total


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of at most max_shard_bytes (a bigger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return [s for s in shards if s]


def write_sharded(out_dir: Path, specs: list[TensorSpec], produce: Callable[[TensorSpec], torch.Tensor],
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, prefix: str = "model") -> list[Path]:
    """Hugging Face sharded safetensors in `out_dir`; returns the files written."""
    shards = plan_shards(specs, max_shard_bytes)
    if len(shards) == 1:
        names = [f"{prefix}.safetensors"]
    else:
        names = [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_safetensors(out_dir / name, shard, produce)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {s.name: name for name, shard in zip(names, shards) for s in shard}}
        (out_dir / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [out_dir / n for n in names]


# --- reading ----------------------------------------------------------------------------------------------


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model folder, in index order."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [model_dir / f for f in dict.fromkeys(weight_map.values())]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def read_specs(files: list[Path]) -> list[tuple[Path, TensorSpec]]:
    """Every tensor's (file, spec), from the headers alone (no tensor data is read)."""
    from safetensors import safe_open

    out = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                out.append((path, TensorSpec(name, _torch_dtype(sl.get_dtype()), tuple(sl.get_shape()))))
    return out


def _torch_dtype(name: str) -> torch.dtype:
    for dtype, s in DTYPES.items():
        if s == name:
            return dtype
    raise ValueError(f"safetensors dtype {name} is not supported")


class TensorReader:
    """Reads tensors by name across a checkpoint's files, keeping one file open at a time (safe_open maps it;
    get_tensor copies one tensor out). Tensors are requested in file order, so each file opens once."""

    def __init__(self, located: dict[str, Path]):
        self.located = located
        self._path: Path | None = None
        self._file = None

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.located[name]
        if path != self._path:
            self.close()
            self._file = safe_open(str(path), framework="pt").__enter__()
            self._path = path
        return self._file.get_tensor(name)

    def close(self) -> None:
        if self._file is not None:
            self._file.__exit__(None, None, None)
            self._file, self._path = None, None
