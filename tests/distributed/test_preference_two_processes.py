"""Preference training (train/dpo_distributed.py) on two processes against one: FSDP2 and DDP, LoRA and full
fine-tunes (and QLoRA), DPO and KTO, train the same model as one process with the same global batch.

As test_two_processes.py: one torchrun launch (worker.py) runs every 2-process scenario on the CPU (gloo, fp32),
while this process trains the one-process references (train/dpo.py); then each test compares. 11 records of
the demo pairs (or the same as KTO examples): 8 train + 3 eval, so that with micro_batch_size 1 rank 1 runs an
uncounted filler batch in every eval. Global batch: one process with accumulation 2a sees the samples of 2 ranks
with accumulation a (rank r takes items r, r+2, … of each epoch's order); losses, rewards, gradient norms and
eval metrics must agree up to summation order. KTO's z₀ is the whole step's on both sides.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from magistune import cli
from magistune.train.metrics import read_metrics

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")]

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "examples" / "data" / "demo_dpo.jsonl"
WORKER = Path(__file__).resolve().parent / "worker.py"
# test_two_processes.py's CPU bounds for the loss and the gradient norm. Measured: loss and eval loss ≤ 2.2e-6
# relative, gradient norm ≤ 6.7e-6. A reward is β × a difference of two summed log-probs of 50-100 nats, whose
# fp32 rounding (the weights after an AdamW step differ in their last bits) moves it by ≤ 1.1e-5 absolute
# (measured, KTO eval); a counted filler or a per-rank z₀ would move it by a share of the reward itself (≥ 1e-2).
TOLERANCE = {"rel": 1e-5, "rel_norm": 1e-4, "abs": 1e-6, "reward_abs": 3e-5, "resume": 1e-6}
QLORA_REL = 1e-4  # QLoRA: eval loss after 2 AdamW steps measured 2.1e-5 relative (the update's fp32 noise)
REWARDS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")

BASE = {"base_model": "tiny-random", "sequence_len": 256, "val_set_size": 3, "lr_scheduler": "constant",
        "bf16": False, "ddp_timeout": 120, "eval_steps": 1, "micro_batch_size": 1}
LORA = {"adapter": "lora", "lora_target_linear": True, "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-2,
        "max_steps": 3, "save_steps": 2, "gradient_checkpointing": True}
FULL = {"learning_rate": 1e-3, "max_steps": 2, "save_steps": 2}  # precompute_ref_log_probs: true by default
QLORA = {**LORA, "adapter": "qlora", "load_in_4bit": True, "max_steps": 2, "gradient_checkpointing": False}

# name: (rl, keys, one-process accumulation, two-process accumulation, parallel keys)
RUNS = {
    "fsdp_lora_dpo": ("dpo", LORA, 4, 2, {"fsdp": True}),  # 2 micro-batches per rank, gradients reduced after both
    "ddp_lora_dpo": ("dpo", LORA, 4, 2, {"ddp": True}),
    # the fused LoRA kernels inside FSDP2's units (the reference pass, adapters off, takes PEFT's layers), against
    # the one-process run on PEFT's layers (single_lora_dpo)
    "fsdp_lora_dpo_kernels": ("dpo", LORA, 4, 2, {"fsdp": True, "lora_qkv_kernel": True, "lora_o_kernel": True,
                                                  "lora_mlp_kernel": True}),
    "ddp_lora_kto": ("kto", LORA, 4, 2, {"ddp": True}),  # the reference and z₀ with adapters off, through DDP's root
    # adapters off over 4-bit layers. Not FSDP2 on the CPU: bitsandbytes' CPU inference path (eval mode, no grad)
    # repacks a Linear4bit weight in place and flags its quant_state, and FSDP2's next all-gather brings back the
    # unpacked shards under that flag, so the eval after step 1 is wrong (SFT's too) unless
    # fsdp_reshard_after_forward: false. The CPU path does not exist on GPUs.
    "ddp_qlora_dpo": ("dpo", QLORA, 2, 1, {"ddp": True}),
    "fsdp_full_dpo": ("dpo", FULL, 2, 1, {"fsdp": True}),  # the reference table computed through FSDP's root
    "fsdp_full_kto": ("kto", FULL, 2, 1, {"fsdp": True}),
}


def write_data(root: Path) -> None:
    records = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines()[:11]]
    kto = []
    for i, r in enumerate(records):  # even: the chosen answer, desirable; odd: the rejected one
        prompt = r.get("prompt") or r["chosen"][:-1]
        kto.append({"prompt": prompt, "completion": (r["chosen"] if i % 2 == 0 else r["rejected"])[-1:],
                    "label": i % 2 == 0})
    (root / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (root / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kto), encoding="utf-8")


def write(root: Path, name: str, rl: str, **keys) -> Path:
    path = root / f"{name}.yaml"
    cfg = {**BASE, "datasets": [{"path": f"{rl}.jsonl"}], "rl": rl, "dataset_prepared_path": "prepared",
           "output_dir": f"out_{name}", **keys}
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def single(name: str) -> str:
    return "single_" + name.split("_", 1)[1].removesuffix("_kernels")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fast_tokenizer):
    root = tmp_path_factory.mktemp("dist_pref")
    write_data(root)
    plan = []
    for name, (rl, keys, _, accum2, parallel) in RUNS.items():
        write(root, name, rl, **keys, **parallel, gradient_accumulation_steps=accum2)
        plan.append({"name": name, "config": str(root / f"{name}.yaml")})
    # ddp_lora_dpo again, as if it had died after checkpoint-2: its last checkpoint and final adapter removed
    write(root, "ddp_lora_dpo_resumed", "dpo", **LORA, ddp=True, gradient_accumulation_steps=2,
          output_dir="out_ddp_lora_dpo", resume_from_checkpoint="auto")
    out = root / "out_ddp_lora_dpo"
    plan.append({"name": "ddp_lora_dpo_resumed", "config": str(root / "ddp_lora_dpo_resumed.yaml"),
                 "before": [{"copy": [str(out), str(root / "uninterrupted")]}, {"rmtree": str(out / "checkpoint-3")},
                            {"unlink": str(out / "adapter_model.safetensors")}]})
    (root / "plan.json").write_text(json.dumps({"runs": plan, "results": str(root / "results")}))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    log = open(root / "torchrun.log", "w+", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(WORKER), str(root / "plan.json")], cwd=root, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:  # the one-process references meanwhile, with their own data cache and reference tables
        refs = {}
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("magistune.train.preflight.pick_device", lambda: torch.device("cpu"))
            for name, (rl, keys, accum1, _, _) in RUNS.items():
                if single(name) not in refs:
                    path = write(root, single(name), rl, **keys, gradient_accumulation_steps=accum1,
                                 dataset_prepared_path="prepared_single")
                    refs[single(name)] = cli.main(["train", str(path)])
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    ranks = [json.loads(f.read_text()) if (f := root / f"results.rank{r}.json").is_file() else None for r in range(2)]
    return {"root": root, "log": log.read(), "ranks": ranks, "refs": refs, "rc": proc.returncode,
            "expected": {p["name"]: 0 for p in plan}}


def metrics(root: Path, name: str) -> list[dict]:
    return read_metrics(root / f"out_{name}" / "metrics.jsonl")


def assert_same_curve(one: list[dict], two: list[dict], rel: float = TOLERANCE["rel"]) -> None:
    """Per-step loss and eval loss within `rel`, rewards within TOLERANCE["reward_abs"], gradient norm
    within TOLERANCE["rel_norm"]: a missing × N, or a per-rank mean of the pairs, would show in the gradient norm;
    a per-rank z₀ or a counted filler in the losses and rewards."""
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        assert sorted(a) == sorted(b), (a, b)
        for key in ("loss", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rel, abs=TOLERANCE["abs"]), (a["step"], key)
        for key in (*REWARDS, *(f"eval_{k}" for k in REWARDS)):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=TOLERANCE["reward_abs"]), (a["step"], key)
        if "grad_norm" in a:
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=TOLERANCE["rel_norm"]), a["step"]
            assert b["lr"] == a["lr"] and b["pairs"] == a["pairs"]


def test_every_run_finished(runs):
    assert runs["rc"] == 0, runs["log"][-4000:]
    assert set(runs["refs"].values()) == {0}, runs["refs"]
    assert runs["ranks"] == [runs["expected"], runs["expected"]], runs["log"][-4000:]


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_match_one(runs, name):
    one, two = metrics(runs["root"], single(name)), metrics(runs["root"], name)
    steps = RUNS[name][1]["max_steps"]
    assert len([r for r in one if "loss" in r]) == steps and len([r for r in one if "eval_loss" in r]) == steps
    assert one[-1]["eval_reward_accuracy"] is not None
    assert_same_curve(one, two, QLORA_REL if RUNS[name][1] is QLORA else TOLERANCE["rel"])
    if name.endswith("_kernels"):  # the only run that asks for them
        assert "LoRA kernels: fused q,k,v in 2/2, o in 2/2, gate,up in 2/2, down in 2/2" in runs["log"]


def test_full_fine_tunes_compute_the_reference_table_once(runs):
    tables = sorted(p.name for p in (runs["root"] / "prepared").glob("*.ref-*.safetensors"))
    assert len(tables) == 2, tables  # one for the DPO pairs, one for the KTO examples, written by rank 0
    assert runs["log"].count("reference log-probs: saved") == 2


def test_final_adapters_match_one_process(runs):
    from safetensors.torch import load_file

    root = runs["root"]
    for name in ("fsdp_lora_dpo", "ddp_lora_kto", "fsdp_lora_dpo_kernels"):
        one = load_file(root / f"out_{single(name)}" / "adapter_model.safetensors")
        two = load_file(root / f"out_{name}" / "adapter_model.safetensors")
        assert set(one) == set(two) and one
        for key in one:  # AdamW (lr 1e-2) turns fp32 noise in a near-zero gradient into an update of up to lr:
            diff = (one[key] - two[key]).abs()  # measured: ≤ 1 element of a tensor beyond 1e-3, all ≤ 1.7e-3
            assert diff.max() <= 1e-2 and (diff > 1e-3).float().mean() <= 0.01, (name, key, float(diff.max()))


def test_resume_from_a_sharded_checkpoint_is_exact(runs):
    root = runs["root"]
    ref = read_metrics(root / "uninterrupted" / "metrics.jsonl")
    got = metrics(root, "ddp_lora_dpo")
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        for key in ("loss", "grad_norm", "lr", "eval_loss", *REWARDS):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=TOLERANCE["resume"], abs=1e-7), (a["step"], key)
    assert "resumed at step 2 of 3" in runs["log"]
    state = json.loads((root / "out_ddp_lora_dpo" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["rl"] == "dpo" and state["parallel"]["mode"] == "ddp"
