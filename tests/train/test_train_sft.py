"""train(cfg) in process: bad configs fail before any weight loads; NaN and OOM stop cleanly; it overfits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from magistune import cli
from magistune.config import load_config
from magistune.train import checkpoint as ckpt
from magistune.train.loss import token_loss_sum
from magistune.train.preflight import preflight

DEMO = Path(__file__).resolve().parents[2] / "examples" / "data" / "demo.jsonl"


@pytest.fixture
def make(tmp_path):
    """make(**keys) → a config file in tmp_path training tiny-random on 4 demo conversations."""
    lines = [line for line in DEMO.read_text(encoding="utf-8").splitlines() if line.strip()][:4]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def write(**keys) -> Path:
        cfg = {"base_model": "tiny-random", "datasets": [{"path": "data.jsonl"}], "sequence_len": 512,
               "micro_batch_size": 2, "max_steps": 3, "learning_rate": 1e-3, "output_dir": "out", **keys}
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        return path

    return write


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load the model fails the test: the error must come first."""
    def refuse(*a, **kw):
        raise AssertionError("weights were loaded before the config error was reported")

    monkeypatch.setattr("magistune.train.sft.build_model", refuse)


def train_rc(path: Path, capsys) -> tuple[int, str]:
    rc = cli.main(["train", str(path)])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("keys,message", [
    ({"datasets": [{"path": "missing.jsonl"}]}, "datasets[0].path: missing.jsonl: dataset file not found"),
    ({"base_model": "./no-such-model"}, "model folder not found"),
    ({"resume_from_checkpoint": "checkpoint-9"}, "resume_from_checkpoint:"),
    ({"tokenizer_path": "nope/tekken.json"}, "tokenizer_path:"),
    ({"adapter": "qlora", "lora_target_linear": True}, "adapter: qlora needs load_in_4bit: true"),
    ({"warmup_steps": 2, "warmup_ratio": 0.1}, "set warmup_steps or warmup_ratio, not both"),
    ({"lora_model_dir": "adapter"}, "lora_model_dir: continues training a saved adapter"),
    ({"optimizer": "adamw_9bit"}, "optimizer:"),
])
def test_bad_config_fails_before_weights_load(make, capsys, no_weights, keys, message):
    rc, err = train_rc(make(**keys), capsys)
    assert rc == 2
    assert message in err


def test_unwritable_output_dir(make, capsys, no_weights, tmp_path):
    (tmp_path / "blocked").write_text("a file where the output folder should be")
    rc, err = train_rc(make(output_dir="blocked/run"), capsys)
    assert rc == 2 and "output_dir:" in err and "blocked is a file, not a folder" in err


def test_paged_optimizer_on_cpu_is_a_note_not_an_error(make):
    cfg, _ = load_config(make(optimizer="paged_adamw_8bit"))
    assert any("paged_adamw_8bit" in n and "only on CUDA" in n for n in preflight(cfg).notes)


def failing_loss(monkeypatch, at_call: int, failure):
    """The loss function of the run fails at its `at_call`-th call (one call per step: accumulation 1, no eval)."""
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        value = token_loss_sum(model, batch)
        return failure(value) if calls["n"] == at_call else value

    monkeypatch.setattr("magistune.train.sft.loss_fn_for", lambda cfg: loss)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(make, capsys, monkeypatch, fast_tokenizer):
    failing_loss(monkeypatch, 3, lambda v: v * float("nan"))
    path = make(max_steps=5, save_steps=2)
    rc, err = train_rc(path, capsys)
    out = path.parent / "out"
    assert rc == 1
    assert "loss is nan at step 3" in err and "checkpoint-2" in err
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert not (out / "model.safetensors").exists()  # no final model from a failed run


def test_loss_watchdog_stops_a_run_whose_loss_stays_high(make, capsys, fast_tokenizer):
    """Axolotl's loss_watchdog_threshold/_patience: tiny-random's loss (about 11.8) stays above 5 for 2 steps in a
    row, so the run stops at step 2, before that step's optimizer update, keeping checkpoint-1."""
    path = make(max_steps=5, save_steps=1, loss_watchdog_threshold=5.0, loss_watchdog_patience=2)
    rc, err = train_rc(path, capsys)
    out = path.parent / "out"
    assert rc == 1
    assert "loss above loss_watchdog_threshold 5 for 2" in err and "checkpoint-1" in err
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1"]


def test_out_of_memory_is_explained(make, capsys, monkeypatch, fast_tokenizer):
    def oom(_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    failing_loss(monkeypatch, 2, oom)
    rc, err = train_rc(make(micro_batch_size=2, gradient_accumulation_steps=1), capsys)
    assert rc == 1
    assert "out of memory at step 2" in err
    for option in ("micro_batch_size: 1 with gradient_accumulation_steps: 2", "gradient_checkpointing: true",
                   "adapter: qlora", "sequence_len"):
        assert option in err


@pytest.mark.slow
def test_overfits_a_few_samples(make, capsys, fast_tokenizer):
    """Full fine-tuning memorises 4 conversations: the loss falls by at least 90%."""
    path = make(micro_batch_size=4, max_steps=25, learning_rate=1.5e-2, optimizer="adamw_torch_fused",
                lr_scheduler="constant", warmup_steps=2)
    rc, err = train_rc(path, capsys)
    assert rc == 0, err
    losses = [r["loss"] for r in map(json.loads, (path.parent / "out" / "metrics.jsonl").read_text().splitlines())]
    assert len(losses) == 25
    assert losses[-1] <= 0.1 * losses[0], losses


def test_full_fine_tune_resumes_exactly(make, capsys, fast_tokenizer):
    """A full run that 'died' after checkpoint-2 (its later checkpoint and outputs removed, its later metric rows
    left in place) and is resumed gives the uninterrupted run's losses; the model comes from checkpoint-2."""
    import shutil

    path = make(max_steps=4, save_steps=2, learning_rate=5e-3, weight_decay=0.01, val_set_size=1, eval_steps=3)
    assert train_rc(path, capsys)[0] == 0
    out = path.parent / "out"
    reference = (out / "metrics.jsonl").read_text()
    shutil.rmtree(out / "checkpoint-4")
    (out / "model.safetensors").unlink()

    rc, err = train_rc(make(max_steps=4, save_steps=2, learning_rate=5e-3, weight_decay=0.01, val_set_size=1,
                            eval_steps=3, resume_from_checkpoint="auto"), capsys)
    assert rc == 0, err
    assert "resumed at step 2 of 4" in err
    ref = [json.loads(line) for line in reference.splitlines()]
    got = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], sorted(r)) for r in got] == [(r["step"], sorted(r)) for r in ref]
    for a, b in zip(ref, got):
        for key in ("loss", "eval_loss", "lr", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-4), (a["step"], key)


def test_disk_full_during_a_save_is_a_message_not_a_traceback(make, capsys, monkeypatch, fast_tokenizer):
    import errno
    import shutil
    from collections import namedtuple

    real_save, calls = torch.save, {"n": 0}

    def full_on_second_save(obj, f, *a, **kw):
        if str(f).endswith("optimizer.pt"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_on_second_save)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 5 * 10**6, 5 * 10**6))
    path = make(max_steps=4, save_steps=2)
    rc, err = train_rc(path, capsys)
    out = path.parent / "out"
    assert rc == 1
    assert f"error: no space left on {out}" in err and "0.0 GB free" in err and "Traceback" not in err
    assert "warning: 0.0 GB free" in err  # said before the save that failed
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]
    assert not list(out.glob(".checkpoint-*"))


# --- output_dir belongs to one run (issue 12, items 2, 3, 7) ------------------------------------------------

def test_a_second_run_into_an_earlier_runs_output_dir_is_refused(make, capsys, fast_tokenizer):
    path = make(max_steps=2, save_steps=2)
    assert train_rc(path, capsys)[0] == 0
    out = path.parent / "out"
    metrics = (out / "metrics.jsonl").read_text()
    rc, err = train_rc(path, capsys)
    assert rc == 2
    assert f"output_dir: {out} holds an earlier run (" in err and "last checkpoint: checkpoint-2" in err
    assert "resume_from_checkpoint: auto" in err and "overwrite_output_dir: true" in err
    assert (out / "metrics.jsonl").read_text() == metrics


def test_overwrite_output_dir_replaces_the_earlier_run(make, capsys, fast_tokenizer):
    assert train_rc(make(max_steps=4, save_steps=2), capsys)[0] == 0
    path = make(max_steps=2, save_steps=1, save_total_limit=1, overwrite_output_dir=True)
    rc, err = train_rc(path, capsys)
    out = path.parent / "out"
    assert rc == 0, err
    assert "overwrite_output_dir: deleted the earlier run's checkpoint-2, checkpoint-4, config.json" in err
    # rotation kept the new run's newest checkpoint, not the old run's step 4
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]
    assert ckpt.read_state(out / "checkpoint-2")["total_steps"] == 2
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_refuses_a_checkpoint_of_another_schedule_or_data(make, capsys, fast_tokenizer):
    assert train_rc(make(max_steps=4, save_steps=2), capsys)[0] == 0
    rc, err = train_rc(make(max_steps=2, resume_from_checkpoint="auto"), capsys)
    assert rc == 2 and "checkpoint-4 is at step 4, past the 2 steps" in err  # not "resumed at step 4 of 2"
    rc, err = train_rc(make(max_steps=6, sequence_len=256, resume_from_checkpoint="auto"), capsys)
    assert rc == 2 and "saved by a run with other settings" in err
    assert "sequence_len: 512 → 256" in err and "max_steps: 4 → 6" in err and "resume_ignore_config_changes" in err
    rc, err = train_rc(make(max_steps=6, resume_from_checkpoint="auto", resume_ignore_config_changes=True), capsys)
    assert rc == 0, err
    assert "resuming checkpoint-4 although max_steps: 4 → 6" in err and "resumed at step 4 of 6" in err


def test_output_dir_beside_the_users_config_yaml_is_refused(tmp_path, capsys, no_weights):
    import shutil

    shutil.copyfile(DEMO, tmp_path / "data.jsonl")
    own = tmp_path / "config.yaml"
    text = yaml.safe_dump({"base_model": "tiny-random", "datasets": [{"path": "data.jsonl"}], "max_steps": 1,
                           "output_dir": "."})
    own.write_text(text, encoding="utf-8")
    rc, err = train_rc(own, capsys)
    assert rc == 2 and "holds a config.yaml that magistune did not write" in err
    assert own.read_text(encoding="utf-8") == text


def test_a_run_holding_the_output_dir_lock_refuses_a_second(make, capsys, no_weights):
    from magistune.train.run_dir import lock_output_dir

    path = make()
    (path.parent / "out").mkdir()
    lock = lock_output_dir(path.parent / "out")
    rc, err = train_rc(path, capsys)
    lock.release()
    assert rc == 2 and f"is in use by another magistune run (pid {os.getpid()}" in err


# --- sequence_len against the model and the memory (issue 12, item 8) ----------------------------------------

def test_sequence_len_beyond_the_models_positions_fails_before_weights_load(make, capsys, no_weights):
    rc, err = train_rc(make(sequence_len=100_000), capsys)
    assert rc == 2 and "sequence_len: 100000 is longer than the model's max_position_embeddings 40960" in err
    assert "config.json" in err


def test_padded_batches_that_cannot_fit_in_ram_fail_before_weights_load(make, capsys, no_weights, monkeypatch):
    monkeypatch.setattr("magistune.train.preflight.available_ram", lambda: 8 * 10**9)
    rc, err = train_rc(make(sequence_len=32768, pad_to_sequence_len=True, micro_batch_size=1,
                            attn_implementation="eager"), capsys)
    assert rc == 2
    assert "micro_batch_size 1 × 4 heads × 32768² × 4 bytes = 17.2 GB, more than the 8.0 GB of RAM" in err
    assert "pad_to_sequence_len: false" in err


def test_sdpa_keeps_no_score_matrix_so_padded_batches_pass(monkeypatch):
    """Right-padded rows run causal without a mask (loss.token_loss_sum) through the CPU's flash kernel."""
    from types import SimpleNamespace

    from magistune.config import parse_config
    from magistune.train.preflight import check_padded_batch_fits

    monkeypatch.setattr("magistune.train.preflight.available_ram", lambda: 8 * 10**9)
    cfg, _ = parse_config({"base_model": "tiny-random", "datasets": [{"path": "d.jsonl"}], "sequence_len": 32768,
                           "pad_to_sequence_len": True})
    check_padded_batch_fits(cfg, SimpleNamespace(num_attention_heads=4))
