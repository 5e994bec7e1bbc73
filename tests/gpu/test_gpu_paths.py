"""CUDA-only paths: bitsandbytes NF4 on the GPU, bf16 autocast, 8-bit optimisers, generation with the KV cache.

Marked `gpu` and skipped without CUDA; run on the GPU host with `python3 -m pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[2]


def _train(tmp_path: Path, **overrides) -> tuple[subprocess.CompletedProcess, Path]:
    import yaml

    cfg = {
        "base_model": "tiny-random", "datasets": [{"path": str(ROOT / "examples/data/demo.jsonl")}],
        "sequence_len": 512, "val_set_size": 0.1, "adapter": "qlora", "load_in_4bit": True, "lora_r": 16,
        "lora_alpha": 32, "lora_target_linear": True, "micro_batch_size": 4, "gradient_accumulation_steps": 2,
        "max_steps": 8, "optimizer": "paged_adamw_8bit", "learning_rate": 2e-3, "bf16": "auto",
        "gradient_checkpointing": True, "save_steps": 4, "output_dir": str(tmp_path / "out"), **overrides,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "magistune", "train", str(path)], capture_output=True, text=True, timeout=600)
    return proc, tmp_path / "out"


def test_qlora_trains_on_cuda_in_bf16(tmp_path):
    proc, out = _train(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    assert all(r["peak_mem_gb"] > 0 for r in rows if "peak_mem_gb" in r)
    assert (out / "adapter_model.safetensors").is_file()
    assert "bfloat16" in proc.stderr  # bf16: auto resolved to bf16 on this GPU


def test_generate_on_cuda(tmp_path):
    proc, out = _train(tmp_path, max_steps=2, save_steps=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "What is the capital of Peru?"}]}) + "\n")
    gen = subprocess.run([sys.executable, "-m", "magistune", "generate", str(tmp_path / "cfg.yaml"), "--input", str(prompts),
                          "--output", str(tmp_path / "o.jsonl"), "--max-tokens", "16", "--seed", "0"],
                         capture_output=True, text=True, timeout=600)
    assert gen.returncode == 0, gen.stderr[-3000:]
    row = json.loads((tmp_path / "o.jsonl").read_text().splitlines()[0])
    assert row["tokens"] >= 1 and row["finish_reason"] in ("stop", "length")


def test_random_model_quantises_on_cuda():
    import bitsandbytes as bnb

    from magistune.config import parse_config
    from magistune.model_files import tiny_text_config

    sys.path.insert(0, str(ROOT / "bench"))
    from random_model import random_model

    cfg = parse_config({"base_model": "tiny-random", "datasets": [{"path": "x.jsonl"}], "adapter": "qlora",
                        "load_in_4bit": True, "lora_target_linear": True})[0]
    model, info = random_model(tiny_text_config(), cfg, torch.device("cuda"))
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.bnb_quantized and q.weight.device.type == "cuda"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(input_ids=torch.tensor([[1, 2, 3]], device="cuda")).logits
    assert torch.isfinite(logits).all()
