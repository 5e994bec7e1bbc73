"""Axolotl's 8 example configs for Magistral, Devstral, Mistral Small and Mistral Medium 3.5
(tests/axolotl_examples, copied unchanged with their license notice) are read as Axolotl reads them."""

from pathlib import Path

import pytest

from magistune.config import ConfigError, load_config

EXAMPLES = Path(__file__).resolve().parent / "axolotl_examples"
FILES = sorted(p.name for p in EXAMPLES.glob("*.y*ml"))
INT8 = "mistral-small-3.1-24B-lora.yml"  # load_in_8bit: true, which magistune does not implement


def test_all_eight_are_here():
    assert len(FILES) == 8


@pytest.mark.parametrize("name", [f for f in FILES if f != INT8])
def test_each_example_loads_unchanged(name):
    cfg, notes = load_config(EXAMPLES / name)
    assert not any("did you mean" in n for n in notes)
    assert cfg.base_model.startswith(("mistralai/", "axolotl-ai-co/"))


def test_empty_values_mean_axolotls_defaults():
    cfg, notes = load_config(EXAMPLES / "mistral-medium-3_5-qlora-text.yml")
    assert cfg.output_dir == "./model-out" and "output_dir: empty: Axolotl's default ./model-out" in notes
    assert cfg.lora_mlp_kernel and cfg.lora_qkv_kernel and cfg.lora_o_kernel  # the fused LoRA kernels (issue 16)
    cfg, notes = load_config(EXAMPLES / "magistral-small-fsdp-qlora.yaml")  # `gradient_checkpointing:` empty …
    assert cfg.gradient_checkpointing and cfg.fsdp  # … and fsdp_activation_checkpointing: true
    cfg, notes = load_config(EXAMPLES / "magistral-small-vision-24B-qlora.yml")
    assert cfg.fp16 is False and cfg.bf16 is True
    assert any(n.startswith("processor_type: ignored") for n in notes)


def test_devstral_loss_watchdog():
    cfg, _ = load_config(EXAMPLES / "devstral-small-qlora.yml")
    assert (cfg.loss_watchdog_threshold, cfg.loss_watchdog_patience) == (5.0, 3)


def test_load_in_8bit_names_the_nearest_option():
    with pytest.raises(ConfigError, match=r"load_in_8bit \(bitsandbytes LLM.int8 base weights\) is not implemented "
                                          r"in magistune; the nearest option is adapter: qlora with load_in_4bit: true"):
        load_config(EXAMPLES / INT8)


def test_the_migration_page_names_every_key_of_the_examples():
    import yaml

    page = (Path(__file__).resolve().parents[1] / "docs" / "from-axolotl.md").read_text(encoding="utf-8")
    keys = set()
    for name in FILES:
        raw = yaml.safe_load((EXAMPLES / name).read_text(encoding="utf-8"))
        keys |= set(raw) | {k for d in raw["datasets"] for k in d} | set(raw.get("fsdp_config") or {})
    missing = sorted(k for k in keys if f"`{k}`" not in page and f"`{k.removeprefix('fsdp_')}`" not in page)
    assert not missing, f"docs/from-axolotl.md does not name {missing}"
