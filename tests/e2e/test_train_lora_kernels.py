"""The fused LoRA kernels end to end through `python -m magistune train` on tiny-random (CPU): with
lora_qkv_kernel, lora_o_kernel and lora_mlp_kernel on, the losses, gradient norms and eval losses of a few steps
equal those of PEFT's layers (lora_dropout 0), and the saved adapter is the same PEFT adapter (same tensor names,
loaded by PeftModel.from_pretrained on a plain base model, same logits). And an FSDP2 run with them through
`--nproc 2` (torchrun, two CPU processes) against one process on PEFT's layers."""

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
from safetensors.torch import load_file

from magistune.config import load_config

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[2] / "examples" / "data" / "demo.jsonl"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
KERNELS = {"lora_qkv_kernel": True, "lora_o_kernel": True, "lora_mlp_kernel": True}


def train(root: Path, name: str, *args: str, env: dict = ENV, **keys) -> tuple[Path, str]:
    cfg = {"base_model": "tiny-random", "datasets": [{"path": "data.jsonl"}], "sequence_len": 512,
           "dataset_prepared_path": "prepared", "val_set_size": 2, "micro_batch_size": 2,
           "gradient_accumulation_steps": 2, "learning_rate": 1e-3, "output_dir": f"out-{name}", "max_steps": 3,
           "eval_steps": 3, "gradient_checkpointing": True, "lora_target_linear": True, "lora_r": 4,
           "lora_alpha": 8, "lora_dropout": 0.0, "sample_packing": True, **keys}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "magistune", "train", str(path), *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return path, proc.stdout + proc.stderr


@pytest.mark.parametrize("adapter", [{"adapter": "lora"}, {"adapter": "qlora", "load_in_4bit": True}],
                         ids=["lora", "qlora"])
def test_kernels_train_the_same_curve_and_save_the_same_adapter(tmp_path, adapter):
    lines = [line for line in DEMO.read_text(encoding="utf-8").splitlines() if line.strip()][:8]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    curves, adapters = {}, {}
    for name, keys in {"peft": {}, "kernels": KERNELS}.items():
        cfg_path, log = train(tmp_path, name, **adapter, **keys)
        if keys:
            assert "LoRA kernels: fused q,k,v in 2/2, o in 2/2, gate,up in 2/2, down in 2/2 decoder layers" in log
        out = tmp_path / f"out-{name}"
        curves[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        adapters[name] = (cfg_path, out, load_file(out / "adapter_model.safetensors"))
    assert [r["step"] for r in curves["peft"]] == [r["step"] for r in curves["kernels"]]
    for a, b in zip(curves["peft"], curves["kernels"]):
        for key in ("loss", "grad_norm", "eval_loss", "trained_tokens"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    (_, _, peft_tensors), (cfg_path, out, kernel_tensors) = adapters["peft"], adapters["kernels"]
    assert peft_tensors.keys() == kernel_tensors.keys()
    for name in peft_tensors:
        torch.testing.assert_close(kernel_tensors[name], peft_tensors[name], rtol=1e-3, atol=1e-5, msg=name)

    from peft import PeftModel

    from magistune.model import load_model, resolve_model_dir

    cfg, _ = load_config(cfg_path)
    ids = torch.randint(100, 131072, (1, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name in ("peft", "kernels"):  # each saved adapter on a plain base model, PEFT's own loader
        base, _ = load_model(cfg, resolve_model_dir(cfg.base_model), torch.device("cpu"))
        with torch.no_grad():
            logits[name] = PeftModel.from_pretrained(base, tmp_path / f"out-{name}").eval()(input_ids=ids).logits
    torch.testing.assert_close(logits["kernels"], logits["peft"], rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_fsdp_run_with_kernels_through_the_cli_trains_the_peft_curve(tmp_path):
    """`magistune train CONFIG --nproc 2` with fsdp: true and the kernel keys (torchrun, two CPU processes over
    gloo) against one process on PEFT's layers with the same global batch (accumulation 2 against 1 per rank):
    tests/distributed/test_two_processes.py's CPU bounds for the curve, this file's for the adapter."""
    lines = [line for line in DEMO.read_text(encoding="utf-8").splitlines() if line.strip()][:10]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")  # 8 train + 2 eval
    cpu = {**ENV, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    keys = {"adapter": "lora", "sample_packing": False, "sequence_len": 256, "max_steps": 2, "eval_steps": 2,
            "bf16": False, "ddp_timeout": 120}
    train(tmp_path, "one", env=cpu, **keys)
    _, log = train(tmp_path, "fsdp", "--nproc", "2", env=cpu, **keys, **KERNELS, fsdp=True,
                   gradient_accumulation_steps=1, dataset_prepared_path="prepared-fsdp")
    assert "fsdp over 2 processes" in log
    assert "LoRA kernels: fused q,k,v in 2/2, o in 2/2, gate,up in 2/2, down in 2/2 decoder layers" in log
    one, two = ([json.loads(line) for line in (tmp_path / f"out-{n}" / "metrics.jsonl").read_text().splitlines()]
                for n in ("one", "fsdp"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 2]
    for a, b in zip(one, two):
        for key, rel in (("loss", 1e-5), ("eval_loss", 1e-5), ("grad_norm", 1e-4)):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rel), (a["step"], key)
    want, got = (load_file(tmp_path / f"out-{n}" / "adapter_model.safetensors") for n in ("one", "fsdp"))
    assert want.keys() == got.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5, msg=name)
