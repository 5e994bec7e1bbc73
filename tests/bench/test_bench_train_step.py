"""bench/train_step.py --tiny: the CPU smoke test of the timing script, with and without the fused LoRA kernels."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--kernels", "--keep-weights"]], ids=["peft", "kernels"])
def test_magistune_side_runs_on_the_tiny_model(tmp_path, extra):
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(BENCH / "train_step.py"), "--side", "magistune", "--tiny", "--seq", "32",
           "--steps", "1", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["kernels"] == row["keep_weights"] == bool(extra) and row["tokens_per_s"] > 0
    assert ("LoRA kernels: fused q,k,v in 2/2" in proc.stdout) == bool(extra)


def test_keep_weights_needs_kernels(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "train_step.py"), "--side", "magistune", "--tiny",
                           "--keep-weights"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "--keep-weights is an option of --kernels" in proc.stderr
