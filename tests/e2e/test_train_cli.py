"""`python -m magistune train cfg.yaml` end to end on tiny-random: outputs, reloading, SIGKILL + resume, SIGINT.

Every run is a real subprocess on the CPU, a few steps of a few short conversations. The truth comes from the
libraries: transformers computes the eval loss of the reloaded outputs, PEFT loads the adapter, TensorBoard
reads the events, and an uninterrupted run is the reference for a resumed one.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from magistune.config import Config, load_config, parse_config
from magistune.train.checkpoint import is_complete, list_checkpoints, read_state

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[2] / "examples" / "data" / "demo.jsonl"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """8 conversations of the demo set (chat, thinking, tool calls) and a tokenisation cache shared by all runs."""
    root = tmp_path_factory.mktemp("train_cli")
    lines = [line for line in DEMO.read_text(encoding="utf-8").splitlines() if line.strip()][:8]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_cfg(root: Path, name: str, **keys) -> Path:
    cfg = {"base_model": "tiny-random", "datasets": [{"path": "data.jsonl"}], "sequence_len": 512,
           "dataset_prepared_path": "prepared", "val_set_size": 2, "micro_batch_size": 2,
           "gradient_accumulation_steps": 2, "learning_rate": 1e-3, "output_dir": f"out-{name}", **keys}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def start(cfg_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "magistune", "train", str(cfg_path)], cwd=cfg_path.parent,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(cfg_path: Path, timeout: float = 240) -> tuple[int, str]:
    proc = start(cfg_path)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def rows(out_dir: Path, key: str) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if key in r}


def hf_eval_loss(model, cfg: Config) -> float:
    """The token-mean eval loss by transformers' own shifted cross-entropy, sample by sample."""
    from magistune.data.build import prepare_data

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for s in prepare_data(cfg, progress=False).eval:
            n = sum(1 for t in s.labels[1:] if t != -100)
            loss = model(input_ids=torch.tensor([s.input_ids]), labels=torch.tensor([s.labels])).loss
            total, count = total + float(loss) * n, count + n
    return total / count


def reload_output(cfg: Config, out: Path):
    from peft import PeftModel
    from transformers import MistralForCausalLM

    from magistune.model import load_model, resolve_model_dir

    if cfg.adapter is None:
        return MistralForCausalLM.from_pretrained(out, dtype=torch.float32)
    base, _ = load_model(cfg, resolve_model_dir(cfg.base_model), torch.device("cpu"))
    return PeftModel.from_pretrained(base, out)


@pytest.mark.parametrize("keys", [
    {"adapter": "lora", "lora_target_linear": True, "lora_r": 4, "lora_alpha": 8},
    {"adapter": "qlora", "load_in_4bit": True, "lora_target_linear": True, "lora_r": 4, "lora_alpha": 8},
    {"optimizer": "adamw_torch_fused"},
], ids=["lora", "qlora", "full"])
def test_train_writes_every_output(workdir, keys):
    from magistune.tokenizer import tiny_tokenizer_path

    name = keys.get("adapter", "full")
    cfg_path = write_cfg(workdir, name, max_steps=2, eval_steps=1, save_steps=1, save_total_limit=1, **keys)
    rc, log = run(cfg_path)
    assert rc == 0, log
    cfg, _ = load_config(cfg_path)
    out = cfg.out_dir

    weights = {"adapter_config.json", "adapter_model.safetensors"} if cfg.adapter else {"config.json", "model.safetensors"}
    assert weights <= {p.name for p in out.iterdir()}
    assert (out / "tekken.json").read_bytes() == tiny_tokenizer_path().read_bytes()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # config.yaml: every key written out, and itself a valid config.
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert set(resolved) == set(Config.model_fields) - {"config_dir"}
    again, _ = parse_config(resolved)
    assert again.adapter == cfg.adapter and again.max_steps == 2 and Path(again.output_dir) == out.resolve()

    # metrics.jsonl: a train row per step, an eval row per eval (each step, and the end).
    train = rows(out, "loss")
    assert sorted(train) == [1, 2]
    for r in train.values():
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens", "peak_mem_gb"} <= set(r)
        assert r["loss"] > 0 and r["trained_tokens"] > 0 and r["tokens_per_s"] > 0
    evals = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in l]
    assert [e["step"] for e in evals] == [1, 2]
    assert all(e["eval_ppl"] == pytest.approx(math.exp(e["eval_loss"])) for e in evals)

    # TensorBoard reads the same steps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([train[1]["loss"], train[2]["loss"]], rel=1e-6)

    # Checkpoints: the one at the end stays (save_total_limit: 1), complete.
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert read_state(out / "checkpoint-2")["step"] == 2

    # The saved output, reloaded by transformers/PEFT, gives the eval loss the run logged at the end.
    model = reload_output(cfg, out)
    assert hf_eval_loss(model, cfg) == pytest.approx(evals[-1]["eval_loss"], rel=1e-4)


def test_sigkill_then_resume_repeats_the_uninterrupted_run(workdir):
    keys = dict(adapter="lora", lora_target_linear=True, lora_r=4, lora_alpha=8, lora_dropout=0.1,  # dropout: RNG
                learning_rate=5e-3, max_steps=8, save_steps=2, eval_steps=3, weight_decay=0.01)
    # 6 train samples / 2 per micro-batch / 2 accum = 2 steps per epoch: 8 steps cross 3 epoch boundaries.
    rc, log = run(write_cfg(workdir, "ref", **keys))
    assert rc == 0, log

    cfg_path = write_cfg(workdir, "killed", **keys)
    out = workdir / "out-killed"
    proc = start(cfg_path)
    deadline = time.monotonic() + 200
    while not is_complete(out / "checkpoint-2") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    last = list_checkpoints(out)[-1]
    assert read_state(last)["step"] < 8

    rc, log = run(write_cfg(workdir, "killed", resume_from_checkpoint="auto", **keys))
    assert rc == 0, log
    assert f"resuming from {last}" in log

    ref, resumed = rows(workdir / "out-ref", "loss"), rows(out, "loss")
    assert sorted(resumed) == sorted(ref) == list(range(1, 9))
    for step in ref:
        assert resumed[step]["loss"] == pytest.approx(ref[step]["loss"], abs=1e-4), step
        assert resumed[step]["lr"] == pytest.approx(ref[step]["lr"], rel=1e-9)
    ref_eval, resumed_eval = rows(workdir / "out-ref", "eval_loss"), rows(out, "eval_loss")
    assert sorted(ref_eval) == sorted(resumed_eval) == [3, 6, 8]
    for step in ref_eval:
        assert resumed_eval[step]["eval_loss"] == pytest.approx(ref_eval[step]["eval_loss"], abs=1e-4)


def test_sigint_saves_a_checkpoint_and_exits_130(workdir):
    cfg_path = write_cfg(workdir, "sigint", max_steps=500, adapter="lora", lora_target_linear=True)
    out = workdir / "out-sigint"
    proc = start(cfg_path)
    deadline = time.monotonic() + 200
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "metrics.jsonl").is_file() and rows(out, "loss"):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, log
    assert "interrupted after step" in log
    (ckpt,) = list_checkpoints(out)
    logged = max(rows(out, "loss"))
    assert read_state(ckpt)["step"] == logged == int(ckpt.name.split("-")[1])
    assert logged < 500


def test_memory_options_train_the_same_curve(workdir):
    """tiled_mlp, the liger swaps (plain torch on the CPU, said in a note) and pad_to_sequence_len change how the
    step is computed, not what: the per-step losses, gradient norms and eval losses equal a plain run's."""
    lora = {"adapter": "lora", "lora_target_linear": True, "lora_r": 4, "lora_alpha": 8, "max_steps": 3,
            "eval_steps": 3, "gradient_checkpointing": True}  # no dropout: shards draw other masks
    curves = {}
    for name, keys in {"plain": {}, "memory": {"tiled_mlp": True, "tiled_mlp_num_shards": 3, "liger_rms_norm": True,
                                                "liger_glu_activation": True, "pad_to_sequence_len": True}}.items():
        rc, log = run(write_cfg(workdir, f"mem-{name}", **lora, **keys))
        assert rc == 0, log
        curves[name] = [json.loads(line) for line in (workdir / f"out-mem-{name}" / "metrics.jsonl").read_text().splitlines()]
        if name == "memory":
            assert "tiled_mlp: 2 MLPs run in 3 checkpointed shards" in log and "liger kernels need a CUDA GPU" in log
    assert [r["step"] for r in curves["plain"]] == [r["step"] for r in curves["memory"]]
    for a, b in zip(curves["plain"], curves["memory"]):
        for key in ("loss", "grad_norm", "eval_loss", "trained_tokens"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
