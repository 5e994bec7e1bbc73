"""The data pipeline with `rl:` set: preference pairs and KTO examples through build, the length policy, the
report and the cache."""

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from magistune.config import load_config
from magistune.data.build import DataError, build_data, prepare_data
from magistune.data.sample import KTOSample, PreferenceSample

pytestmark = pytest.mark.usefixtures("fast_tokenizers")


def u(text):
    return {"role": "user", "content": text}


def a(text, **keys):
    return {"role": "assistant", "content": text, **keys}


LONG = " ".join(["word"] * 80)
PAIRS = [
    {"prompt": [u("2+2?")], "chosen": [a("4")], "rejected": [a("5")]},
    {"chosen": [u("hi"), a("hello")], "rejected": [u("hi"), a("go away")]},
    {"prompt": [u("x")], "chosen": [a("y")]},  # no rejected
    {"prompt": [u(LONG), a(LONG), u("and?")], "chosen": [a("yes")], "rejected": [a("no")]},
    '{"prompt": [',
]
KTO = [
    {"prompt": [u("2+2?")], "completion": [a("4")], "label": True},
    {"prompt": [u("2+2?")], "completion": [a("5")], "label": False},
    {"prompt": [u("3+3?")], "completion": [a("6")], "label": "yes"},
]


def cfg_for(write_config, **keys):
    return load_config(write_config(**{"rl": "dpo", "on_bad_record": "skip", **keys}))[0]


def reference(tok, messages):
    return tok.encode_chat_completion(ChatCompletionRequest.from_openai(messages)).tokens


def test_pairs_built_with_reasons_and_length_policy(tmp_path, write_jsonl, write_config, tiny_tok, capsys):
    write_jsonl(tmp_path / "data.jsonl", PAIRS)
    data = build_data(cfg_for(write_config, sequence_len=64), progress=False)
    rep = data.report
    assert (rep.records, rep.valid) == (5, 3)
    assert sorted((r.source, r.reason) for r in rep.rejected) == [("data.jsonl:3", "missing_field"), ("data.jsonl:5", "invalid_json")]
    assert [(r.source, r.reason) for r in rep.dropped] == [("data.jsonl:4", "too_long")]
    samples = {s.source: s for s in data.train + data.eval}
    assert set(samples) == {"data.jsonl:1", "data.jsonl:2"} and all(isinstance(s, PreferenceSample) for s in samples.values())
    s = samples["data.jsonl:2"]
    assert s.chosen_input_ids == reference(tiny_tok, [u("hi"), a("hello")])
    assert s.rejected_input_ids == reference(tiny_tok, [u("hi"), a("go away")])
    assert rep.tokens_total == sum(len(x.chosen_input_ids) + len(x.rejected_input_ids) for x in samples.values())
    assert rep.tokens_trained == sum(x.n_trained for x in samples.values())
    assert "rejects.jsonl" in capsys.readouterr().err

    truncated = build_data(cfg_for(write_config, sequence_len=64, excess_length_strategy="truncate"), progress=False)
    assert truncated.report.truncated == 1 and not truncated.report.dropped
    s = {x.source: x for x in truncated.train}["data.jsonl:4"]
    assert s.chosen_input_ids == reference(tiny_tok, [u("and?"), a("yes")])  # the first turn was dropped whole


def test_bad_records_are_errors_by_default(tmp_path, write_jsonl, write_config):
    write_jsonl(tmp_path / "data.jsonl", PAIRS[:3])
    with pytest.raises(DataError, match=r"data.jsonl:3: missing_field: no 'rejected' field"):
        build_data(cfg_for(write_config, on_bad_record="error"), progress=False)


def test_kto_examples(tmp_path, write_jsonl, write_config, tiny_tok):
    write_jsonl(tmp_path / "data.jsonl", KTO)
    data = build_data(cfg_for(write_config, rl="kto"), progress=False)
    assert [(r.source, r.reason) for r in data.report.rejected] == [("data.jsonl:3", "bad_label")]
    samples = {s.source: s for s in data.train}
    assert all(isinstance(s, KTOSample) for s in samples.values())
    assert samples["data.jsonl:1"].label is True and samples["data.jsonl:2"].label is False
    assert samples["data.jsonl:2"].input_ids == reference(tiny_tok, [u("2+2?"), a("5")])


@pytest.mark.parametrize("rl,records", [("dpo", PAIRS[:2]), ("kto", KTO[:2])])
def test_cache_round_trip(tmp_path, write_jsonl, write_config, rl, records):
    write_jsonl(tmp_path / "data.jsonl", records)
    cfg = cfg_for(write_config, rl=rl, val_set_size=1)
    first = prepare_data(cfg, progress=False)
    again = prepare_data(cfg, progress=False)
    assert not first.from_cache and again.from_cache
    assert [s.to_json() for s in again.train + again.eval] == [s.to_json() for s in first.train + first.eval]
    assert [type(s) for s in again.train + again.eval] == [type(s) for s in first.train + first.eval]
    assert len(again.eval) == 1
    # SFT and preference data never share an entry
    sft = load_config(write_config(rl=None))[0]
    from magistune.data.cache import cache_key
    from magistune.data.build import resolve_tokenizer_file
    assert cache_key(sft, resolve_tokenizer_file(sft)) != cache_key(cfg, resolve_tokenizer_file(cfg))
