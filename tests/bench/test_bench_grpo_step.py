"""bench/grpo_step.py (magistune's GRPO step beside TRL's GRPOTrainer) and bench/report_grpo.py: both sides run end
to end on the tiny model (CPU), the report's ratio line against the issue's goal."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
from grpo_step import even_share  # noqa: E402
from report_grpo import table  # noqa: E402


def test_the_reward_varies_within_a_group():
    assert even_share([[2, 4, 5, 7], [1, 3], [], [6]]) == [0.5, 0.0, 0.0, 1.0]


def _run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(BENCH / "grpo_step.py"), "--tiny", "--prompt", "12", "--new", "5",
           "--generations", "4", "--warmup-new", "2", "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    return row


@pytest.mark.slow
@pytest.mark.parametrize("rollout", ["fast", "plain"])
def test_magistune_side_runs_on_the_tiny_model(tmp_path, rollout):
    row = _run(tmp_path, "--side", "magistune", "--rollout", rollout)
    assert (row["side"], row["rollout"], row["layers"], row["generations"], row["new"]) == \
        ("magistune", rollout, 2, 4, 5)
    assert row["checked"].startswith("4 completions of exactly 5 tokens")
    # both rounded (tok/s to 0.1, seconds to 1 ms): a 0.2 s rollout moves the quotient by up to 0.25 tok/s
    assert row["rollout_tokens_per_s"] == pytest.approx(4 * 5 / row["rollout_s"], rel=0.01)
    assert row["step_s"] >= row["rollout_s"] + row["train_s"] - 0.002 and row["peak_gib"] is None  # rounded


@pytest.mark.slow
def test_trl_side_runs_on_the_tiny_model(tmp_path):
    pytest.importorskip("trl", reason="TRL is a benchmark-only dependency (carried to the GPU host as a wheel)")
    row = _run(tmp_path, "--side", "trl")
    assert (row["side"], row["trl"], row["rollout"]) == ("trl", "1.16.0", "HF generate")
    assert "prompt ids equal ours" in row["checked"] and "exactly 5 tokens" in row["checked"]
    assert row["rollout_s"] >= row["generate_s"] > 0 and row["step_s"] > row["rollout_s"]


def _row(side: str, rollout: str, tok_s: float, peak: float) -> dict:
    s = 8 * 512 / tok_s
    return {"side": side, "rollout": rollout, "prompt": 256, "new": 512, "generations": 8, "layers": 40,
            "tiny": False, "nf4": True, "warmup": 1, "rollout_tokens_per_s": tok_s, "decode_ms": 1000 * s / 512,
            "rollout_s": s, "generate_s": s, "prefill_s": 0.1, "score_s": 0.0, "forward_backward_s": 4.0,
            "optimizer_s": 0.1, "train_s": 4.1, "step_s": s + 4.1, "train_tokens_per_s": 8 * 768 / 4.1,
            "peak_gib": peak, "peak_rollout_gib": peak - 1, "weights_gib": 13.2, "lora_dropout_run": 0.0,
            "date": "d", "gpu": "g", "torch": "t", "transformers": "t", "peft": "p", "bitsandbytes": "b",
            "trl": "1.16.0"}


def test_report_ratio_against_the_goal():
    rows = [_row("magistune", "plain", 100.0, 18.0), _row("magistune", "fast", 800.0, 18.0),
            _row("trl", "HF generate", 72.0, 19.5)]
    md = table(rows)
    assert "magistune (fast) / TRL: 11.1× the rollout tok/s" in md and "Goal" in md and ": met." in md
    assert "| trl | HF generate | 72 |" in md and "- trl: generate" in md
    assert "not met" in table(rows[:1] + [_row("trl", "HF generate", 72.0, 19.5)])  # 1.4×
    assert "not met" in table([_row("magistune", "fast", 800.0, 24.5), rows[2]])  # over 24 GiB
