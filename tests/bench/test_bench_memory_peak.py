"""bench/memory_peak.py: the live blocks at the peak of an allocator trace, grouped by library frame."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from memory_peak import peak_report  # noqa: E402

GIB = 2**30


def frame(path: str, line: int, name: str) -> dict:
    return {"filename": path, "line": line, "name": name}


def test_the_peak_lists_the_blocks_alive_at_that_moment():
    norm = [frame("/x/torch/nn/functional.py", 1, "f"), frame("/s/site-packages/transformers/models/mistral/m.py", 40, "norm")]
    mlp = [frame("/w/src/magistune/model/fused.py", 77, "_mlp")]
    events = [
        {"action": "alloc", "addr": 1, "size": 2 * GIB, "frames": norm},
        {"action": "alloc", "addr": 2, "size": 1 * GIB, "frames": mlp},
        {"action": "free_requested", "addr": 1, "size": 2 * GIB},
        {"action": "free_completed", "addr": 1, "size": 2 * GIB},
        {"action": "alloc", "addr": 3, "size": 1 * GIB, "frames": mlp},  # live: 2 GiB < the 3 GiB peak
    ]
    text = peak_report({"device_traces": [events]}, baseline=10 * GIB)
    assert "step's own peak above that: 3.00 GiB  (total 13.00 GiB)" in text
    rows = text.splitlines()[3:]
    assert rows[0].split()[:2] == ["2.000", "1"] and "transformers/models/mistral/m.py:40 norm" in rows[0]
    assert rows[1].split()[:2] == ["1.000", "1"] and "magistune/model/fused.py:77 _mlp" in rows[1]
    assert len(rows) == 2  # the block allocated after the peak is not counted
