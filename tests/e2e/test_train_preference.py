"""`python -m magistune train` with `rl:` end to end on tiny-random: each loss, the reloaded output's eval loss by
plain transformers forwards, SIGKILL + resume, and the DPO demo's reward accuracy.

Every run is a real subprocess on the CPU, a few steps of a few short pairs (examples/data/demo_dpo.jsonl).
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from magistune.config import load_config
from magistune.train.checkpoint import is_complete, list_checkpoints, read_state
from test_train_cli import reload_output, rows, run, start

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PAIRS = EXAMPLES / "data" / "demo_dpo.jsonl"
REWARDS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")
LORA = dict(adapter="lora", lora_target_linear=True, lora_r=4, lora_alpha=8)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """12 pairs of the demo set, and the same as 12 KTO examples (even: chosen, desirable; odd: rejected)."""
    root = tmp_path_factory.mktemp("train_pref")
    records = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines()[:12]]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    kto = []
    for i, r in enumerate(records):
        prompt = r.get("prompt") or r["chosen"][:-1]
        answer = (r["chosen"] if i % 2 == 0 else r["rejected"])[-1:]
        kto.append({"prompt": prompt, "completion": answer, "label": i % 2 == 0})
    (root / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kto), encoding="utf-8")
    return root


def write_cfg(root: Path, name: str, rl: str, **keys) -> Path:
    cfg = {"base_model": "tiny-random", "datasets": [{"path": "kto.jsonl" if rl == "kto" else "pairs.jsonl"}],
           "rl": rl, "sequence_len": 512, "dataset_prepared_path": "prepared", "val_set_size": 2,
           "micro_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-3,
           "output_dir": f"out-{name}", **keys}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


@torch.no_grad()
def plain_logps(model, ids: list[int], labels: list[int]) -> float:
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    return sum(logp[t - 1, labels[t]].item() for t in range(1, len(ids)) if labels[t] != -100)


def dpo_eval_loss_by_hand(cfg, out: Path) -> float:
    """Mean over the eval pairs of −log σ(β·((π_c − π_r) − (ref_c − ref_r))), each log-prob from an ordinary
    transformers forward of prompt + answer: the reloaded adapter for π, its base model for ref."""
    from magistune.data.build import prepare_data

    policy = reload_output(cfg, out).eval()
    losses = []
    for s in prepare_data(cfg, progress=False).eval:
        pc, pr = (plain_logps(policy, s.chosen_input_ids, s.chosen_labels),
                  plain_logps(policy, s.rejected_input_ids, s.rejected_labels))
        with policy.disable_adapter():
            rc, rr = (plain_logps(policy, s.chosen_input_ids, s.chosen_labels),
                      plain_logps(policy, s.rejected_input_ids, s.rejected_labels))
        losses.append(-F.logsigmoid(torch.tensor(cfg.rl_beta * ((pc - pr) - (rc - rr)))).item())
    return sum(losses) / len(losses)


@pytest.mark.parametrize("rl,keys", [
    ("dpo", LORA), ("ipo", LORA), ("orpo", LORA), ("simpo", LORA), ("kto", LORA),
    ("dpo", {"optimizer": "adamw_torch_fused"}),  # full fine-tune: the precomputed reference table
], ids=["dpo", "ipo", "orpo", "simpo", "kto", "dpo-full"])
def test_each_loss_trains_through_the_cli(workdir, rl, keys):
    name = f"{rl}-{keys.get('adapter', 'full')}"
    cfg_path = write_cfg(workdir, name, rl, max_steps=2, eval_steps=1, save_steps=1, save_total_limit=1, **keys)
    rc, log = run(cfg_path)
    assert rc == 0, log
    cfg, _ = load_config(cfg_path)
    out = cfg.out_dir
    weights = {"adapter_config.json", "adapter_model.safetensors"} if cfg.adapter else {"config.json", "model.safetensors"}
    assert weights | {"tekken.json", "config.yaml", "loss.png"} <= {p.name for p in out.iterdir()}
    train = rows(out, "loss")
    assert sorted(train) == [1, 2]
    for r in train.values():
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "pairs", *REWARDS} <= set(r)
        assert math.isfinite(r["loss"]) and r["pairs"] == 4
    evals = rows(out, "eval_loss")
    assert sorted(evals) == [1, 2] and all(math.isfinite(e["eval_loss"]) for e in evals.values())
    assert {f"eval_{k}" for k in REWARDS} <= set(evals[2])
    if rl in ("dpo", "ipo", "kto"):  # step 1: policy = reference, so every reward is 0
        assert train[1]["reward_chosen"] == 0 and train[1]["reward_rejected"] == 0
    if rl == "dpo":
        assert train[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    if rl == "dpo" and cfg.adapter:
        assert dpo_eval_loss_by_hand(cfg, out) == pytest.approx(evals[2]["eval_loss"], rel=1e-4)
    if not cfg.adapter:
        tables = list((workdir / "prepared").glob("*.ref-*.safetensors"))
        assert len(tables) == 1 and "reference log-probs: saved" in log


@pytest.mark.parametrize("rl,keys", [
    ("dpo", dict(LORA, lora_dropout=0.1)),  # dropout: the RNG must be restored too
    ("kto", {"optimizer": "adamw_torch_fused"}),  # full fine-tune: the reference table is reused on resume
], ids=["dpo-lora", "kto-full"])
def test_sigkill_then_resume_repeats_the_uninterrupted_run(workdir, rl, keys):
    keys = dict(keys, learning_rate=5e-3, max_steps=6, save_steps=2, eval_steps=3, weight_decay=0.01)
    # 10 train pairs / 2 per micro-batch / 2 accum = 3 steps per epoch: 6 steps cross an epoch boundary.
    rc, log = run(write_cfg(workdir, f"ref-{rl}", rl, **keys))
    assert rc == 0, log

    out = workdir / f"out-killed-{rl}"
    proc = start(write_cfg(workdir, f"killed-{rl}", rl, **keys))
    deadline = time.monotonic() + 200
    while not is_complete(out / "checkpoint-2") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    last = list_checkpoints(out)[-1]
    assert read_state(last)["step"] < 6

    rc, log = run(write_cfg(workdir, f"killed-{rl}", rl, resume_from_checkpoint="auto", **keys))
    assert rc == 0, log
    assert f"resuming from {last}" in log
    if rl == "kto":
        assert "reference log-probs: reused" in log
    ref, resumed = rows(workdir / f"out-ref-{rl}", "loss"), rows(out, "loss")
    assert sorted(resumed) == sorted(ref) == list(range(1, 7))
    for step in ref:
        for key in ("loss", "reward_margin", "reward_accuracy"):
            assert resumed[step][key] == pytest.approx(ref[step][key], abs=1e-4), (step, key)
    ref_eval, resumed_eval = rows(workdir / f"out-ref-{rl}", "eval_loss"), rows(out, "eval_loss")
    assert sorted(ref_eval) == sorted(resumed_eval) == [3, 6]
    for step in ref_eval:
        assert resumed_eval[step]["eval_loss"] == pytest.approx(ref_eval[step]["eval_loss"], abs=1e-4)


def test_dpo_demo_learns_its_preference(tmp_path):
    """examples/demo-tiny-dpo.yaml as shipped (output_dir moved): reward accuracy above 0.9, train and eval."""
    raw = yaml.safe_load((EXAMPLES / "demo-tiny-dpo.yaml").read_text())
    raw["datasets"][0]["path"] = str(EXAMPLES / "data" / "demo_dpo.jsonl")
    raw["output_dir"] = str(tmp_path / "out")
    cfg_path = tmp_path / "demo.yaml"
    cfg_path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    rc, log = run(cfg_path, timeout=400)
    assert rc == 0, log
    train, evals = rows(tmp_path / "out", "loss"), rows(tmp_path / "out", "eval_loss")
    assert train[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    last = [train[s] for s in sorted(train)[-4:]]
    assert min(r["reward_accuracy"] for r in last) > 0.9
    final = evals[max(evals)]
    assert final["eval_reward_accuracy"] > 0.9 and final["eval_loss"] < math.log(2) / 2
