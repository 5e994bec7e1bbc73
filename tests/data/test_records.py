"""Every bad-record reason: the report names `file:line`, the reason code and a helpful message."""

import json
import re
from pathlib import Path

import pytest
import yaml

from magistune.config import load_config
from magistune.data.build import encode_all
from magistune.data.records import RecordError, RecordOptions, parse_record
from magistune.tokenizer import shipped_tokenizer_file

pytestmark = pytest.mark.usefixtures("fast_tokenizers")

U = {"role": "user", "content": "What is two plus two?"}
A = {"role": "assistant", "content": "Four."}
GOOD = {"messages": [U, A]}


def call(id_="abcdef123", name="get_weather", arguments='{"city": "Paris"}'):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_conv(call_obj, tool_msg):
    return {"messages": [U, {"role": "assistant", "content": "", "tool_calls": [call_obj]}, tool_msg,
                         {"role": "assistant", "content": "Sunny."}]}


TOOL_RESULT = {"role": "tool", "tool_call_id": "abcdef123", "content": "sunny"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]

# (id, record or raw line, reason, what the message must say)
BAD = [
    ("invalid_json", '{"messages": [', "invalid_json", "invalid JSON"),
    ("record_not_object", "[1, 2]", "wrong_type", "a record must be a JSON object, got list"),
    ("messages_not_list", {"messages": "hello"}, "wrong_type", "'messages' must be a list of messages, got str"),
    ("messages_empty", {"messages": []}, "no_messages", "'messages' is an empty list"),
    ("no_messages_field", {"conversation": [U, A]}, "no_messages", "no 'messages' field"),
    ("message_not_object", {"messages": ["hi", A]}, "wrong_type", "messages[0] must be an object"),
    ("content_number", {"messages": [{"role": "user", "content": 5}, A]}, "wrong_type",
     "messages[0].content must be a string or a list of parts, got int"),
    ("part_without_type", {"messages": [{"role": "user", "content": [{"text": "hi"}]}, A]}, "wrong_type",
     "messages[0].content[0] must be an object with a string 'type'"),
    ("text_part_without_text", {"messages": [{"role": "user", "content": [{"type": "text"}]}, A]}, "wrong_type",
     "messages[0].content[0]: a 'text' part needs a string 'text'"),
    ("unknown_role", {"messages": [{"role": "bot", "content": "hi"}, A]}, "unknown_role",
     "messages[0].role 'bot' is not one of system, user, assistant, tool"),
    ("unknown_part_type", {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}, A]},
     "unknown_part_type", "messages[0].content[0]: unknown part type 'audio'"),
    ("last_not_assistant", {"messages": [U, A, {"role": "user", "content": "thanks"}]}, "last_not_assistant",
     "the last message is from 'user'"),
    ("tool_call_without_id", tool_conv({"type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
                                       TOOL_RESULT), "tool_call_without_id", "messages[1].tool_calls[0] has no 'id'"),
    ("tool_call_null_id", tool_conv(call(id_="null"), TOOL_RESULT), "tool_call_without_id", "has no 'id'"),
    ("tool_arguments_not_json", tool_conv(call(arguments="{city: Paris"), TOOL_RESULT), "bad_tool_arguments",
     "messages[1].tool_calls[0].function.arguments is not valid JSON"),
    ("tool_message_without_id", tool_conv(call(), {"role": "tool", "content": "sunny"}), "tool_message_without_id",
     "messages[2]: a tool message needs a 'tool_call_id'"),
    ("weight_half", {"messages": [U, dict(A, weight=0.5)]}, "bad_weight", "messages[1].weight must be 0 or 1, got 0.5"),
    ("weight_two", {"messages": [U, dict(A, weight=2)]}, "bad_weight", "messages[1].weight must be 0 or 1, got 2"),
    ("weight_string", {"messages": [U, dict(A, weight="1")]}, "bad_weight", "messages[1].weight must be 0 or 1, got '1'"),
    ("weight_bool", {"messages": [U, dict(A, weight=True)]}, "bad_weight", "messages[1].weight must be 0 or 1, got True"),
    ("train_string", {"messages": [U, dict(A, train="yes")]}, "bad_weight", "messages[1].train must be true or false"),
    ("weight_contradicts_train", {"messages": [U, dict(A, weight=1, train=False)]}, "bad_weight",
     "messages[1]: weight 1 contradicts train False"),
    ("weight_on_user", {"messages": [dict(U, weight=1), A]}, "bad_weight",
     "messages[0]: weight/train is only meaningful on assistant messages"),
    ("all_weights_zero", {"messages": [U, dict(A, weight=0), {"role": "user", "content": "And 3+3?"},
                                       {"role": "assistant", "content": "Six.", "train": False}]},
     "no_trained_tokens", "no token is trained"),
    ("empty_assistant", {"messages": [U, {"role": "assistant", "content": ""}]}, "empty_assistant",
     "messages[1]: an assistant message needs content, reasoning or tool_calls"),
    ("tool_result_unknown_id", tool_conv(call(), dict(TOOL_RESULT, tool_call_id="zzzzzzzzz")),
     "rejected_by_mistral_common", "Unexpected tool call id zzzzzzzzz"),
    ("system_after_assistant", {"messages": [U, A, {"role": "system", "content": "Be brief."},
                                             {"role": "assistant", "content": "OK."}]},
     "rejected_by_mistral_common", "Unexpected role 'system' after role 'assistant'"),
    ("starts_with_assistant", {"messages": [A]}, "rejected_by_mistral_common",
     "Conversation must start with a user message or system message"),
    ("bad_tool_name", tool_conv(call(name="get weather!"), TOOL_RESULT), "rejected_by_mistral_common",
     "Function name was get weather!"),
    ("tools_malformed", {"messages": [U, A], "tools": [{"type": "function", "function": {"name": 5}}]},
     "invalid_format", "mistral-common rejected the record"),
    ("thinking_in_user_message", {"messages": [{"role": "user", "content": [{"type": "thinking", "thinking": "x"}]}, A]},
     "invalid_format", "ThinkChunk cannot be used in user message"),
]

GOOD_LINES = [
    GOOD,
    {"messages": [U, {"role": "assistant", "content": "Four.", "reasoning_content": "2+2=4"}]},
    dict(tool_conv(call(), TOOL_RESULT), tools=TOOLS),
    {"messages": [U, dict(A, weight=0), {"role": "user", "content": "And 3+3?"}, dict(A, content="Six.", weight=1.0)]},
]


def _write(path: Path, items) -> list[int]:
    """Writes items (raw str lines or JSON) after one good line; returns each item's 1-based line number."""
    lines = [json.dumps(GOOD)] + [i if isinstance(i, str) else json.dumps(i) for i in items]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return list(range(2, len(lines) + 1))


def _config(folder: Path, data: str, **keys):
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({"base_model": "tiny-random", "datasets": [{"path": data}], "output_dir": "out",
                                    "sequence_len": 512, **keys}), encoding="utf-8")
    return load_config(path)[0]


@pytest.fixture(scope="module")
def bad_report(tmp_path_factory, fast_tokenizers):
    folder = tmp_path_factory.mktemp("records")
    lines = _write(folder / "bad.jsonl", [rec for _, rec, _, _ in BAD] + GOOD_LINES)
    samples, rep, _ = encode_all(_config(folder, "bad.jsonl"), progress=False)
    return {r.source: r for r in rep.rejected}, lines, samples, rep


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_record_reason_location_message(bad_report, case):
    by_source, lines, _, _ = bad_report
    _, _, reason, message = case
    where = f"bad.jsonl:{lines[BAD.index(case)]}"
    assert where in by_source, f"{where} was not rejected; rejected: {sorted(by_source)}"
    rejected = by_source[where]
    assert rejected.reason == reason, rejected.message
    assert message in rejected.message


def test_only_bad_records_rejected(bad_report):
    by_source, lines, samples, rep = bad_report
    good_sources = {"bad.jsonl:1"} | {f"bad.jsonl:{n}" for n in lines[len(BAD):]}
    assert {s.source for s in samples} == good_sources
    assert set(by_source) == {f"bad.jsonl:{n}" for n in lines[:len(BAD)]}
    assert rep.records == len(BAD) + len(GOOD_LINES) + 1
    assert rep.valid == len(good_sources)
    # one Rejected per bad record, and the counts per reason add up
    assert len(rep.rejected) == len(BAD)
    assert sum(rep.reject_counts().values()) == len(BAD)
    assert rep.reject_counts()["bad_weight"] == sum(1 for c in BAD if c[2] == "bad_weight")


def test_bad_record_keeps_the_record_for_the_rejects_file(bad_report):
    by_source, lines, _, _ = bad_report
    i = [c[0] for c in BAD].index("weight_half")
    assert by_source[f"bad.jsonl:{lines[i]}"].record == BAD[i][1]


# --- thinking and images on tokenizers without [THINK] / an image config (mistral-common's shipped files) -------

THINK_BAD = [
    ("thinking_part", {"messages": [U, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "2+2=4"}, {"type": "text", "text": "Four."}]}]},
     "messages[1].content[0]: thinking part, but the tokenizer has no [THINK] token"),
    ("reasoning_content", {"messages": [U, dict(A, reasoning_content="2+2=4")]},
     "messages[1] has reasoning_content, but the tokenizer has no [THINK] token"),
    ("reasoning", {"messages": [U, dict(A, reasoning="2+2=4")]},
     "messages[1] has reasoning_content, but the tokenizer has no [THINK] token"),
]
IMAGE_RECORD = {"messages": [{"role": "user", "content": [
    {"type": "text", "text": "What is this?"},
    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}, A]}


def _report_with(tmp_path_factory, tokenizer_name: str, records: list):
    folder = tmp_path_factory.mktemp(tokenizer_name.replace(".", "_"))
    lines = _write(folder / "data.jsonl", records)
    cfg = _config(folder, "data.jsonl", tokenizer_path=str(shipped_tokenizer_file(tokenizer_name)))
    samples, rep, tok_file = encode_all(cfg, progress=False)
    assert tok_file == shipped_tokenizer_file(tokenizer_name)
    return {r.source: r for r in rep.rejected}, lines, samples


@pytest.fixture(scope="module")
def v3_report(tmp_path_factory, fast_tokenizers):
    return _report_with(tmp_path_factory, "tekken_240911.json", [rec for _, rec, _ in THINK_BAD])


@pytest.mark.parametrize("case", THINK_BAD, ids=[c[0] for c in THINK_BAD])
def test_thinking_without_think_token(v3_report, case):
    by_source, lines, samples = v3_report
    where = f"data.jsonl:{lines[THINK_BAD.index(case)]}"
    assert by_source[where].reason == "thinking_unsupported"
    assert case[2] in by_source[where].message
    assert "needs v13" in by_source[where].message
    assert [s.source for s in samples] == ["data.jsonl:1"]  # the plain conversation is fine on v3


def test_image_part_on_tokenizer_without_image_config(tmp_path_factory, fast_tokenizers):
    # tekken_240718.json (Mistral Nemo) has no image config
    by_source, lines, samples = _report_with(tmp_path_factory, "tekken_240718.json", [IMAGE_RECORD])
    rejected = by_source[f"data.jsonl:{lines[0]}"]
    assert rejected.reason == "image_unsupported"
    assert rejected.message.startswith("messages[0].content[1]: ")
    assert re.search(r"not supported yet|no image config", rejected.message), rejected.message
    assert [s.source for s in samples] == ["data.jsonl:1"]


def test_thinking_accepted_on_v13(tiny_tok):
    for _, rec, _ in THINK_BAD:
        conv = parse_record(rec, RecordOptions(supports_thinking=True))
        assert conv.weights == [1]


# --- parse_record details ------------------------------------------------------------------------------------

def test_weights_accept_0_1_and_train():
    rec = {"messages": [U, dict(A, weight=0), U, dict(A, train=True), U, dict(A, weight=1, train=True), U,
                        dict(A, train=False), U, A]}
    assert parse_record(rec, RecordOptions()).weights == [0, 1, 1, 0, 1]


def test_train_on_last_assistant_keeps_only_the_last_weight():
    rec = {"messages": [U, A, U, A, U, A]}
    assert parse_record(rec, RecordOptions(train_on="last_assistant")).weights == [0, 0, 1]
    rec = {"messages": [U, A, U, dict(A, weight=0)]}
    assert parse_record(rec, RecordOptions(train_on="last_assistant")).weights == [0, 0]


def test_custom_messages_and_tools_fields():
    rec = {"conversation": [U, A], "functions": TOOLS}
    conv = parse_record(rec, RecordOptions(field_messages="conversation", field_tools="functions"))
    assert [t.function.name for t in conv.request.tools] == ["get_weather"]
    with pytest.raises(RecordError) as e:
        parse_record(rec, RecordOptions())
    assert e.value.reason == "no_messages"


def test_none_valued_keys_are_absent():
    """Parquet and datasets rows fill absent struct keys with None, also inside content parts."""
    rec = {"messages": [
        {"role": "user", "content": "hi", "weight": None, "tool_calls": None, "tool_call_id": None},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "text": None, "closed": None},
                                          {"type": "text", "text": "yo", "thinking": None, "closed": None}],
         "weight": None, "train": None, "tool_calls": None, "reasoning_content": None},
    ], "tools": None}
    plain = {"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm"},
                                                            {"type": "text", "text": "yo"}]}]}
    assert parse_record(rec, RecordOptions()).request == parse_record(plain, RecordOptions()).request


def test_thinking_closed_must_be_bool():
    rec = {"messages": [U, {"role": "assistant", "content": [{"type": "thinking", "thinking": "x", "closed": "no"},
                                                             {"type": "text", "text": "y"}]}]}
    with pytest.raises(RecordError) as e:
        parse_record(rec, RecordOptions())
    assert e.value.reason == "wrong_type" and "'closed' must be true or false" in e.value.message


def test_unknown_message_key_is_an_error_not_a_silent_drop():
    from magistune.data.records import RecordError, RecordOptions, parse_record
    import pytest as _pytest

    record = {"messages": [{"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a", "reasoning_contnt": "typo"}]}
    with _pytest.raises(RecordError) as e:
        parse_record(record, RecordOptions())
    assert e.value.reason == "unknown_key" and "reasoning_contnt" in e.value.message


# --- warnings: kept, counted, listed with file:line -----------------------------------------------------------

def test_tool_call_to_an_undeclared_function_warns():
    declared = parse_record(dict(tool_conv(call(), TOOL_RESULT), tools=TOOLS), RecordOptions())
    assert declared.warnings == []
    other = parse_record(dict(tool_conv(call(name="get_time"), TOOL_RESULT), tools=TOOLS), RecordOptions())
    assert other.warnings == [("undeclared_tool", "messages[1].tool_calls[0] calls 'get_time', which 'tools' does "
                                                  "not declare (declared: get_weather)")]
    none = parse_record(tool_conv(call(), TOOL_RESULT), RecordOptions())
    assert none.warnings == [("undeclared_tool", "messages[1].tool_calls[0] calls 'get_weather', which 'tools' does "
                                                 "not declare (the record declares no tools)")]


def test_undeclared_tool_warnings_are_counted_in_the_report(tmp_path, write_jsonl, write_config, capsys):
    from magistune.data.build import prepare_data
    from magistune.data.report import format_report

    write_jsonl(tmp_path / "data.jsonl", [GOOD, dict(tool_conv(call(name="get_time"), TOOL_RESULT), tools=TOOLS),
                                          dict(tool_conv(call(), TOOL_RESULT), tools=TOOLS), tool_conv(call(), TOOL_RESULT)])
    cfg = load_config(write_config())[0]
    data = prepare_data(cfg, progress=False)
    assert data.report.kept == 4 and not data.report.rejected  # a warning, not an error
    assert [(w.source, w.reason) for w in data.report.warnings] == [("data.jsonl:2", "undeclared_tool"),
                                                                     ("data.jsonl:4", "undeclared_tool")]
    report = format_report(data.report, cfg.sequence_len)
    assert "warnings: 2\n  undeclared_tool: 2\n    data.jsonl:2: undeclared_tool: messages[1].tool_calls[0] calls " \
           "'get_time'" in report
    err = capsys.readouterr().err  # train prints no report: prepare_data says it on stderr
    assert "warning: 2 data warning(s) (undeclared_tool: 2); the samples are kept" in err and "data.jsonl:4: undeclared_tool" in err
    again = prepare_data(load_config(write_config())[0], progress=False)
    assert again.from_cache and [w.source for w in again.report.warnings] == ["data.jsonl:2", "data.jsonl:4"]
    assert "data.jsonl:4: undeclared_tool" in capsys.readouterr().err
