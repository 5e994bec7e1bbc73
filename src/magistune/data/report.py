"""What happened to every record: counts, rejects with `file:line` and reason, lengths, tokens."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Rejected:
    source: str  # file:line
    reason: str  # short code, e.g. bad_weight
    message: str
    record: Any = None

    def to_json(self) -> dict:
        return {"source": self.source, "reason": self.reason, "message": self.message, "record": self.record}


@dataclass
class DataReport:
    records: int = 0
    valid: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    dropped: list[Rejected] = field(default_factory=list)  # valid records dropped by the length policy
    warnings: list[Rejected] = field(default_factory=list)  # kept, but probably not what was meant
    truncated: int = 0
    tokens_total: int = 0  # over kept samples
    tokens_trained: int = 0
    lengths: list[int] = field(default_factory=list)  # of every valid sample, before the length policy
    kept: int = 0
    train_samples: int = 0
    eval_samples: int = 0
    image_stamps: dict[str, list[int]] = field(default_factory=dict)  # local image file → [size, mtime_ns]
    images: int = 0  # in kept samples
    image_bytes: int = 0  # what they take in the cache: the original encoded files

    def reject_counts(self) -> Counter:
        return Counter(r.reason for r in self.rejected)

    def warning_counts(self) -> Counter:
        return Counter(r.reason for r in self.warnings)

    def to_json(self) -> dict:
        return {
            "records": self.records, "valid": self.valid, "kept": self.kept, "truncated": self.truncated,
            "train_samples": self.train_samples, "eval_samples": self.eval_samples,
            "tokens_total": self.tokens_total, "tokens_trained": self.tokens_trained,
            "rejected": [r.to_json() | {"record": None} for r in self.rejected],
            "dropped": [r.to_json() | {"record": None} for r in self.dropped],
            "warnings": [r.to_json() | {"record": None} for r in self.warnings],
            "lengths": self.lengths, "image_stamps": self.image_stamps, "images": self.images,
            "image_bytes": self.image_bytes,
        }

    @classmethod
    def from_json(cls, d: dict) -> "DataReport":
        rep = cls(**{k: d[k] for k in ("records", "valid", "kept", "truncated", "train_samples", "eval_samples",
                                        "tokens_total", "tokens_trained", "lengths")})
        rep.rejected = [Rejected(**r) for r in d["rejected"]]
        rep.dropped = [Rejected(**r) for r in d["dropped"]]
        rep.warnings = [Rejected(**r) for r in d.get("warnings", [])]
        rep.image_stamps = d.get("image_stamps", {})
        rep.images, rep.image_bytes = d.get("images", 0), d.get("image_bytes", 0)
        return rep


def histogram(lengths: list[int], sequence_len: int, width: int = 40) -> list[str]:
    """Power-of-two buckets up to sequence_len, then one bucket for everything longer."""
    if not lengths:
        return ["  (no samples)"]
    edges = [16]
    while edges[-1] < sequence_len:
        edges.append(edges[-1] * 2)
    edges[-1] = sequence_len
    counts = [0] * (len(edges) + 1)
    for n in lengths:
        i = next((k for k, e in enumerate(edges) if n <= e), len(edges))
        counts[i] += 1
    top = max(counts) or 1
    lines, lo = [], 1
    for k, c in enumerate(counts):
        label = f"{lo:>6}-{edges[k]:<6}" if k < len(edges) else f"> {sequence_len:<11}"
        if k < len(edges):
            lo = edges[k] + 1
        if c:
            lines.append(f"  {label} {c:>8}  {'#' * max(1, round(width * c / top))}")
    return lines


def format_report(rep: DataReport, sequence_len: int, max_listed: int = 50) -> str:
    out = [
        f"records: {rep.records}",
        f"valid: {rep.valid}",
        f"rejected: {len(rep.rejected)}",
    ]
    for reason, n in sorted(rep.reject_counts().items()):
        out.append(f"  {reason}: {n}")
    for r in rep.rejected[:max_listed]:
        out.append(f"    {r.source}: {r.reason}: {r.message}")
    if len(rep.rejected) > max_listed:
        out.append(f"    … and {len(rep.rejected) - max_listed} more (all are in the rejects file)")
    if rep.warnings:
        out.extend(format_warnings(rep, max_listed))
    out.append(f"dropped for length (> {sequence_len} tokens or nothing trained after truncation): {len(rep.dropped)}")
    for r in rep.dropped[:max_listed]:
        out.append(f"    {r.source}: {r.message}")
    if rep.truncated:
        out.append(f"truncated to {sequence_len} tokens: {rep.truncated}")
    out.append(f"kept samples: {rep.kept} (train {rep.train_samples}, eval {rep.eval_samples})")
    share = 100.0 * rep.tokens_trained / rep.tokens_total if rep.tokens_total else 0.0
    out.append(f"tokens: {rep.tokens_total:,} total, {rep.tokens_trained:,} trained ({share:.1f}%)")
    if rep.images:
        out.append(f"images: {rep.images:,} in kept samples, {rep.image_bytes / 2**20:,.1f} MiB in the cache "
                   f"({rep.image_bytes / rep.images / 1024:,.1f} KiB per image: the original files; pixels are "
                   "recomputed per batch)")
    out.append("length histogram (tokens per valid sample):")
    out.extend(histogram(rep.lengths, sequence_len))
    return "\n".join(out)


def format_warnings(rep: DataReport, max_listed: int = 50) -> list[str]:
    """Records that were kept but probably are not what was meant (a tool call to an undeclared function),
    and a split that leaves fewer train than eval samples: counted per reason and listed with file:line."""
    out = [f"warnings: {len(rep.warnings)}"]
    out += [f"  {reason}: {n}" for reason, n in sorted(rep.warning_counts().items())]
    out += [f"    {r.source}: {r.reason}: {r.message}" for r in rep.warnings[:max_listed]]
    if len(rep.warnings) > max_listed:
        out.append(f"    … and {len(rep.warnings) - max_listed} more")
    return out
