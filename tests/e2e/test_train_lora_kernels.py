"""The fused LoRA kernels end to end through `python -m magistune train` on tiny-random (CPU): with
lora_qkv_kernel, lora_o_kernel and lora_mlp_kernel on, the losses, gradient norms and eval losses of a few steps
equal those of PEFT's layers (lora_dropout 0), and the saved adapter is the same PEFT adapter (same tensor names,
loaded by PeftModel.from_pretrained on a plain base model, same logits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from magistune.config import load_config

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[2] / "examples" / "data" / "demo.jsonl"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
KERNELS = {"lora_qkv_kernel": True, "lora_o_kernel": True, "lora_mlp_kernel": True}


def train(root: Path, name: str, **keys) -> tuple[Path, str]:
    cfg = {"base_model": "tiny-random", "datasets": [{"path": "data.jsonl"}], "sequence_len": 512,
           "dataset_prepared_path": "prepared", "val_set_size": 2, "micro_batch_size": 2,
           "gradient_accumulation_steps": 2, "learning_rate": 1e-3, "output_dir": f"out-{name}", "max_steps": 3,
           "eval_steps": 3, "gradient_checkpointing": True, "lora_target_linear": True, "lora_r": 4,
           "lora_alpha": 8, "lora_dropout": 0.0, "sample_packing": True, **keys}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "magistune", "train", str(path)], cwd=root, env=ENV,
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
