"""The pipeline with a Hugging Face tokenizer: which tokenizer a config picks, the cache key that follows its
kind and files, bad turns counted as bad records with file:line, and Axolotl's token keys reaching the samples."""

from __future__ import annotations

import json

import pytest

from magistune.config import ConfigError, load_config
from magistune.data.build import build_data, prepare_data, resolve_tokenizer_file
from magistune.data.cache import cache_key
from magistune.data.errors import DataError
from magistune.data.sample import IGNORE_INDEX
from magistune.hf_tokenizer import load_hf_tokenizer, tiny_hf_tokenizer_path, tokenizer_files
from magistune.tokenizer import tiny_tokenizer_path

RECORDS = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
           {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return path


def cfg_of(write_config, **keys):
    return load_config(write_config(**keys))[0]


def test_the_switch_picks_the_tokenizer_and_the_cache_key_follows(write_config, data_file):
    mc = cfg_of(write_config)
    hf = cfg_of(write_config, tokenizer_use_mistral_common=False)
    named = cfg_of(write_config, base_model="tiny-random-hf")
    assert resolve_tokenizer_file(mc) == tiny_tokenizer_path()
    assert resolve_tokenizer_file(hf) == resolve_tokenizer_file(named) == tiny_hf_tokenizer_path()
    keys = {cache_key(c, resolve_tokenizer_file(c)) for c in (mc, hf, named)}
    assert len(keys) == 3  # the kind (the switch, the model) and the files are in the key
    with_tokens = cfg_of(write_config, tokenizer_use_mistral_common=False, tokens=["<m>"])
    assert cache_key(with_tokens, resolve_tokenizer_file(with_tokens)) not in keys
    # The same samples from both tokenizers: tiny-random-hf is tiny-random's Tekken file with a v13 template.
    a, b = build_data(mc, progress=False), build_data(hf, progress=False)
    assert [(s.input_ids, s.labels) for s in a.train + a.eval] == [(s.input_ids, s.labels) for s in b.train + b.eval]
    assert b.tokenizer_file == tiny_hf_tokenizer_path()


def test_a_tokenizer_path_must_match_the_switch(write_config, tmp_path):
    with pytest.raises(ConfigError, match="not a tokenizer.json, and tokenizer_use_mistral_common is false"):
        resolve_tokenizer_file(cfg_of(write_config, tokenizer_use_mistral_common=False,
                                      tokenizer_path=str(tiny_tokenizer_path())))
    folder = tiny_hf_tokenizer_path().parent
    assert resolve_tokenizer_file(cfg_of(write_config, tokenizer_path=str(folder))) == folder / "tokenizer.json"


def test_token_keys_pick_the_editor_of_the_tokenizer_kind(write_config):
    """mistral-common files are edited by tokenizer_edit (a tekken.json), Hugging Face ones by hf_tokenizer."""
    mc = resolve_tokenizer_file(cfg_of(write_config, tokens=["<m>"]))
    hf = resolve_tokenizer_file(cfg_of(write_config, tokenizer_use_mistral_common=False, tokens=["<m>"]))
    assert mc.name == "tekken.json" and "<m>" in mc.read_text(encoding="utf-8")
    assert hf.name == "tokenizer.json" and "<m>" in hf.read_text(encoding="utf-8")


def test_added_tokens_reach_the_samples_and_the_prepared_folder(write_config, tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "mark it"}, {"role": "assistant", "content": "<tool_result> done <m>"}]}) + "\n")
    cfg = cfg_of(write_config, tokenizer_use_mistral_common=False, tokens=["<m>"],
                 added_tokens_overrides={20: "<tool_result>"})
    data = prepare_data(cfg, progress=False, warn=False)
    tok_file = data.tokenizer_file
    assert tok_file.parent.parent == cfg.prepared_dir and [f.name for f in tokenizer_files(tok_file)] == [
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
    tok = load_hf_tokenizer(tok_file)
    (sample,) = data.train
    trained = [t for t in sample.labels if t != IGNORE_INDEX]
    assert trained[0] == 20 and tok.single_id("<m>") == 131072 in trained
    assert tok.decode(trained) == "<tool_result> done <m></s>"


def test_a_bad_turn_is_a_bad_record_with_its_line(write_config, tmp_path):
    """Without generation markers a tool-call-only turn cannot be located: on_bad_record: error lists it."""
    folder = tmp_path / "tok"
    folder.mkdir()
    for f in tokenizer_files(tiny_hf_tokenizer_path()):
        (folder / f.name).write_bytes(f.read_bytes())
    template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    (folder / "chat_template.jinja").write_text(
        template.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", ""), encoding="utf-8")
    call = {"id": "abcdefghi", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [RECORDS[0], {"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "abcdefghi", "content": "r"}, {"role": "assistant", "content": "a"}]}]))
    cfg = cfg_of(write_config, tokenizer_use_mistral_common=False, tokenizer_path=str(folder))
    with pytest.raises(DataError, match=r"data.jsonl:2: turn_not_located: messages\[1\]: an assistant message without text"):
        build_data(cfg, progress=False)
