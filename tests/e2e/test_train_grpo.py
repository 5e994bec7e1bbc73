"""`magistune train` with rl: grpo end to end on tiny-random: the demo learns its reward, a killed run resumes to the
same completions and losses, a failing reward function stops the run naming itself and the prompt."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml

from magistune.train.checkpoint import is_complete, list_checkpoints, read_state
from test_train_cli import rows, run, start

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _samples(out: Path) -> dict[int, list]:
    by_step: dict[int, list] = {}
    for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        by_step.setdefault(r["step"], []).append((r["completion"], r["reward"]))
    return by_step


def test_the_demo_learns_its_reward(tmp_path):
    shutil.copytree(EXAMPLES / "data", tmp_path / "data")
    shutil.copy(EXAMPLES / "rewards.py", tmp_path)
    cfg = yaml.safe_load((EXAMPLES / "demo-tiny-grpo.yaml").read_text(encoding="utf-8"))
    cfg.update(output_dir="out", max_steps=8)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    rc, log = run(path, timeout=500)
    assert rc == 0, log
    metrics = rows(tmp_path / "out", "reward")
    assert sorted(metrics) == list(range(1, 9))
    first, last = metrics[1]["reward"], max(metrics[s]["reward"] for s in (6, 7, 8))
    assert last > first + 0.2, [metrics[s]["reward"] for s in metrics]
    for key in ("loss", "reward_std", "rewards/rewards.lowercase_share", "completion_length", "clip_ratio",
                "filtered_groups"):
        assert key in metrics[1]
    assert len(_samples(tmp_path / "out")[1]) == 4
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "tekken.json").is_file()


def _write(root: Path, name: str, **keys) -> Path:
    cfg = {"base_model": "tiny-random", "datasets": [{"path": "data.jsonl"}], "sequence_len": 256, "rl": "grpo",
           "trl": {"num_generations": 2, "max_completion_length": 8, "temperature": 1.0, "num_iterations": 2,
                   "loss_type": "grpo", "beta": 0.04, "reward_funcs": ["rewards.lowercase_share", "overlong_penalty"]},
           "adapter": "lora", "lora_target_linear": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
           "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 5, "save_steps": 1,
           "learning_rate": 5e-3, "output_dir": f"out-{name}", **keys}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grpo")
    shutil.copy(EXAMPLES / "data" / "grpo_math.jsonl", root / "data.jsonl")
    shutil.copy(EXAMPLES / "rewards.py", root)
    return root


def test_sigkill_then_resume_samples_and_trains_the_same(workdir):
    """LoRA dropout (global RNG), num_iterations 2 (rollouts reused across a checkpoint), beta > 0 (reference pass
    with the adapters disabled): the resumed run repeats the uninterrupted one's completions and losses."""
    rc, log = run(_write(workdir, "ref"), timeout=400)
    assert rc == 0, log
    out = workdir / "out-killed"
    proc = start(_write(workdir, "killed"))
    deadline = time.monotonic() + 300
    while not is_complete(out / "checkpoint-1") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    last = list_checkpoints(out)[-1]
    assert read_state(last)["step"] < 5
    rc, log = run(_write(workdir, "killed", resume_from_checkpoint="auto"), timeout=400)
    assert rc == 0, log
    assert f"resuming from {last}" in log

    ref, resumed = rows(workdir / "out-ref", "loss"), rows(out, "loss")
    assert sorted(resumed) == sorted(ref) == list(range(1, 6))
    for step in ref:
        for key in ("loss", "reward", "kl", "grad_norm"):
            assert resumed[step][key] == pytest.approx(ref[step][key], abs=1e-6), (step, key)
    assert _samples(out) == _samples(workdir / "out-ref")


def test_a_failing_reward_function_names_itself_and_the_prompt(workdir):
    (workdir / "bad_rewards.py").write_text(
        "def picky(prompts, completions, answer, **kw):\n"
        "    if '15' in answer:\n"
        "        raise ValueError('no 15s')\n"
        "    return [0.0] * len(completions)\n", encoding="utf-8")
    path = _write(workdir, "bad", trl={"num_generations": 2, "max_completion_length": 4,
                                       "reward_funcs": ["bad_rewards.picky"]}, micro_batch_size=32,
                  gradient_accumulation_steps=2)  # every prompt in the first step
    rc, log = run(path, timeout=300)
    assert rc == 1, log
    assert "reward function bad_rewards.picky raised ValueError: no 15s (on the prompt of data.jsonl:13)" in log


def test_several_gpus_are_refused_clearly(workdir):
    import subprocess
    import sys

    from test_train_cli import ENV

    proc = subprocess.run([sys.executable, "-m", "magistune", "train", str(_write(workdir, "multi")), "--nproc", "2"],
                          cwd=workdir, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "rl: grpo: GRPO on several GPUs is not implemented yet" in proc.stderr
