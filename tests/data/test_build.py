"""The pipeline's options and policies, with mistral-common's own encoder as the ground truth for the ids."""

import json

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from magistune.config import ConfigError, load_config
from magistune.data.build import DataError, build_data, prepare_data
from magistune.data.report import format_report
from magistune.data.sample import IGNORE_INDEX
from magistune.tokenizer import SpecialIds

pytestmark = pytest.mark.usefixtures("fast_tokenizers")


def user(text):
    return {"role": "user", "content": text}


def assistant(text, **keys):
    return {"role": "assistant", "content": text, **keys}


def rec(*messages):
    return {"messages": list(messages)}


def reference_ids(tok, messages):
    """What mistral-common's encode_chat_completion gives for the conversation (our keys removed)."""
    clean = [{k: v for k, v in m.items() if k not in ("weight", "train")} for m in messages]
    return tok.encode_chat_completion(ChatCompletionRequest.from_openai(clean)).tokens


def text_ids(tok, text):
    return tok.instruct_tokenizer.tokenizer.encode(text, bos=False, eos=False)


def trained(sample):
    return [t for t in sample.labels if t != IGNORE_INDEX]


def build(write_config, datasets, **top):
    cfg = load_config(write_config(datasets=datasets, **top))[0]
    return build_data(cfg, progress=False)


def by_source(data):
    return {s.source: s for s in data.train + data.eval}


# --- on_bad_record ---------------------------------------------------------------------------------------------

BAD_FILE = [
    rec(user("hi"), assistant("hello")),
    rec(user("hi"), assistant("hello", weight=0.5)),
    rec(user("2+2?"), assistant("4")),
    '{"messages": [',
    rec(user("hi"), assistant("")),
]


def test_on_bad_record_error_lists_every_bad_record(tmp_path, write_jsonl, write_config):
    write_jsonl(tmp_path / "data.jsonl", BAD_FILE)
    cfg = load_config(write_config(on_bad_record="error"))[0]
    with pytest.raises(DataError) as e:
        prepare_data(cfg, progress=False)
    msg = str(e.value)
    assert "3 bad record(s) (bad_weight: 1, empty_assistant: 1, invalid_json: 1)" in msg
    assert "data.jsonl:2: bad_weight: messages[1].weight must be 0 or 1, got 0.5" in msg
    assert "data.jsonl:4: invalid_json: invalid JSON" in msg
    assert "data.jsonl:5: empty_assistant: messages[1]" in msg
    assert "data.jsonl:1" not in msg and "data.jsonl:3" not in msg
    assert "on_bad_record: skip" in msg
    assert not cfg.prepared_dir.exists() or not any(cfg.prepared_dir.iterdir())  # nothing cached


def test_on_bad_record_defaults_to_error(tmp_path, write_jsonl, write_config):
    write_jsonl(tmp_path / "data.jsonl", BAD_FILE)
    with pytest.raises(DataError, match="3 bad record"):
        prepare_data(load_config(write_config())[0], progress=False)


def test_on_bad_record_skip(tmp_path, write_jsonl, write_config, capsys):
    write_jsonl(tmp_path / "data.jsonl", BAD_FILE)
    cfg = load_config(write_config(on_bad_record="skip"))[0]
    data = prepare_data(cfg, progress=False)
    assert sorted(by_source(data)) == ["data.jsonl:1", "data.jsonl:3"]
    assert data.report.records == 5 and data.report.valid == 2 and data.report.kept == 2

    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["source"], r["reason"]) for r in rejects] == [
        ("data.jsonl:2", "bad_weight"), ("data.jsonl:4", "invalid_json"), ("data.jsonl:5", "empty_assistant")]
    assert all(r["message"] for r in rejects)
    assert rejects[0]["record"] == BAD_FILE[1]  # the record itself, to fix it

    err = capsys.readouterr().err
    assert "skipped 3 bad record(s) (bad_weight: 1, empty_assistant: 1, invalid_json: 1)" in err
    assert str(tmp_path / "out" / "rejects.jsonl") in err


# --- system prompt -----------------------------------------------------------------------------------------------

SYS_RECORDS = [
    rec(user("Capital of France?"), assistant("Paris.")),
    rec({"role": "system", "content": "Answer in French."}, user("Capital of Spain?"), assistant("Madrid.")),
]


def _check_system_prompt(tiny_tok, data, prompt):
    samples = by_source(data)
    added = [{"role": "system", "content": prompt}] + SYS_RECORDS[0]["messages"]
    assert samples["data.jsonl:1"].input_ids == reference_ids(tiny_tok, added)
    assert trained(samples["data.jsonl:1"]) == text_ids(tiny_tok, "Paris.") + [SpecialIds.of(tiny_tok).eos]
    # a conversation with its own system message is left alone
    assert samples["data.jsonl:2"].input_ids == reference_ids(tiny_tok, SYS_RECORDS[1]["messages"])


def test_system_prompt(tmp_path, write_jsonl, write_config, tiny_tok):
    write_jsonl(tmp_path / "data.jsonl", SYS_RECORDS)
    data = build(write_config, [{"path": "data.jsonl"}], system_prompt="Be brief.")
    _check_system_prompt(tiny_tok, data, "Be brief.")
    plain = build(write_config, [{"path": "data.jsonl"}])
    assert by_source(plain)["data.jsonl:1"].input_ids == reference_ids(tiny_tok, SYS_RECORDS[0]["messages"])


def test_system_prompt_file(tmp_path, write_jsonl, write_config, tiny_tok):
    write_jsonl(tmp_path / "data.jsonl", SYS_RECORDS)
    (tmp_path / "prompt.txt").write_text("You are a geography tutor.\nBe brief.\n", encoding="utf-8")
    data = build(write_config, [{"path": "data.jsonl"}], system_prompt_file="prompt.txt")
    _check_system_prompt(tiny_tok, data, "You are a geography tutor.\nBe brief.")


def test_system_prompt_file_missing(tmp_path, write_jsonl, write_config):
    write_jsonl(tmp_path / "data.jsonl", SYS_RECORDS)
    with pytest.raises(ConfigError, match="system_prompt_file: .*nope.txt not found"):
        build(write_config, [{"path": "data.jsonl"}], system_prompt_file="nope.txt")


def test_dataset_system_prompt_overrides_top_level(tmp_path, write_jsonl, write_config, tiny_tok):
    write_jsonl(tmp_path / "data.jsonl", SYS_RECORDS)
    data = build(write_config, [{"path": "data.jsonl", "system_prompt": "Dataset prompt."}], system_prompt="Top.")
    _check_system_prompt(tiny_tok, data, "Dataset prompt.")


# --- what is trained ---------------------------------------------------------------------------------------------

MULTI_TURN = rec(user("2+2?"), assistant("Four."), user("3+3?"), assistant("Six."))


def test_all_assistant_turns_trained_by_default(tmp_path, write_jsonl, write_config, tiny_tok):
    write_jsonl(tmp_path / "data.jsonl", [MULTI_TURN])
    s = build(write_config, [{"path": "data.jsonl"}]).train[0]
    eos = SpecialIds.of(tiny_tok).eos
    assert s.input_ids == reference_ids(tiny_tok, MULTI_TURN["messages"])
    assert trained(s) == text_ids(tiny_tok, "Four.") + [eos] + text_ids(tiny_tok, "Six.") + [eos]
    assert s.labels[0] == IGNORE_INDEX  # BOS
    # labels are aligned with input_ids: a trained position holds its own token
    assert all(lab in (IGNORE_INDEX, tok) for lab, tok in zip(s.labels, s.input_ids))


def test_train_on_last_assistant(tmp_path, write_jsonl, write_config, tiny_tok):
    write_jsonl(tmp_path / "data.jsonl", [MULTI_TURN])
    s = build(write_config, [{"path": "data.jsonl", "train_on": "last_assistant"}]).train[0]
    assert s.input_ids == reference_ids(tiny_tok, MULTI_TURN["messages"])
    last = text_ids(tiny_tok, "Six.") + [SpecialIds.of(tiny_tok).eos]
    assert trained(s) == last
    assert s.labels[-len(last):] == last  # at the very end, where the last answer is


@pytest.mark.parametrize("first", [{"weight": 0}, {"train": False}], ids=["weight0", "train_false"])
def test_weight_zero_masks_a_turn(tmp_path, write_jsonl, write_config, tiny_tok, first):
    messages = [user("2+2?"), assistant("Five.", **first), user("Really?"), assistant("Four.", weight=1)]
    write_jsonl(tmp_path / "data.jsonl", [rec(*messages)])
    s = build(write_config, [{"path": "data.jsonl"}]).train[0]
    assert s.input_ids == reference_ids(tiny_tok, messages)
    assert trained(s) == text_ids(tiny_tok, "Four.") + [SpecialIds.of(tiny_tok).eos]


def test_consecutive_assistant_messages_with_different_weights(tmp_path, write_jsonl, write_config, tiny_tok):
    """mistral-common merges consecutive assistant messages; an untrained one must not become trained."""
    messages = [user("2+2?"), assistant("Let me see.", weight=0), assistant("Four.")]
    write_jsonl(tmp_path / "data.jsonl", [rec(*messages)])
    s = build(write_config, [{"path": "data.jsonl"}]).train[0]
    eos = SpecialIds.of(tiny_tok).eos
    assert trained(s) == text_ids(tiny_tok, "Four.") + [eos]
    seen = text_ids(tiny_tok, "Let me see.")
    assert any(s.input_ids[i:i + len(seen)] == seen for i in range(len(s.input_ids)))


THINK_RECORDS = [
    rec(user("2+2?"), assistant("Four.", reasoning_content="Two and two make four.")),
    rec(user("3+3?"), {"role": "assistant", "content": [{"type": "thinking", "thinking": "Three doubled."},
                                                        {"type": "text", "text": "Six."}]}),
]


@pytest.mark.parametrize("train_thinking", [True, False])
def test_train_thinking(tmp_path, write_jsonl, write_config, tiny_tok, train_thinking):
    write_jsonl(tmp_path / "data.jsonl", THINK_RECORDS)
    samples = by_source(build(write_config, [{"path": "data.jsonl", "train_thinking": train_thinking}]))
    ids = SpecialIds.of(tiny_tok)
    assert ids.has_think
    for line, (thought, answer) in enumerate([("Two and two make four.", "Four."), ("Three doubled.", "Six.")], 1):
        s = samples[f"data.jsonl:{line}"]
        assert s.input_ids == reference_ids(tiny_tok, THINK_RECORDS[line - 1]["messages"])
        think = [ids.begin_think] + text_ids(tiny_tok, thought) + [ids.end_think]
        start = s.input_ids.index(ids.begin_think)
        assert s.input_ids[start:start + len(think)] == think
        answer_ids = text_ids(tiny_tok, answer) + [ids.eos]
        if train_thinking:
            assert trained(s) == think + answer_ids
        else:
            assert trained(s) == answer_ids
            assert s.labels[start:start + len(think)] == [IGNORE_INDEX] * len(think)


def test_train_on_inputs(tmp_path, write_jsonl, write_config, tiny_tok):
    write_jsonl(tmp_path / "data.jsonl", [MULTI_TURN])
    s = build(write_config, [{"path": "data.jsonl", "train_on_inputs": True}]).train[0]
    assert s.input_ids == reference_ids(tiny_tok, MULTI_TURN["messages"])
    assert s.labels == [IGNORE_INDEX] + s.input_ids[1:]


# --- length policy -----------------------------------------------------------------------------------------------

LONG_PROMPT = rec(user("tell me " * 40), assistant("No."))
LONG_ANSWER = rec(user("Count."), assistant(" ".join(str(i) for i in range(60))))
LENGTH_RECORDS = [rec(user("Hi."), assistant("Hello.")), LONG_PROMPT, LONG_ANSWER]


@pytest.fixture
def full_lengths(tmp_path, write_jsonl, write_config):
    write_jsonl(tmp_path / "data.jsonl", LENGTH_RECORDS)
    full = by_source(build(write_config, [{"path": "data.jsonl"}], sequence_len=4096, name="full.yaml"))
    n = {k: len(v) for k, v in full.items()}
    # the premise: a short one, and two longer than 32 — one with its answer past 32, one with it before
    assert n["data.jsonl:1"] < 32 < n["data.jsonl:2"] and n["data.jsonl:3"] > 32
    assert full["data.jsonl:3"].labels[:32] != [IGNORE_INDEX] * 32
    assert full["data.jsonl:2"].labels[:32] == [IGNORE_INDEX] * 32
    return full


def test_excess_length_drop(write_config, full_lengths):
    data = build(write_config, [{"path": "data.jsonl"}], sequence_len=32, excess_length_strategy="drop")
    assert sorted(by_source(data)) == ["data.jsonl:1"]
    rep = data.report
    assert [(r.source, r.reason) for r in rep.dropped] == [("data.jsonl:2", "too_long"), ("data.jsonl:3", "too_long")]
    assert rep.valid == 3 and rep.kept == 1 and rep.truncated == 0
    assert sorted(rep.lengths) == sorted(len(s) for s in full_lengths.values())
    text = format_report(rep, 32)
    assert "dropped for length (> 32 tokens or nothing trained after truncation): 2" in text
    assert "data.jsonl:2: " in text and "data.jsonl:3: " in text


def test_excess_length_truncate(write_config, full_lengths):
    data = build(write_config, [{"path": "data.jsonl"}], sequence_len=32, excess_length_strategy="truncate")
    samples = by_source(data)
    assert sorted(samples) == ["data.jsonl:1", "data.jsonl:3"]
    cut, full = samples["data.jsonl:3"], full_lengths["data.jsonl:3"]
    assert len(cut) == 32
    assert cut.input_ids == full.input_ids[:32] and cut.labels == full.labels[:32]
    rep = data.report
    assert rep.truncated == 1 and rep.kept == 2
    # the long prompt keeps no trained token once cut: dropped, and counted
    assert [r.source for r in rep.dropped] == ["data.jsonl:2"]
    assert "truncated to 32 tokens: 1" in format_report(rep, 32)
    assert "dropped for length (> 32 tokens or nothing trained after truncation): 1" in format_report(rep, 32)


def test_excess_length_per_dataset(write_config, full_lengths):
    data = build(write_config, [{"path": "data.jsonl", "excess_length_strategy": "truncate"}], sequence_len=32,
                 excess_length_strategy="drop")
    assert sorted(by_source(data)) == ["data.jsonl:1", "data.jsonl:3"]


# --- sampling, mixing, splitting ---------------------------------------------------------------------------------

TEN = [rec(user(f"Question {i}?"), assistant(f"Answer {i}.")) for i in range(10)]


def _sources(data):
    return [s.source for s in data.train + data.eval]


def test_max_samples_is_seeded(tmp_path, write_jsonl, write_config):
    write_jsonl(tmp_path / "data.jsonl", TEN)
    ds = [{"path": "data.jsonl", "max_samples": 4}]
    a = build(write_config, ds, seed=1)
    assert len(_sources(a)) == 4 and len(set(_sources(a))) == 4 and a.report.kept == 4
    assert a.report.valid == 10
    assert _sources(build(write_config, ds, seed=1)) == _sources(a)  # same seed, same pick
    others = {tuple(sorted(_sources(build(write_config, ds, seed=s)))) for s in (2, 3, 4)}
    assert others != {tuple(sorted(_sources(a)))}  # the seed matters
    # max_samples larger than the dataset keeps everything
    assert len(_sources(build(write_config, [{"path": "data.jsonl", "max_samples": 50}]))) == 10


@pytest.mark.parametrize("weight,expected", [(2.0, 20), (0.5, 5), (1.5, 15)])
def test_mix_weight(tmp_path, write_jsonl, write_config, weight, expected):
    write_jsonl(tmp_path / "data.jsonl", TEN)
    data = build(write_config, [{"path": "data.jsonl", "mix_weight": weight}])
    sources = _sources(data)
    assert len(sources) == expected and data.report.kept == expected
    counts = {s: sources.count(s) for s in set(sources)}
    assert max(counts.values()) <= int(weight) + 1
    if weight >= 1:
        assert len(counts) == 10 and min(counts.values()) >= int(weight)
    assert sources == _sources(build(write_config, [{"path": "data.jsonl", "mix_weight": weight}]))


def test_multiple_datasets_mixed(tmp_path, write_jsonl, write_config):
    write_jsonl(tmp_path / "a.jsonl", TEN)
    write_jsonl(tmp_path / "b.jsonl", TEN[:4])
    data = build(write_config, [{"path": "a.jsonl", "max_samples": 3}, {"path": "b.jsonl", "mix_weight": 2}])
    sources = _sources(data)
    assert sum(s.startswith("a.jsonl:") for s in sources) == 3
    assert sum(s.startswith("b.jsonl:") for s in sources) == 8
    assert data.report.records == 14 and data.report.kept == 11


@pytest.mark.parametrize("val,n_eval", [(0.2, 2), (0.25, 2), (3, 3), (0.01, 1), (0, 0)])
def test_val_set_size(tmp_path, write_jsonl, write_config, val, n_eval):
    write_jsonl(tmp_path / "data.jsonl", TEN)
    data = build(write_config, [{"path": "data.jsonl"}], val_set_size=val)
    train, eval_ = [s.source for s in data.train], [s.source for s in data.eval]
    assert len(eval_) == n_eval and len(train) == 10 - n_eval
    assert not set(train) & set(eval_) and sorted(train + eval_) == sorted(f"data.jsonl:{i}" for i in range(1, 11))
    assert (data.report.train_samples, data.report.eval_samples) == (10 - n_eval, n_eval)
    again = build(write_config, [{"path": "data.jsonl"}], val_set_size=val)
    assert [s.source for s in again.eval] == eval_


def test_report_token_counts(tmp_path, write_jsonl, write_config):
    write_jsonl(tmp_path / "data.jsonl", TEN + [MULTI_TURN])
    data = build(write_config, [{"path": "data.jsonl"}], val_set_size=0.2)
    samples = data.train + data.eval
    assert data.report.tokens_total == sum(len(s) for s in samples)
    assert data.report.tokens_trained == sum(len(trained(s)) for s in samples)
    assert 0 < data.report.tokens_trained < data.report.tokens_total


def test_multiple_datasets_each_with_own_options(tmp_path, write_jsonl, write_config, tiny_tok):
    write_jsonl(tmp_path / "chat.jsonl", [MULTI_TURN])
    write_jsonl(tmp_path / "think.jsonl", THINK_RECORDS[:1])
    data = build(write_config, [
        {"path": "chat.jsonl", "train_on": "last_assistant", "system_prompt": "Be brief."},
        {"path": "think.jsonl", "train_thinking": False},
    ], system_prompt="Top-level prompt.")
    samples = by_source(data)
    eos = SpecialIds.of(tiny_tok).eos
    chat = samples["chat.jsonl:1"]
    assert chat.input_ids == reference_ids(tiny_tok, [{"role": "system", "content": "Be brief."}] + MULTI_TURN["messages"])
    assert trained(chat) == text_ids(tiny_tok, "Six.") + [eos]
    think = samples["think.jsonl:1"]
    assert think.input_ids == reference_ids(
        tiny_tok, [{"role": "system", "content": "Top-level prompt."}] + THINK_RECORDS[0]["messages"])
    assert trained(think) == text_ids(tiny_tok, "Four.") + [eos]


def test_nothing_left_to_train(tmp_path, write_jsonl, write_config):
    write_jsonl(tmp_path / "data.jsonl", [LONG_PROMPT])
    with pytest.raises(DataError, match="no sample is left to train on"):
        build(write_config, [{"path": "data.jsonl"}], sequence_len=32)


@pytest.mark.parametrize("val,warns", [(0.6, True), (5, False), (6, True), (0.5, False)])
def test_val_set_size_leaving_fewer_train_than_eval_warns(tmp_path, write_jsonl, write_config, val, warns):
    write_jsonl(tmp_path / "data.jsonl", TEN)
    data = build(write_config, [{"path": "data.jsonl"}], val_set_size=val)
    got = [(w.source, w.reason) for w in data.report.warnings]
    assert got == ([("val_set_size", "small_train_split")] if warns else [])
    if warns:
        n_eval = len(data.eval)
        assert f"val_set_size {val:g} leaves {10 - n_eval} train and {n_eval} eval sample(s)" in data.report.warnings[0].message
        assert "warnings: 1\n  small_train_split: 1" in format_report(data.report, 512)


def test_system_prompt_file_bom_and_invalid_utf8(tmp_path, write_jsonl, write_config, tiny_tok):
    write_jsonl(tmp_path / "data.jsonl", SYS_RECORDS)
    (tmp_path / "prompt.txt").write_bytes(b"\xef\xbb\xbfBe brief.\n")  # what Notepad writes
    data = build(write_config, [{"path": "data.jsonl"}], system_prompt_file="prompt.txt")
    _check_system_prompt(tiny_tok, data, "Be brief.")
    (tmp_path / "prompt.txt").write_bytes(b"Be br\xefef.\n")
    with pytest.raises(ConfigError, match=r"system_prompt_file: .*prompt.txt: not valid UTF-8 \(byte 6\)"):
        build(write_config, [{"path": "data.jsonl"}], system_prompt_file="prompt.txt")


# --- the model's SYSTEM_PROMPT.txt as the default ----------------------------------------------------------------

MODEL_PROMPT = "Draft your thinking first.\nUse this template:[THINK]Your thoughts.[/THINK]Then the answer."


def _model_folder(tmp_path):
    """A base_model folder with Magistral's tokenizer file and a SYSTEM_PROMPT.txt in 2509's [THINK] format."""
    from magistune.tokenizer import tiny_tokenizer_path

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tekken.json").symlink_to(tiny_tokenizer_path())
    (folder / "SYSTEM_PROMPT.txt").write_text(MODEL_PROMPT + "\n", encoding="utf-8")
    return folder


def test_model_system_prompt_is_the_default(tmp_path, write_jsonl, write_config, tiny_tok, capsys):
    write_jsonl(tmp_path / "data.jsonl", SYS_RECORDS)
    folder = _model_folder(tmp_path)
    samples = by_source(build(write_config, [{"path": "data.jsonl"}], base_model=str(folder)))
    # mistral-common's ids for Mistral's model-card system message: text, closed thinking, text
    system = {"role": "system", "content": [
        {"type": "text", "text": "Draft your thinking first.\nUse this template:"},
        {"type": "thinking", "thinking": "Your thoughts.", "closed": True},
        {"type": "text", "text": "Then the answer."}]}
    assert samples["data.jsonl:1"].input_ids == reference_ids(tiny_tok, [system] + SYS_RECORDS[0]["messages"])
    assert SpecialIds.of(tiny_tok).begin_think in samples["data.jsonl:1"].input_ids  # the control token, not text
    assert samples["data.jsonl:2"].input_ids == reference_ids(tiny_tok, SYS_RECORDS[1]["messages"])
    assert trained(samples["data.jsonl:1"]) == text_ids(tiny_tok, "Paris.") + [SpecialIds.of(tiny_tok).eos]
    assert str(folder / "SYSTEM_PROMPT.txt") in capsys.readouterr().err
    # system_prompt: "" turns it off; an explicit prompt wins
    off = by_source(build(write_config, [{"path": "data.jsonl"}], base_model=str(folder), system_prompt=""))
    assert off["data.jsonl:1"].input_ids == reference_ids(tiny_tok, SYS_RECORDS[0]["messages"])
    own = by_source(build(write_config, [{"path": "data.jsonl"}], base_model=str(folder), system_prompt="Be brief."))
    assert own["data.jsonl:1"].input_ids == reference_ids(tiny_tok, [
        {"role": "system", "content": "Be brief."}] + SYS_RECORDS[0]["messages"])
