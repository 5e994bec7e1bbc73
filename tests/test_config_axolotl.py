"""Axolotl's keys (issue 19): defaults accepted as no-ops, other values implemented or a clear error."""

import pytest

from magistune.config import ConfigError, parse_config

BASE = {"base_model": "tiny-random", "datasets": [{"path": "d.jsonl"}]}


def parse(**keys):
    return parse_config({**BASE, **keys})


def error(**keys) -> str:
    with pytest.raises(ConfigError) as e:
        parse(**keys)
    return str(e.value)


@pytest.mark.parametrize("value", ["tokenizer_default", "tokenizer_default_fallback_chatml", None])
def test_chat_template_tokenizer_default_top_level_and_per_dataset(value):
    _, notes = parse(chat_template=value, datasets=[{"path": "d.jsonl", "chat_template": value}])
    assert sum(n.startswith(("chat_template:", "datasets[0].chat_template:")) for n in notes) == 2


def test_chat_template_other_values_are_errors():
    assert "chat_template: 'chatml' is not supported: magistune encodes with mistral-common" in error(chat_template="chatml")
    msg = error(datasets=[{"path": "d.jsonl", "chat_template": "jinja"}])
    assert "datasets[0].chat_template: 'jinja' is not supported" in msg


def test_axolotl_dataset_defaults_are_accepted():
    cfg, _ = parse(train_on_inputs=False, datasets=[{"path": "d.jsonl", "roles_to_train": ["assistant"],
                                                     "train_on_eos": "turn"}])
    assert cfg.datasets[0].train_on_inputs is False and cfg.datasets[0].roles_to_train == ["assistant"]


def test_eot_tokens_and_chat_template_kwargs():
    _, notes = parse(eot_tokens=[])
    assert any(n.startswith("eot_tokens:") for n in notes)
    assert "eot_tokens: mistral-common's end-of-turn tokens are fixed" in error(eot_tokens=["[/INST]"])
    for keys in ({"chat_template_kwargs": {"enable_thinking": True}},
                 {"datasets": [{"path": "d.jsonl", "chat_template_kwargs": {"enable_thinking": True}}]}):
        assert "chat_template_kwargs: 'enable_thinking' cannot apply: mistral-common has no chat template" in error(**keys)
    cfg, _ = parse(chat_template_kwargs={"reasoning_effort": "high"},
                   datasets=[{"path": "d.jsonl"}, {"path": "d.jsonl", "chat_template_kwargs": {}}])
    assert [d.chat_template_kwargs for d in cfg.datasets] == [{"reasoning_effort": "high"}, {}]


def test_tokenizer_keys_are_accepted():
    """tokenizer_use_mistral_common: false selects the Hugging Face tokenizer (tests/data/test_build_hf.py); Axolotl's
    token keys are read as Axolotl writes them, and special_tokens names only the four it means."""
    cfg, _ = parse(tokenizer_use_mistral_common=False, tokens=["<a>"], special_tokens={"pad_token": "<pad>"},
                   added_tokens_overrides={20: "<b>"})
    assert (cfg.tokenizer_use_mistral_common, cfg.tokens, cfg.added_tokens_overrides) == (False, ["<a>"], {20: "<b>"})
    assert "special_tokens: 'sep_token' is not one of bos_token" in error(special_tokens={"sep_token": "<sep>"})
    cfg, _ = parse(special_tokens=None, tokens=None)  # Axolotl's examples leave them empty
    assert cfg.special_tokens is None and cfg.tokens is None


@pytest.mark.parametrize("key", ["processor_type", "skip_prepare_dataset", "remove_unused_columns", "dataset_num_proc"])
def test_example_keys_are_accepted_with_a_note(key):
    _, notes = parse(**{key: True})
    assert any(n.startswith(f"{key}: ignored (") for n in notes)


def test_sharegpt_alias_and_its_defaults():
    cfg, _ = parse(datasets=[{"path": "d.jsonl", "type": "sharegpt"},
                             {"path": "d.jsonl", "type": "sharegpt", "field_messages": "conv"}])
    assert cfg.datasets[0].field_messages == "conversations"
    assert cfg.datasets[0].message_property_mappings == {"role": "from", "content": "value"}
    assert cfg.datasets[1].field_messages == "conv"


def test_dataset_option_errors():
    assert "shards_idx: 4 must be below shards (4)" in error(datasets=[{"path": "d.jsonl", "shards": 4, "shards_idx": 4}])
    assert "train_on_eos: train_on_inputs trains every token" in error(
        datasets=[{"path": "d.jsonl", "train_on_inputs": True, "train_on_eos": "last"}])
    assert "message_field_training_detail: Axolotl's key is not implemented" in error(
        datasets=[{"path": "d.jsonl", "message_field_training_detail": "train_detail"}])


def test_empty_values_mean_the_default_but_null_stays_a_value():
    cfg, notes = parse(fp16=None, output_dir=None, gradient_checkpointing=None, max_grad_norm=None)
    assert (cfg.fp16, cfg.output_dir, cfg.gradient_checkpointing, cfg.max_grad_norm) == (False, "./model-out", False, None)
    assert "fp16: empty: as if unset (default False)" in notes


def test_shuffle_merged_datasets_is_a_key():
    assert parse(shuffle_merged_datasets=False)[0].shuffle_merged_datasets is False
