"""Ranks that must agree: every rank reads the config file and the data itself, and ranks that read different
ones would not train one model. Before the model is built, distributed.agree all-gathers each rank's resolved
config and, per split, its number of samples and a sha256 over them (sources, token ids, labels, image counts; both answers of a pair, KTO's labels);
any difference is an error naming it: up to 8 differing config keys per rank, then the data splits that differ.
"""

from __future__ import annotations

import hashlib


def sample_digest(samples) -> str:
    """sha256 over every sample's source, token ids and labels: equal on every rank that read the same data."""
    import numpy as np

    h = hashlib.sha256()
    for s in samples:
        h.update(s.source.encode("utf-8", "surrogatepass") + b"\0")
        for ids in _token_lists(s):
            h.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
        h.update(len(s.images).to_bytes(4, "little") + str(getattr(s, "label", "")).encode())  # KTO's label
    return h.hexdigest()


def _token_lists(s) -> list[list[int]]:
    """A sample's token id and label lists: a preference pair has two of each."""
    if hasattr(s, "chosen_input_ids"):
        return [s.chosen_input_ids, s.chosen_labels, s.rejected_input_ids, s.rejected_labels]
    return [s.input_ids, s.labels]


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix[:-1]}[{i}]."))
    else:
        out[prefix[:-1]] = d
    return out


def describe_disagreement(prints: list[dict]) -> str | None:
    """What differs between the ranks' fingerprints (config keys, data), or None when they agree."""
    ref = prints[0]
    lines = []
    for rank, fp in enumerate(prints[1:], start=1):
        a, b = _flatten(ref["config"]), _flatten(fp["config"])
        keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
        for k in keys[:8]:
            lines.append(f"config key {k}: rank 0 has {a.get(k, '<unset>')!r}, rank {rank} has {b.get(k, '<unset>')!r}")
        if len(keys) > 8:
            lines.append(f"… and {len(keys) - 8} more config keys differ on rank {rank}")
        for split in ("train", "eval"):
            x, y = ref["data"][split], fp["data"][split]
            if x != y:
                lines.append(f"{split} data: rank 0 has {x[0]} samples (sha256 {x[1][:12]}), rank {rank} has "
                             f"{y[0]} samples (sha256 {y[1][:12]})")
    if not lines:
        return None
    return ("the ranks disagree, so they would not train one model:\n  " + "\n  ".join(lines) +
            "\nEvery rank must read the same config file and the same data (on several nodes: the same files "
            "on every node, or shared storage)")


__all__ = ["describe_disagreement", "sample_digest"]
