"""sequence_len 131,072 through the whole pipeline on the CPU: data, packing, training, eval, then `chat` with a long
prompt, with a tiny model whose config.json allows 131,072 positions (tiny-random has 40,960).

What this guards against is memory that grows with T²: a dense B × 1 × T × T attention mask alone is 16 GiB of
booleans for one 131,072-token row (packed rows now attend sample by sample, right-padded rows causally, and the
prefill of generation computes one position's logits). The row here is one packed row of ~120,000 tokens; one
sample of 131,072 tokens would cost the CPU minutes of attention arithmetic (T² FLOPs), not memory, so the long
single sequences are the chat's 10,000-token prompt and a 10,000-token training sample. Measured: ~80 s on 2 loaded
CPU cores; a 60,000-token chat prompt took 41 s and 0.9 GB (linear memory).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from magistune.model_files.tiny import materialize_tiny
from magistune.train.metrics import read_metrics

pytestmark = pytest.mark.slow

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def long_tiny_model(root: Path) -> Path:
    """tiny-random's folder with max_position_embeddings 131,072 (RoPE needs nothing else)."""
    target = root / "tiny-long"
    shutil.copytree(materialize_tiny("tiny-random"), target)
    config = json.loads((target / "config.json").read_text())
    config["max_position_embeddings"] = 131072
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_131072_tokens_train_eval_and_chat(tmp_path):
    rng = random.Random(0)
    model = long_tiny_model(tmp_path)
    records = [[words(rng, 900), words(rng, 3)] for _ in range(110)] + [[words(rng, 10000), "ok"]]
    with open(tmp_path / "data.jsonl", "w") as f:
        for user, answer in records:
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    cfg = {"base_model": str(model), "datasets": [{"path": "data.jsonl"}], "sequence_len": 131072,
           "sample_packing": True, "val_set_size": 3, "adapter": "lora", "lora_target_linear": True, "lora_r": 4,
           "max_steps": 1, "gradient_checkpointing": True, "output_dir": "out", "bf16": False}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run = subprocess.run([sys.executable, "-m", "magistune", "train", "c.yaml"], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "1 row of ≤ 131072 tokens" in run.stderr, run.stderr[-3000:]
    tokens = int(run.stderr.split(" train tokens")[0].rsplit(", ", 1)[1])
    assert 100_000 < tokens <= 131072  # one row, nearly full
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert any("eval_loss" in r for r in rows) and rows[0]["loss"] > 0

    prompt = words(rng, 10000)  # 10,000 tokens in one user turn (a word is a token)
    chat = subprocess.run([sys.executable, "-m", "magistune", "chat", "c.yaml", "--color", "never", "--temperature",
                           "0", "--max-tokens", "3"], cwd=tmp_path, env=ENV, input=prompt + "\n",
                          capture_output=True, text=True, timeout=600)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert "[stopped: max_tokens reached]" in chat.stdout + chat.stderr
