"""Token edits through the real CLI on tiny-random: a LoRA run with `added_tokens_overrides` (slot 25 renamed
<ANSWER>) and `tokens` (<CITE>, </CITE>) learns answers that use them; the output folder carries the rewritten
tekken.json (mistral-common loads it), generate and chat print the new names, evaluate reads the same samples, and
merge + GGUF export carry the tokenizer (the names in GGUF's vocabulary)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from magistune.tokenizer import tiny_tokenizer_path

pytestmark = pytest.mark.slow

ENV = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
QUESTIONS = ["What is the capital of France?", "Name France's capital.", "Capital of France?",
             "Which city is the capital of France?", "Tell me the French capital.", "France: capital city?",
             "Where is the seat of the French government?", "Quick: capital of France?"]
ANSWER = "<ANSWER> <CITE>Paris</CITE>"
PROMPT = "What is the capital of France? Cite with <CITE>."


def cli(*args: str, cwd: Path, stdin: str | None = None, timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, "-m", "magistune", *args], cwd=cwd, env=ENV, input=stdin,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("token_edits")
    with open(root / "data.jsonl", "w", encoding="utf-8") as f:
        for q in QUESTIONS:
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{q} Cite with <CITE>."},
                                             {"role": "assistant", "content": ANSWER}]}) + "\n")
    cfg = {"base_model": "tiny-random", "datasets": [{"path": "data.jsonl"}], "sequence_len": 256, "val_set_size": 2,
           "micro_batch_size": 4, "learning_rate": 2e-2, "lr_scheduler": "constant", "max_steps": 40,
           "adapter": "lora", "lora_target_linear": True, "lora_target_modules": ["lm_head"], "output_dir": "out",
           "added_tokens_overrides": {25: "<ANSWER>"}, "tokens": ["<CITE>", "</CITE>"],
           "special_tokens": {"bos_token": "<s>", "eos_token": "</s>"}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    (root / "prompts.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": PROMPT}]}) + "\n")
    out = cli("train", "cfg.yaml", cwd=root, timeout=600)
    assert "<ANSWER>" in out and "(new)" not in out  # the note on the rewritten tokenizer: slots, no growth
    return root


def test_output_carries_the_rewritten_tokenizer(run_dir):
    tok = MistralTokenizer.from_file(str(run_dir / "out" / "tekken.json")).instruct_tokenizer.tokenizer
    base = MistralTokenizer.from_file(str(tiny_tokenizer_path())).instruct_tokenizer.tokenizer
    assert tok.n_words == base.n_words
    assert [tok.id_to_piece(i) for i in (20, 21, 25)] == ["<CITE>", "</CITE>", "<ANSWER>"]
    config = json.loads((run_dir / "out" / "adapter_config.json").read_text())
    assert not config.get("modules_to_save")  # free slots: nothing grew


def test_generate_chat_and_evaluate_use_the_new_names(run_dir):
    cli("generate", "cfg.yaml", "--input", "prompts.jsonl", "--output", "gen.jsonl", "--temperature", "0",
        "--max-tokens", "12", cwd=run_dir)
    answer = json.loads((run_dir / "gen.jsonl").read_text())["answer"]
    # what 40 steps learn varies with the libraries; any of the new names printed is a named token decoded
    assert any(name in answer for name in ("<ANSWER>", "<CITE>", "</CITE>")), answer
    chat = cli("chat", "cfg.yaml", "--color", "never", "--temperature", "0", "--max-tokens", "12", cwd=run_dir,
               stdin=f"{PROMPT}\n/quit\n")
    assert answer in chat
    assert "loss" in cli("evaluate", "cfg.yaml", cwd=run_dir).lower()


def test_merge_and_gguf_export_carry_the_tokenizer(run_dir):
    import gguf

    cli("merge", "cfg.yaml", "--output", "merged", "--no-eval", cwd=run_dir)
    assert (run_dir / "merged" / "tekken.json").read_bytes() == (run_dir / "out" / "tekken.json").read_bytes()
    cli("export", "--model", "merged", "--format", "gguf", "--output", "model.gguf", cwd=run_dir)
    reader = gguf.GGUFReader(run_dir / "model.gguf")
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode() for i in field.data]
    kinds = reader.fields["tokenizer.ggml.token_type"]
    types = [int(kinds.parts[i][0]) for i in kinds.data]
    assert [tokens[i] for i in (20, 21, 25)] == ["<CITE>", "</CITE>", "<ANSWER>"]
    assert [types[i] for i in (20, 21, 25, 3)] == [gguf.TokenType.USER_DEFINED] * 3 + [gguf.TokenType.CONTROL]
    cli("export", "--model", "merged", "--format", "mistral", "--output", "native", cwd=run_dir)
    assert (run_dir / "native" / "tekken.json").read_bytes() == (run_dir / "out" / "tekken.json").read_bytes()
