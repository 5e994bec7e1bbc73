"""Golden tests: our one-pass ids equal mistral-common's `encode_chat_completion`, for every tokenizer version,
over many generated conversations, and every trained span is exactly the library's encoding of one
assistant message (its thinking, text, tool calls and `</s>`)."""

from __future__ import annotations

import json
import random

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

from magistune.data.encode import ConversationEncoder, LabelOptions, assistant_run_weights
from magistune.data.records import RecordError, RecordOptions, parse_record
from magistune.data.sample import IGNORE_INDEX
from magistune.data.synthetic import generate
from magistune.tokenizer import (
    TINY_SPECIAL_TOKENS, load_tokenizer, shipped_tokenizer_file, tiny_tekken_json, tiny_tokenizer_path,
)

N_CONVERSATIONS = 60
def _derived_tekken(tmp_path_factory, version: str) -> str:
    data = tiny_tekken_json()
    data["config"]["version"] = version
    data.pop("image")
    if version == "v7":
        data.pop("special_tokens")  # v7 and older use the legacy control tokens
    else:
        data["special_tokens"] = [{"rank": i, "token_str": s, "is_control": True}
                                  for i, s in enumerate(TINY_SPECIAL_TOKENS[:-2])]  # no [THINK] before v13
    path = tmp_path_factory.mktemp(f"tekken_{version}") / "tekken.json"
    path.write_text(json.dumps(data))
    return str(path)


TOKENIZERS = {
    "sp-v1": lambda f: str(shipped_tokenizer_file("tokenizer.model.v1")),
    "sp-v2": lambda f: str(shipped_tokenizer_file("mistral_instruct_tokenizer_240216.model.v2")),
    "sp-v3": lambda f: str(shipped_tokenizer_file("mistral_instruct_tokenizer_240323.model.v3")),
    "sp-v7": lambda f: str(shipped_tokenizer_file("mistral_instruct_tokenizer_241114.model.v7")),
    "tekken-v3": lambda f: str(shipped_tokenizer_file("tekken_240911.json")),
    "tekken-v7": lambda f: _derived_tekken(f, "v7"),
    "tekken-v11": lambda f: _derived_tekken(f, "v11"),
    "tekken-v13": lambda f: str(tiny_tokenizer_path()),
}


@pytest.fixture(scope="module")
def tiny_tok():
    return load_tokenizer(tiny_tokenizer_path())


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tok(request, tmp_path_factory):
    return load_tokenizer(TOKENIZERS[request.param](tmp_path_factory))


def _features(tok):
    version = tok.instruct_tokenizer.tokenizer.version.value
    return version != "v1", version == "v13"


def test_ids_equal_encode_chat_completion(tok):
    rng = random.Random(0)
    tools_ok, think_ok = _features(tok)
    enc = ConversationEncoder(tok)
    ok = 0
    for _ in range(N_CONVERSATIONS):
        record = generate(rng, tools_ok, think_ok)
        conv = parse_record(record, RecordOptions(supports_thinking=enc.ids.has_think))
        try:
            expected = tok.encode_chat_completion(conv.request).tokens
        except Exception:
            with pytest.raises(RecordError):
                enc.encode(conv)
            continue
        ids, labels, _ = enc.encode(conv)
        assert ids == expected, record
        assert len(labels) == len(ids)
        ok += 1
        # Without weights splitting assistant runs, it is also the plain OpenAI conversion's encoding.
        plain = [{k: v for k, v in m.items() if k != "weight"} for m in record["messages"]]
        if len(assistant_run_weights(conv)) == sum(
                1 for a, b in zip([None] + plain, plain) if b["role"] == "assistant" and (a or {}).get("role") != "assistant"):
            ref = tok.encode_chat_completion(ChatCompletionRequest.from_openai(plain, tools=record.get("tools")))
            assert ids == ref.tokens
    assert ok >= N_CONVERSATIONS * 0.8, f"only {ok} conversations were valid for this tokenizer"


def _trained_runs(ids, labels):
    runs, cur = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_trained_spans_are_exactly_the_assistant_messages(tok):
    rng = random.Random(1)
    tools_ok, think_ok = _features(tok)
    enc = ConversationEncoder(tok)
    it = tok.instruct_tokenizer
    raw = it.tokenizer
    for _ in range(N_CONVERSATIONS // 2):
        conv = parse_record(generate(rng, tools_ok, think_ok), RecordOptions(supports_thinking=enc.ids.has_think))
        try:
            ids, labels, _ = enc.encode(conv)
        except RecordError:
            continue
        # mistral-common's own normalised messages: every trained one must appear as a trained span, verbatim.
        normalised = tok._instruct_request_normalizer.from_chat_completion_request(conv.request)
        _, last_user = it.find_first_last_user(normalised)
        assistants = [(i, m) for i, m in enumerate(normalised.messages) if isinstance(m, AssistantMessage)]
        weights = assistant_run_weights(conv)
        expected = [it.encode_assistant_message(m, i < last_user) for (i, m), w in zip(assistants, weights) if w == 1]
        # Adjacent trained messages (a tool-call turn directly after …) form one run: compare concatenations.
        assert sum(_trained_runs(ids, labels), []) == sum(expected, [])
        for span in _trained_runs(ids, labels):
            assert span[-1] == raw.eos_id  # the model learns to stop
        for (i, m), w in zip(assistants, weights):
            if w == 1 and isinstance(m.content, str) and not m.tool_calls:
                text = raw.decode(it.encode_assistant_message(m, i < last_user), special_token_policy=SpecialTokenPolicy.KEEP)
                assert text.endswith("</s>")


def test_thinking_span_decodes_and_can_be_masked(tiny_tok):
    enc = ConversationEncoder(tiny_tok)
    raw = tiny_tok.instruct_tokenizer.tokenizer
    record = {"messages": [
        {"role": "user", "content": "What is 2+2? [THINK]"},
        {"role": "assistant", "reasoning_content": "Two plus two is four.", "content": "It is 4."}]}
    conv = parse_record(record, RecordOptions())
    ids, labels, _ = enc.encode(conv)
    trained = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert raw.decode(trained, special_token_policy=SpecialTokenPolicy.KEEP) == "[THINK]Two plus two is four.[/THINK]It is 4.</s>"
    ids2, labels2, _ = enc.encode(conv, LabelOptions(train_thinking=False))
    assert ids2 == ids
    trained = [i for i, label in zip(ids2, labels2) if label != IGNORE_INDEX]
    assert raw.decode(trained, special_token_policy=SpecialTokenPolicy.KEEP) == "It is 4.</s>"
    # The user's literal "[THINK]" is text, not the control token: it is masked and is not a think span.
    assert ids.count(enc.ids.begin_think) == 1


def test_unclosed_thinking_masked_to_its_end(tiny_tok):
    enc = ConversationEncoder(tiny_tok)
    raw = tiny_tok.instruct_tokenizer.tokenizer
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "still thinking", "closed": False}, {"type": "text", "text": "Answer."}]}]}
    ids, labels, _ = enc.encode(parse_record(record, RecordOptions()), LabelOptions(train_thinking=False))
    assert ids == tiny_tok.encode_chat_completion(parse_record(record, RecordOptions()).request).tokens
    trained = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert raw.decode(trained, special_token_policy=SpecialTokenPolicy.KEEP) == "Answer.</s>"


def test_weights_and_last_assistant(tiny_tok):
    enc = ConversationEncoder(tiny_tok)
    raw = tiny_tok.instruct_tokenizer.tokenizer
    record = {"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "first", "weight": 0},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "second", "train": True},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "third"}]}

    def trained_text(opts):
        ids, labels, _ = enc.encode(parse_record(record, opts))
        return [raw.decode(r, special_token_policy=SpecialTokenPolicy.KEEP) for r in _trained_runs(ids, labels)]

    assert trained_text(RecordOptions()) == ["second</s>", "third</s>"]
    assert trained_text(RecordOptions(train_on="last_assistant")) == ["third</s>"]


def test_train_on_inputs_trains_everything_but_bos(tiny_tok):
    enc = ConversationEncoder(tiny_tok)
    record = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                           {"role": "assistant", "content": "a", "weight": 0}, {"role": "user", "content": "u2"},
                           {"role": "assistant", "content": "b"}]}
    ids, labels, _ = enc.encode(parse_record(record, RecordOptions()), LabelOptions(train_on_inputs=True))
    assert labels[0] == IGNORE_INDEX and labels[1:] == ids[1:]
