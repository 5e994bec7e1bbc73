"""`magistune evaluate`: the report's loss equals a direct token-normalised computation with transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import MistralForCausalLM

from adapter_helpers import save_adapter
from magistune.cli import main
from magistune.config import load_config
from magistune.data.build import prepare_data

DEMO = Path(__file__).resolve().parents[2] / "examples" / "data" / "demo.jsonl"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("evaluate")
    lines = [line for line in DEMO.read_text(encoding="utf-8").splitlines() if line.strip()][:6]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "cfg.yaml").write_text(yaml.safe_dump({
        "base_model": "tiny-random", "datasets": [{"path": "data.jsonl"}], "sequence_len": 512, "val_set_size": 2,
        "adapter": "lora", "lora_target_linear": True, "lora_r": 4, "output_dir": "out", "micro_batch_size": 2,
    }), encoding="utf-8")
    save_adapter("tiny-random", root / "out", random_b=True, seed=3)
    return root


def direct_loss(model, samples) -> tuple[float, int]:
    """Σ (transformers' mean loss of a sample × its trained tokens) / Σ trained tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            n = sum(1 for t in s.labels[1:] if t != -100)
            loss = model(input_ids=torch.tensor([s.input_ids]), labels=torch.tensor([s.labels])).loss
            total, count = total + float(loss) * n, count + n
    return total / count, count


def test_eval_split_loss_equals_direct_computation(run_dir, tiny_dir):
    cfg_path = run_dir / "cfg.yaml"
    report_path = run_dir / "report.json"
    assert main(["evaluate", str(cfg_path), "--output", str(report_path)]) == 0
    report = json.loads(report_path.read_text(encoding="utf-8"))

    cfg, _ = load_config(cfg_path)
    samples = prepare_data(cfg, progress=False).eval
    model = PeftModel.from_pretrained(MistralForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), run_dir / "out")
    model.eval()
    loss, trained = direct_loss(model, samples)
    assert report["samples"] == 2 and report["split"] == "eval"
    assert report["trained_tokens"] == trained
    assert report["loss"] == pytest.approx(loss, rel=1e-5)
    assert report["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert report["adapter"] == str(run_dir / "out") and report["model"] == str(tiny_dir)

    with model.disable_adapter():  # the base alone
        base_loss, _ = direct_loss(model, samples)
    assert main(["evaluate", str(cfg_path), "--base", "--output", str(report_path)]) == 0
    base_report = json.loads(report_path.read_text(encoding="utf-8"))
    assert base_report["adapter"] is None
    assert base_report["loss"] == pytest.approx(base_loss, rel=1e-5)
    assert abs(base_loss - loss) > 1e-3  # the adapter changes the loss


def test_all_samples_and_given_datasets(run_dir, capsys):
    assert main(["evaluate", str(run_dir / "cfg.yaml"), "--all", "--batch-size", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["samples"], report["split"]) == (6, "all")
    assert main(["evaluate", str(run_dir / "cfg.yaml"), "--dataset", str(run_dir / "data.jsonl")]) == 0
    given = json.loads(capsys.readouterr().out)
    assert (given["samples"], given["split"]) == (6, "datasets")
    assert given["loss"] == pytest.approx(report["loss"], rel=1e-5)


def test_no_eval_split_is_a_clear_error(run_dir, capsys):
    cfg = yaml.safe_load((run_dir / "cfg.yaml").read_text(encoding="utf-8"))
    cfg["val_set_size"] = 0
    (run_dir / "noeval.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main(["evaluate", str(run_dir / "noeval.yaml")]) == 2
    assert "no eval split" in capsys.readouterr().err
