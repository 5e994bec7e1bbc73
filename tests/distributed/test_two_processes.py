"""Two processes against one: FSDP2 and DDP train the same model as one process with the same global batch.

One torchrun launch runs every 2-process scenario (worker.py: a plan of train() calls in one process group), while
this process trains the one-process references; then each test compares. Everything is tiny-random.

Global batch: one process with micro_batch_size m and accumulation 2a sees the same samples per step as 2 ranks
with accumulation a (rank r takes items r, r+2, … of each epoch's order), so the per-step losses, gradient norms
and eval losses must agree up to summation order.

Devices: `cpu` (gloo, fp32; CUDA hidden even on a GPU host) always; `cuda` (NCCL, bf16 mixed precision, Cut Cross
Entropy when installed, pinned CPU offload, 8-bit AdamW with DDP) on a host with 2 GPUs, marked `gpu`:
    python3 -m pytest -m gpu tests/distributed
"""

from __future__ import annotations

import importlib.util
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

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "data" / "demo.jsonl"
WORKER = Path(__file__).resolve().parent / "worker.py"
TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2

# Measured on CPU (fp32): loss and eval loss ≤ 2.2e-6 relative, gradient norm ≤ 2.7e-5, weights after 4 AdamW
# steps ≤ 1.3e-5 (full) and ≤ 1e-4 (QLoRA adapter); a resumed run is bit-identical. In bf16 on GPUs the summation
# order moves roundings; the bounds still catch a factor of 2 in the normalisation (the gradient norm would halve).
TOLERANCE = {"cpu": {"rel": 1e-5, "rel_norm": 1e-4, "weights": 1e-3, "resume": 1e-6},
             "cuda": {"rel": 2e-2, "rel_norm": 5e-2, "weights": None, "resume": 1e-3}}

BASE = {"base_model": "tiny-random", "datasets": [{"path": "data.jsonl"}], "sequence_len": 256,
        "dataset_prepared_path": "prepared", "val_set_size": 2, "lr_scheduler": "constant", "ddp_timeout": 120}
LORA = {"adapter": "lora", "lora_target_linear": True, "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-2,
        "max_steps": 3, "micro_batch_size": 2, "save_steps": 2, "gradient_checkpointing": True}
FULL = {"learning_rate": 5e-3, "weight_decay": 0.01, "max_steps": 4, "save_steps": 2, "eval_steps": 2,
        "micro_batch_size": 2}
QLORA = {**LORA, "adapter": "qlora", "load_in_4bit": True, "max_steps": 2, "save_steps": 2,
         "gradient_checkpointing": False}

# name: (keys, one-process accumulation, two-process accumulation)
RUNS = {
    "full": (FULL, 2, 1),
    "lora": (LORA, 4, 2),  # 2 micro-batches per rank: gradients reduced once, after the second (grad_sync)
    "qlora": (QLORA, 2, 1),
}
# bf16 on the CPU (the cpu variant only; on GPUs everything is bf16): FSDP's MixedPrecisionPolicy (bf16 gather and
# compute, fp32 gradient reduction) and DDP's fp32 all-reduce hook, against one process under bf16 autocast.
BF16 = {"bf16": True, "max_steps": 2, "save_steps": 2, "eval_steps": None}
BF16_RUNS = {"full_bf16": ({**FULL, **BF16}, 2, 1)}  # fsdp_full_bf16 against single_full_bf16
BF16_TOLERANCE = {"rel": 1e-3, "rel_norm": 1e-2}  # measured: loss ≤ 5e-5, eval loss ≤ 1e-4, gradient norm ≤ 2e-4
# The fused LoRA kernels (and on GPUs liger's RMSNorm and SiLU·up) inside FSDP2's units and DDP's root, against
# the same run on PEFT's layers: (name of the run without them, its keys, engine keys). qlora: FSDP2 gathers the
# packed 4-bit weights as plain tensors, the kernels dequantise them with the quant_state bitsandbytes keeps on the
# layer; without checkpointing, the kernels' backward reads the weights FSDP2 gathers again for backward.
KERNELS = {"lora_qkv_kernel": True, "lora_o_kernel": True, "lora_mlp_kernel": True}
LIGER = {"liger_rms_norm": True, "liger_glu_activation": True}
KERNEL_RUNS = [("fsdp_lora", LORA, {"gradient_accumulation_steps": 2, "fsdp": True}),
               ("ddp_lora", LORA, {"micro_batch_size": 1, "gradient_accumulation_steps": 4, "ddp": True}),
               ("fsdp_qlora", QLORA, {"gradient_accumulation_steps": 1, "fsdp": True})]


def device_keys(device: str) -> dict:
    if device == "cpu":
        return {"bf16": False}
    if importlib.util.find_spec("cut_cross_entropy") is not None:
        return {"cut_cross_entropy": True}  # the fused loss reads lm_head's gathered weight inside FSDP's root
    return {}


def write(root: Path, device: str, name: str, **keys) -> Path:
    path = root / f"{name}.yaml"
    cfg = {**BASE, **device_keys(device), "output_dir": f"out_{name}", **keys}
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def resumed(root: Path, name: str, last: int, final_file: str) -> dict:
    """A plan entry: keep the finished run as uninterrupted_<name>, then remove its last checkpoint and final
    output, as if it had died after checkpoint-2, and resume it."""
    out = root / f"out_{name}"
    return {"name": f"{name}_resumed", "config": str(root / f"{name}_resumed.yaml"),
            "before": [{"copy": [str(out), str(root / f"uninterrupted_{name}")]},
                       {"rmtree": str(out / f"checkpoint-{last}")}, {"unlink": str(out / final_file)}]}


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not TWO_GPUS, reason="needs 2 CUDA GPUs")])])
def runs(request, tmp_path_factory, fast_tokenizer):
    device = request.param
    root = tmp_path_factory.mktemp(f"dist_{device}")
    runs_here = {**RUNS, **(BF16_RUNS if device == "cpu" else {})}
    lines = [line for line in DEMO.read_text(encoding="utf-8").splitlines() if line.strip()][:10]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")  # 8 train + 2 eval

    for name, (keys, _, accum2) in runs_here.items():
        write(root, device, f"fsdp_{name}", **keys, gradient_accumulation_steps=accum2, fsdp=True)
    write(root, device, "fsdp_full_resumed", **FULL, gradient_accumulation_steps=1, fsdp=True,
          output_dir="out_fsdp_full", resume_from_checkpoint="auto")
    # these two accumulate 4 micro-batches of 1 sample per rank: the same 8 samples per step as single_lora's
    # 4 × 2, other micro-batches; gradients are all-reduced once per step (DDP no_sync before the last)
    ddp_lora = {**LORA, "micro_batch_size": 1, "gradient_accumulation_steps": 4, "ddp": True}
    write(root, device, "ddp_lora", **ddp_lora)
    write(root, device, "ddp_lora_resumed", **ddp_lora, output_dir="out_ddp_lora", resume_from_checkpoint="auto")
    tiled = {"tiled_mlp": True, "tiled_mlp_num_shards": 3}  # the MLP's checkpointed shards inside FSDP/DDP units
    write(root, device, "fsdp_lora_tiled", **LORA, **tiled, gradient_accumulation_steps=RUNS["lora"][2], fsdp=True)
    write(root, device, "ddp_lora_tiled", **ddp_lora, **tiled)
    write(root, device, "fsdp_full_offload", **{**FULL, "max_steps": 2, "micro_batch_size": 1},
          gradient_accumulation_steps=2, fsdp=True, fsdp_cpu_offload=True)
    fused = {**KERNELS, **(LIGER if device == "cuda" else {})}  # liger's Triton kernels need CUDA
    for name, keys, parallel in KERNEL_RUNS:
        write(root, device, f"{name}_kernels", **{**keys, **parallel, **fused})
    plan = [{"name": "fsdp_full", "config": str(root / "fsdp_full.yaml")},
            resumed(root, "fsdp_full", 4, "model.safetensors"),
            {"name": "fsdp_lora", "config": str(root / "fsdp_lora.yaml")},
            {"name": "ddp_lora", "config": str(root / "ddp_lora.yaml")},
            resumed(root, "ddp_lora", 3, "adapter_model.safetensors"),
            {"name": "fsdp_qlora", "config": str(root / "fsdp_qlora.yaml")},
            {"name": "fsdp_lora_tiled", "config": str(root / "fsdp_lora_tiled.yaml")},
            {"name": "ddp_lora_tiled", "config": str(root / "ddp_lora_tiled.yaml")},
            {"name": "fsdp_full_offload", "config": str(root / "fsdp_full_offload.yaml")},
            *({"name": f"{name}_kernels", "config": str(root / f"{name}_kernels.yaml")} for name, _, _ in KERNEL_RUNS),
            {"name": "disagree", "config": str(root / "fsdp_lora.yaml"), "overrides": {"0": {"output_dir": "out_disagree"},
                                                                       "1": {"learning_rate": 1e-3, "output_dir": "out_disagree"}}},
            {"name": "refused", "config": str(root / "fsdp_lora.yaml")}]  # into fsdp_lora's finished run
    if device == "cpu":
        write(root, device, "ddp_lora_bf16", **{**LORA, **BF16}, gradient_accumulation_steps=1, ddp=True)
        write(root, device, "single_lora_bf16", **{**LORA, **BF16}, gradient_accumulation_steps=2,
              dataset_prepared_path="prepared_single")
        plan += [{"name": f"fsdp_{name}", "config": str(root / f"fsdp_{name}.yaml")} for name in BF16_RUNS]
        plan.append({"name": "ddp_lora_bf16", "config": str(root / "ddp_lora_bf16.yaml")})
    if device == "cuda":  # 8-bit AdamW works with DDP (with FSDP it is a config error)
        write(root, device, "ddp_qlora_8bit", **QLORA, gradient_accumulation_steps=1, ddp=True,
              optimizer="adamw_bnb_8bit")
        plan.append({"name": "ddp_qlora_8bit", "config": str(root / "ddp_qlora_8bit.yaml")})
    (root / "plan.json").write_text(json.dumps({"runs": plan, "results": str(root / "results")}))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    log = open(root / "torchrun.log", "w+", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(WORKER), str(root / "plan.json")], cwd=root, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:  # the one-process references, meanwhile, in this process (on the CPU, or on GPU 0)
        refs = {}
        with pytest.MonkeyPatch.context() as mp:
            if device == "cpu":
                mp.setattr("magistune.train.preflight.pick_device", lambda: torch.device("cpu"))
            for name, (keys, accum1, _) in runs_here.items():  # own data cache: the two ranks write theirs meanwhile
                path = write(root, device, f"single_{name}", **keys, gradient_accumulation_steps=accum1,
                             dataset_prepared_path="prepared_single")
                refs[name] = cli.main(["train", str(path)])
            if device == "cpu":
                refs["lora_bf16"] = cli.main(["train", str(root / "single_lora_bf16.yaml")])
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    ranks = [json.loads(f.read_text()) if (f := root / f"results.rank{r}.json").is_file() else None for r in range(2)]
    return {"root": root, "log": log.read(), "ranks": ranks, "refs": refs, "rc": proc.returncode, "device": device,
            "tol": TOLERANCE[device], "expected": {p["name"]: 2 if p["name"] in ("disagree", "refused") else 0 for p in plan}}


def metrics(root: Path, name: str) -> list[dict]:
    return read_metrics(root / f"out_{name}" / "metrics.jsonl")


def run_log(log: str, name: str) -> str:
    """What one run of the plan printed: from worker.py's line naming it to the next run's."""
    start = log.index(f"[worker rank 0] run {name} at")
    end = log.find("[worker rank 0] run ", start + 1)
    return log[start:end if end >= 0 else len(log)]


def assert_same_curve(one: list[dict], two: list[dict], tol: dict) -> None:
    """Per-step loss and eval loss within tol["rel"], gradient norm within tol["rel_norm"]. The gradient norm is
    the check on the normalisation: it is taken after the all-rank reduction, so a missing × world or a per-rank
    token mean would show there (AdamW's update hides a uniform scale of the gradient)."""
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        assert sorted(a) == sorted(b), (a, b)
        for key in ("loss", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=tol["rel"]), (a["step"], key, a[key], b[key])
        if "grad_norm" in a:
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=tol["rel_norm"]), (a["step"], a["grad_norm"], b["grad_norm"])
            assert b["lr"] == a["lr"] and b["trained_tokens"] == a["trained_tokens"]


def test_every_run_finished(runs):
    assert runs["rc"] == 0, runs["log"][-4000:]
    assert set(runs["refs"].values()) == {0}, runs["refs"]
    assert runs["ranks"] == [runs["expected"], runs["expected"]], runs["log"][-4000:]


@pytest.mark.parametrize("name", ["full", "lora", "qlora"])
def test_fsdp_matches_one_process(runs, name):
    one, two = metrics(runs["root"], f"single_{name}"), metrics(runs["root"], f"fsdp_{name}")
    assert len(one) == RUNS[name][0]["max_steps"] + (2 if name == "full" else 1)  # train rows + eval rows
    assert_same_curve(one, two, runs["tol"])


@pytest.mark.parametrize("two", ["fsdp_full_bf16", "ddp_lora_bf16"])
def test_bf16_mixed_precision_matches_one_process(runs, two):
    if runs["device"] != "cpu":
        pytest.skip("on GPUs every run is bf16")
    one = "single_" + two.split("_", 1)[1]
    assert_same_curve(metrics(runs["root"], one), metrics(runs["root"], two), BF16_TOLERANCE)


@pytest.mark.parametrize("two", ["fsdp_lora_tiled", "ddp_lora_tiled"])
def test_tiled_mlp_matches_one_process(runs, two):
    """tiled_mlp under FSDP2 and DDP: the shards' recompute runs inside the engines' backward hooks, and the
    curve is the one-process run without tiling (the tiled MLP computes the same function, no dropout here)."""
    assert_same_curve(metrics(runs["root"], "single_lora"), metrics(runs["root"], two), runs["tol"])


@pytest.mark.parametrize("name", [name for name, _, _ in KERNEL_RUNS])
def test_fused_kernels_train_as_peft_layers(runs, name):
    """The same curve (loss, gradient norm: the LoRA gradients after the ranks' reduction, eval loss) and the same
    saved adapter with the kernel keys on as without, under FSDP2 and DDP (no dropout: the same function)."""
    from safetensors.torch import load_file

    root, log = runs["root"], run_log(runs["log"], f"{name}_kernels")
    assert "LoRA kernels: fused q,k,v in 2/2, o in 2/2, gate,up in 2/2, down in 2/2 decoder layers" in log
    if runs["device"] == "cuda":  # swapped in on the GPUs, though FSDP2's rank 0 loads its copy on the CPU
        assert "liger_glu_activation / liger_rms_norm:" not in log
    assert_same_curve(metrics(root, name), metrics(root, f"{name}_kernels"), runs["tol"])
    peft = load_file(root / f"out_{name}" / "adapter_model.safetensors")
    fused = load_file(root / f"out_{name}_kernels" / "adapter_model.safetensors")
    assert peft.keys() == fused.keys() and peft
    for key in peft:  # fp32 on the CPU: tests/e2e/test_train_lora_kernels.py's bound (measured ≤ 5e-7 absolute)
        assert fused[key].dtype == peft[key].dtype and fused[key].shape == peft[key].shape, key
        if runs["device"] == "cpu":
            torch.testing.assert_close(fused[key], peft[key], rtol=1e-3, atol=1e-5, msg=key)


def test_ddp_matches_one_process(runs):
    assert_same_curve(metrics(runs["root"], "single_lora"), metrics(runs["root"], "ddp_lora"), runs["tol"])


def test_fsdp_cpu_offload_matches_one_process(runs):
    """fsdp_cpu_offload loads differently (the shards stay on meta until set_model_state_dict assigns them in CPU
    memory; pinned on CUDA): its first 2 steps and eval are the full run's."""
    assert_same_curve(metrics(runs["root"], "single_full")[:3], metrics(runs["root"], "fsdp_full_offload"), runs["tol"])


def test_final_outputs_match_one_process(runs):
    from safetensors.torch import load_file

    root, atol = runs["root"], runs["tol"]["weights"]
    pairs = [("model.safetensors", "full"), ("adapter_model.safetensors", "lora"), ("adapter_model.safetensors", "qlora")]
    for file, name in pairs:
        one, two = load_file(root / f"out_single_{name}" / file), load_file(root / f"out_fsdp_{name}" / file)
        assert set(one) == set(two) and one
        for key in one:  # AdamW steps of lr 5e-3: noise in a near-zero gradient can move an update
            assert one[key].dtype == two[key].dtype and one[key].shape == two[key].shape, key
            if atol is not None:
                assert torch.allclose(one[key].float(), two[key].float(), atol=atol), key
    config = json.loads((root / "out_fsdp_lora" / "adapter_config.json").read_text())
    assert config["r"] == 4


@pytest.mark.parametrize("name,at", [("fsdp_full", "2 of 4"), ("ddp_lora", "2 of 3")])
def test_resume_from_a_sharded_checkpoint_is_exact(runs, name, at):
    """A run whose last checkpoint and outputs are gone resumes from checkpoint-2 to the uninterrupted losses."""
    root, rel = runs["root"], runs["tol"]["resume"]
    ref = read_metrics(root / f"uninterrupted_{name}" / "metrics.jsonl")
    got = metrics(root, name)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        for key in ("loss", "eval_loss", "grad_norm", "lr"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-7), (a["step"], key)
    assert f"resumed at step {at}" in runs["log"]


def test_sharded_checkpoint_layout(runs):
    from magistune.train import checkpoint as ckpt

    out = runs["root"] / "out_fsdp_full" / "checkpoint-2"
    assert ckpt.is_complete(out)
    names = {p.name for p in (out / "dcp").iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "config.json"} <= names
    assert {p.name for p in (out / "rng").iterdir()} == {"rank0.json", "rank1.json"}
    state = ckpt.read_state(out)
    dtype = "float32" if runs["device"] == "cpu" else "bfloat16"
    assert state["parallel"] == {"mode": "fsdp", "world_size": 2, "kind": "full", "dtype": dtype}
    assert state["position"] == {"epoch": 0, "step": 2}  # 8 samples = 4 per rank = 2 steps of 2: end of epoch 0
    lora = runs["root"] / "out_fsdp_lora" / "checkpoint-3"
    assert (lora / "adapter_model.safetensors").is_file() and (lora / "adapter_config.json").is_file()
    assert not list(runs["root"].glob("out_*/.checkpoint-*"))  # no temporary or stale folders left


def test_consolidate_a_full_checkpoint(runs, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    root = runs["root"]
    assert cli.main(["consolidate", str(root / "out_fsdp_full" / "checkpoint-4"), "--output", str(tmp_path / "m")]) == 0
    assert "full model of step 4" in capsys.readouterr().out
    final, got = load_file(root / "out_fsdp_full" / "model.safetensors"), load_file(tmp_path / "m" / "model.safetensors")
    assert set(final) == set(got)
    for key in final:
        assert torch.equal(final[key], got[key]), key
    assert (tmp_path / "m" / "tekken.json").is_file()
    AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # a loadable Hugging Face folder


def test_consolidate_an_adapter_checkpoint(runs, tmp_path):
    from safetensors.torch import load_file

    root = runs["root"]
    assert cli.main(["consolidate", str(root / "out_fsdp_lora" / "checkpoint-3"), "--output", str(tmp_path / "a")]) == 0
    final = load_file(root / "out_fsdp_lora" / "adapter_model.safetensors")
    got = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert set(final) == set(got) and all(torch.equal(final[k], got[k]) for k in final)
    assert (tmp_path / "a" / "adapter_config.json").is_file()


def test_consolidate_refuses_what_is_not_sharded(runs, tmp_path, capsys):
    root = runs["root"]
    assert cli.main(["consolidate", str(root / "out_single_full" / "checkpoint-4"), "--output", str(tmp_path / "x")]) == 2
    assert "not a sharded checkpoint" in capsys.readouterr().err


def test_rank_disagreement_is_an_error_naming_the_key(runs):
    log = runs["log"]
    assert "the ranks disagree" in log
    assert "config key learning_rate: rank 0 has 0.01, rank 1 has 0.001" in log
    assert "[rank 1] error: the ranks disagree" in log  # every rank stops, each saying why


def test_an_earlier_run_is_refused_by_rank_0_and_every_rank_stops(runs):
    """Rank 0 alone locks output_dir and looks for an earlier run; the other ranks stop with it, none waits."""
    log = runs["log"]
    assert f"error: output_dir: {runs['root'] / 'out_fsdp_lora'} holds an earlier run" in log
    assert "[rank 1] error: stopped: rank 0 refused the run" in log


def test_one_process_cannot_resume_a_sharded_checkpoint(runs, capsys, monkeypatch):
    root = runs["root"]
    monkeypatch.setattr("magistune.train.preflight.pick_device", lambda: torch.device("cpu"))
    path = write(root, "cpu", "single_resume_sharded", **FULL, gradient_accumulation_steps=2,
                 resume_from_checkpoint=str(root / "out_fsdp_full" / "checkpoint-2"), output_dir="out_x")
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "a sharded checkpoint written by 2 processes" in err and "--nproc 2" in err
