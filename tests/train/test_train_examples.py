"""Every example config is valid, and the demo's data is where the demo says."""

from pathlib import Path

import pytest

from magistune.config import load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_config_is_valid(path):
    cfg, notes = load_config(path)
    assert not [n for n in notes if "ignored" in n], notes


def test_the_examples_the_docs_name_exist():
    names = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert {"demo-tiny.yaml", "magistral-small-2506-qlora.yaml", "magistral-small-2507-think-qlora.yaml",
            "magistral-small-2506-full.yaml"} <= names


def test_demo_data_resolves_next_to_the_config():
    cfg, _ = load_config(EXAMPLES / "demo-tiny.yaml")
    assert cfg.resolve(cfg.datasets[0].path).is_file()
    assert cfg.base_model == "tiny-random"


@pytest.mark.parametrize("name", ["demo-tiny-dpo.yaml", "magistral-small-2507-think-dpo.yaml"])
def test_preference_examples_data_is_valid(name, tmp_path):
    """The DPO examples' pairs are all valid records (encoded with tiny-random's v13 tokenizer)."""
    from magistune.data.build import validate_data

    cfg, _ = load_config(EXAMPLES / name)
    assert cfg.rl == "dpo" and cfg.resolve(cfg.datasets[0].path).is_file()
    path = str(cfg.resolve(cfg.datasets[0].path))
    cfg = cfg.model_copy(update={"base_model": "tiny-random", "output_dir": str(tmp_path / "out"),
                                 "datasets": [cfg.datasets[0].model_copy(update={"path": path})]})
    assert validate_data(cfg) == 0
