"""GRPO prompt records → mistral-common's test-mode ids, columns kept, bad records named by file:line."""

from __future__ import annotations

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from magistune.config import parse_config
from magistune.data.encode import ConversationEncoder
from magistune.data.errors import DataError
from magistune.data.prompts import check_prompt_data, load_prompt_tokenizer, load_prompts
from magistune.data.records import RecordOptions, parse_record
from magistune.tokenizer import SpecialIds, tiny_tokenizer_path

PROMPT = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def test_tok():
    return load_prompt_tokenizer(tiny_tokenizer_path())


def _cfg(tmp_path, **keys):
    raw = {"base_model": "tiny-random", "datasets": [{"path": "data.jsonl"}], "rl": "grpo", "sequence_len": 256,
           "trl": {"max_completion_length": 64}, **keys}
    return parse_config(raw, config_dir=tmp_path)[0]


def test_ids_are_mistral_commons_test_mode_encoding(tmp_path, write_jsonl, test_tok, tiny_tok):
    write_jsonl(tmp_path / "data.jsonl", [{"prompt": PROMPT, "answer": "4", "level": 1}])
    data = load_prompts(_cfg(tmp_path, system_prompt="Think first."), test_tok)
    (p,) = data.prompts
    messages = [{"role": "system", "content": "Think first."}] + PROMPT
    want = test_tok.encode_chat_completion(ChatCompletionRequest.from_openai(messages)).tokens
    assert p.ids == list(want)
    assert p.ids[-1] == test_tok.instruct_tokenizer.tokenizer.get_special_token("[/INST]")
    assert p.columns == {"answer": "4", "level": 1} and p.prompt == PROMPT and p.source == "data.jsonl:1"
    # … and the prompt of a training conversation (prompt + answer, fine-tuning mode) starts with the same ids
    conv = parse_record({"messages": messages + [{"role": "assistant", "content": "4"}]}, RecordOptions())
    ids, _, _ = ConversationEncoder(tiny_tok).encode(conv)
    assert ids[:len(p.ids)] == p.ids and ids[-1] == SpecialIds.of(tiny_tok).eos


def test_bad_records_are_named_and_too_long_prompts_dropped(tmp_path, write_jsonl, test_tok):
    long = [{"role": "user", "content": "word " * 400}]
    write_jsonl(tmp_path / "data.jsonl", [
        {"prompt": PROMPT}, {"messages": PROMPT}, {"prompt": PROMPT + [{"role": "assistant", "content": "x"}]},
        "{not json", {"prompt": [{"role": "user", "content": "hi", "weight": 1}]}, {"prompt": long}])
    cfg = _cfg(tmp_path)
    data = load_prompts(cfg, test_tok)
    assert len(data.prompts) == 1 and data.records == 6
    assert [(r.source, r.reason) for r in data.rejected] == [
        ("data.jsonl:2", "missing_field"), ("data.jsonl:3", "last_not_user"), ("data.jsonl:4", "invalid_json"),
        ("data.jsonl:5", "unknown_key")]
    assert [r.source for r in data.dropped] == ["data.jsonl:6"]
    with pytest.raises(DataError, match="data.jsonl:3: last_not_user"):
        check_prompt_data(cfg, data, say=lambda m: None)
    said = []
    check_prompt_data(_cfg(tmp_path, on_bad_record="skip"), data, say=said.append)
    assert "skipped 4 bad prompt record(s)" in said[0] and "data.jsonl:6" in said[1]
