"""bench/fp8_accuracy.py: the bf16 and FP8 paths train the same steps on the tiny model (CPU), the comparison and
the product timings come out; on a GPU the same script runs on the real shapes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.slow
def test_fp8_accuracy_runs_on_the_tiny_model(tmp_path):
    out = tmp_path / "fp8.json"
    cmd = [sys.executable, str(BENCH / "fp8_accuracy.py"), "--tiny", "--layers", "2", "--seq", "64", "--steps", "4",
           "--reps", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["paths"]) == {"bf16", "bf16-repeat", "fp8-e4m3", "fp8-e5m2"}
    assert res["paths"]["bf16-repeat"]["grad_cosine"]["all"] == 1.0  # the CPU is deterministic: the floor is 0
    bf16, fp8 = res["paths"]["bf16"], res["paths"]["fp8-e4m3"]
    assert bf16["fp8_linears"] == 0 and fp8["fp8_linears"] == 2 * 7
    assert res["paths"]["bf16-repeat"]["loss_rel_diff_pct"]["max"] == 0
    assert len(bf16["losses"]) == len(fp8["losses"]) == 4 and bf16["losses"] != fp8["losses"]  # the paths differ
    assert 0.99 < fp8["grad_cosine"]["all"] < 1 and fp8["within_0.5pct"]
    assert [r["proj"] for r in res["matmul"]] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"]
    assert all(r["ms"]["fp8_fwd"] > 0 and r["ms"]["base_fp8_over_bnb"]["dgrad"] > 0 for r in res["matmul"])
