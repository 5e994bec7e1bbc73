"""bench/dpo_step.py (magistune's DPO step beside TRL's DPOTrainer) and bench/report_dpo.py: the word tokenizer
that gives TRL our ids, both sides run end to end on the tiny model (CPU), the report's ratio line."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
from dpo_step import word_tokenizer  # noqa: E402
from report_dpo import table  # noqa: E402


def test_word_tokenizer_gives_one_id_a_word():
    tok = word_tokenizer(2000, {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 11})
    assert len(tok) == 2000
    assert tok("t5 t1999 t7</s>")["input_ids"] == [5, 1999, 7, 2]  # no BOS/EOS added, </s> split off the word
    assert (tok.eos_token_id, tok.pad_token_id) == (2, 11)
    assert tok.convert_ids_to_tokens([11, 12]) == ["<pad>", "t12"]


def _run(side: str, tmp_path: Path) -> dict:
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(BENCH / "dpo_step.py"), "--side", side, "--tiny", "--prompt", "12", "--answer", "6",
           "--steps", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    return row


@pytest.mark.slow
def test_magistune_side_runs_on_the_tiny_model(tmp_path):
    row = _run("magistune", tmp_path)
    assert (row["side"], row["tokens_per_step"], row["layers"]) == ("magistune", 2 * (12 + 6), 2)
    assert math.isclose(row["first_loss"], math.log(2), abs_tol=1e-5)  # policy = reference at step 1
    assert row["lora_dropout_run"] == 0.05 and row["tokens_per_s"] > 0 and row["peak_gib"] is None


@pytest.mark.slow
def test_trl_side_runs_on_the_tiny_model(tmp_path):
    pytest.importorskip("trl", reason="TRL is a benchmark-only dependency (carried to the GPU host as a wheel)")
    row = _run("trl", tmp_path)
    assert (row["side"], row["tokens_per_step"], row["trl"]) == ("trl", 2 * (12 + 6), "1.16.0")
    assert row["lora_dropout_run"] == 0.05  # TRL's disable_dropout turned off: the same LoRA dropout as ours


def _row(side: str, tok_s: float, peak: float) -> dict:
    return {"side": side, "prompt": 1024, "answer": 1024, "layers": 40, "tiny": False, "nf4": True, "steps": 4,
            "warmup": 1, "tokens_per_s": tok_s, "s_per_step": 4096 / tok_s, "peak_gib": peak, "adapter_dtype": "x",
            "lora_dropout_run": 0.05, "date": "d", "gpu": "g", "torch": "t", "transformers": "t", "peft": "p",
            "bitsandbytes": "b", "trl": "1.16.0"}


def test_report_ratio_against_the_goal():
    md = table([_row("magistune", 3600.0, 17.0), _row("trl", 2400.0, 17.4)])
    assert "1.50× the tok/s" in md and "Goal (≥ 1.5× the tok/s at ≤ TRL's memory): met" in md
    assert "| magistune | 1024 + 1024 | 3,072 |" in md and "| trl | 1024 + 1024 | 4,096 |" in md
    assert "not met" in table([_row("magistune", 3600.0, 17.5), _row("trl", 2400.0, 17.4)])
