"""The Hugging Face tokenizer path through the real CLI on tiny-random-hf: train (SFT with LoRA, and DPO) →
chat and generate → merge → GGUF export, each a subprocess. The tokenizer files travel with every output, and
the prompts and decoded text are the HF tokenizer's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
HF_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}


def cli(cwd: Path, *args: str, stdin: str | None = None, timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, "-m", "magistune", *args], cwd=cwd, env=ENV, input=stdin, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


def write_cfg(root: Path, name: str, data: str, **keys) -> Path:
    cfg = {"base_model": "tiny-random-hf", "datasets": [{"path": data}], "sequence_len": 512, "val_set_size": 2,
           "micro_batch_size": 2, "adapter": "lora", "lora_target_linear": True, "max_steps": 2,
           "learning_rate": 1e-3, "output_dir": f"out-{name}", **keys}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def test_sft_train_chat_generate_merge_export(tmp_path):
    lines = (ROOT / "examples" / "data" / "demo.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = write_cfg(tmp_path, "sft", "data.jsonl")
    out = cli(tmp_path, "train", cfg.name)
    assert "done: 2 steps" in out and "tokenizer.json" in out
    trained = tmp_path / "out-sft"
    assert HF_FILES <= {p.name for p in trained.iterdir()} and not (trained / "tekken.json").exists()
    assert HF_FILES <= {p.name for p in (trained / "checkpoint-2").iterdir()}

    (tmp_path / "prompts.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Hello"}]}) + "\n")
    cli(tmp_path, "generate", cfg.name, "--input", "prompts.jsonl", "--output", "gen.jsonl", "--max-tokens", "4",
        "--temperature", "0")
    (row,) = [json.loads(x) for x in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert row["tokens"] == 4 and isinstance(row["answer"], str) and row["answer"]
    chat = cli(tmp_path, "chat", cfg.name, "--max-tokens", "3", "--temperature", "0", stdin="Hello\n")
    assert "max_tokens" in chat

    cli(tmp_path, "merge", cfg.name, "--output", "merged")
    merged = tmp_path / "merged"
    assert HF_FILES <= {p.name for p in merged.iterdir()} and not (merged / "tekken.json").exists()
    cli(tmp_path, "export", "--model", "merged", "--format", "gguf", "--output", "gguf")
    gguf = pytest.importorskip("gguf")
    (path,) = (tmp_path / "gguf").glob("*.gguf")
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 131072


def test_dpo_trains_on_the_hf_tokenizer(tmp_path):
    lines = (ROOT / "examples" / "data" / "demo_dpo.jsonl").read_text(encoding="utf-8").splitlines()[:6]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = cli(tmp_path, "train", write_cfg(tmp_path, "dpo", "pairs.jsonl", rl="dpo").name)
    assert "done: 2 steps" in out
    assert HF_FILES <= {p.name for p in (tmp_path / "out-dpo").iterdir()}
