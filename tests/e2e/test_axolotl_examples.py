"""Axolotl's 8 example configs for this family (tests/axolotl_examples, copied unchanged) run through the real
CLI: validate-data, then 2 training steps on tiny-random(-vision). Only base_model and the dataset path change
(plus max_steps: 2 and sequence_len: 256, to be fast); every other key is Axolotl's, as its users write it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "tests" / "axolotl_examples"
DEMO = ROOT / "examples" / "data" / "demo.jsonl"  # chat, thinking parts, tool calls
SHAPES = ROOT / "examples" / "data" / "shapes.jsonl"  # images
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
INT8 = "mistral-small-3.1-24B-lora.yml"
# Mistral Small 3.1 and Mistral Medium 3.5 are Mistral3 (vision) models: their LoRA regex names language_model.
EXAMPLE_DATA = {
    "magistral-small-qlora.yaml": ("tiny-random", DEMO),
    "magistral-small-fsdp-qlora.yaml": ("tiny-random", DEMO),  # one process outside torchrun, with a note
    "magistral-small-think-qlora.yaml": ("tiny-random", DEMO),
    "devstral-small-qlora.yml": ("tiny-random", DEMO),
    "magistral-small-vision-24B-qlora.yml": ("tiny-random-vision", SHAPES),
    INT8: ("tiny-random-vision", SHAPES),
    "mistral-medium-3_5-qlora-text.yml": ("tiny-random-vision", DEMO),
    "mistral-medium-3_5-qlora-vision.yml": ("tiny-random-vision", SHAPES),
}


def localised(name: str, tmp_path: Path, **extra) -> Path:
    cfg = yaml.safe_load((EXAMPLES / name).read_text(encoding="utf-8"))
    base_model, data = EXAMPLE_DATA[name]
    cfg["base_model"] = base_model
    cfg["datasets"][0]["path"] = str(data)
    cfg.update(max_steps=2, sequence_len=256, **extra)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "magistune", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)


def test_every_example_is_covered():
    assert sorted(EXAMPLE_DATA) == sorted(p.name for p in EXAMPLES.glob("*.y*ml"))


@pytest.mark.parametrize("name", [n for n in EXAMPLE_DATA if n != INT8])
def test_example_validates_and_trains_two_steps(name, tmp_path):
    path = localised(name, tmp_path)
    checked = cli("validate-data", str(path), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-2000:]
    run = cli("train", str(path), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / (yaml.safe_load(path.read_text())["output_dir"] or "model-out")
    if not yaml.safe_load(path.read_text())["output_dir"]:
        assert out.name == "model-out"  # Axolotl's default for `output_dir:` left empty
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert (out / "adapter_model.safetensors").is_file()


def test_int8_example_names_the_nearest_option_and_trains_without_int8(tmp_path):
    """load_in_8bit is not implemented: a clear error; the rest of the example trains with it removed."""
    run = cli("train", str(localised(INT8, tmp_path)), cwd=tmp_path)
    assert run.returncode == 2 and "the nearest option is adapter: qlora with load_in_4bit: true" in run.stderr
    assert "Traceback" not in run.stderr
    path = localised(INT8, tmp_path, load_in_8bit=False)
    assert cli("validate-data", str(path), cwd=tmp_path).returncode == 0
    run = cli("train", str(path), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
