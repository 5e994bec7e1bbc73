from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, Mistral3Config, MistralConfig

from magistune.model_files.tiny import _fingerprint, materialize_tiny, tiny_text_config, tiny_vision_config, write_model_dir
from magistune.tokenizer import SpecialIds, vocab_size


def test_tiny_configs_follow_the_tokenizer(tok):
    ids = SpecialIds.of(tok)
    text, vision = tiny_text_config(), tiny_vision_config()
    assert isinstance(text, MistralConfig) and isinstance(vision, Mistral3Config)
    for c in (text, vision.text_config):
        assert c.vocab_size == vocab_size(tok)
        assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (ids.bos, ids.eos, ids.pad)
        assert c.num_attention_heads * c.head_dim == c.hidden_size
        assert c.tie_word_embeddings is False
    assert vision.image_token_index == ids.img
    assert vision.tie_word_embeddings is False
    assert vision.vision_config.patch_size == 14 and vision.vision_config.image_size == 1540
    assert vision.spatial_merge_size == 2


def test_materialized_dirs_load_as_hf_configs(text_dir, vision_dir):
    assert isinstance(AutoConfig.from_pretrained(text_dir), MistralConfig)
    assert isinstance(AutoConfig.from_pretrained(vision_dir), Mistral3Config)
    for d in (text_dir, vision_dir):
        assert {"config.json", "model.safetensors", "tekken.json"} <= {p.name for p in d.iterdir()}
    assert json.loads((text_dir / "config.json").read_text())["dtype"] == "bfloat16"


def test_materialize_is_deterministic_and_a_lost_race_keeps_the_winner(tmp_path):
    a = materialize_tiny("tiny-random", root=tmp_path / "a")
    b = materialize_tiny("tiny-random", root=tmp_path / "b")
    assert a.relative_to(tmp_path / "a") == b.relative_to(tmp_path / "b")
    for name in ("config.json", "model.safetensors", "tekken.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert materialize_tiny("tiny-random", root=tmp_path / "a") == a  # second call: reuse

    before = {p.name: p.stat().st_mtime_ns for p in a.iterdir()}
    assert write_model_dir(tiny_text_config(), a) is False  # a second writer loses the rename ...
    assert {p.name: p.stat().st_mtime_ns for p in a.iterdir()} == before  # ... and the winner is untouched
    assert [p.name for p in a.parent.iterdir()] == [a.name]  # no temporary folder left behind


def test_fingerprint_follows_the_config():
    c = tiny_text_config()
    same, other = tiny_text_config(), tiny_text_config()
    other.num_hidden_layers = 3
    assert _fingerprint(c) == _fingerprint(same) != _fingerprint(other)


def test_unknown_tiny_name():
    with pytest.raises(ValueError, match="tiny-random"):
        materialize_tiny("tiny-huge")
