"""Preference data: chosen/rejected (and KTO) ids equal mistral-common's `encode_chat_completion` (fine-tuning
mode) of prompt + answer, labels cover the final answer only, the prompt ids are shared, bad records get a reason."""

import random

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

from magistune.data.encode import ConversationEncoder
from magistune.data.errors import RecordError
from magistune.data.preference import PreferenceEncoder, fit, split_record, to_sample
from magistune.data.records import RecordOptions
from magistune.data.sample import IGNORE_INDEX, KTOSample, PreferenceSample
from magistune.data.synthetic import generate
from magistune.tokenizer import load_tokenizer, shipped_tokenizer_file, tiny_tokenizer_path

TOKENIZERS = {"tekken-v13": lambda: tiny_tokenizer_path(), "tekken-v3": lambda: shipped_tokenizer_file("tekken_240911.json"),
              "sp-v7": lambda: shipped_tokenizer_file("mistral_instruct_tokenizer_241114.model.v7")}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def toks(request, tokenizer_loader):
    path = TOKENIZERS[request.param]()
    return tokenizer_loader(path), load_tokenizer(path, mode=ValidationMode.test)


def _plain(messages):
    return [{k: v for k, v in m.items() if k != "weight"} for m in messages]


def _reference(tok, messages, tools):
    return tok.encode_chat_completion(ChatCompletionRequest.from_openai(messages, tools=tools)).tokens


def _samples(tok, record, kto=False, **opts):
    enc = ConversationEncoder(tok)
    penc = PreferenceEncoder(enc, RecordOptions(supports_thinking=enc.ids.has_think, **opts))
    rec = split_record(record, kto)
    return rec, to_sample(rec, penc.encode(rec), "data.jsonl:1")


def _check_sequence(tok, test_tok, ids, labels, prompt, answer, tools):
    assert ids == _reference(tok, prompt + [answer], tools)
    p = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    assert labels[:p] == [IGNORE_INDEX] * p and labels[p:] == ids[p:]  # the answer alone, whole
    # The prompt is what mistral-common encodes for generation from that prompt (test mode: it ends with [/INST]
    # or a tool result): the answer is exactly the labelled tail.
    assert ids[:p] == _reference(test_tok, prompt, tools)
    assert ids[-1] == tok.instruct_tokenizer.tokenizer.eos_id
    return p


def test_pairs_equal_encode_chat_completion(toks):
    tok, test_tok = toks
    version = tok.instruct_tokenizer.tokenizer.version.value
    tools_ok, think_ok = version != "v1", version == "v13"
    rng = random.Random(0)
    checked = 0
    for n in range(40):
        conv, other = generate(rng, tools_ok, think_ok), generate(rng, tools_ok, think_ok)
        prompt, chosen, rejected = _plain(conv["messages"][:-1]), _plain(conv["messages"][-1:])[0], _plain(other["messages"][-1:])[0]
        tools = conv.get("tools")
        explicit = {"prompt": prompt, "chosen": [chosen], "rejected": [rejected], "tools": tools}
        implicit = {"chosen": prompt + [chosen], "rejected": prompt + [rejected], "tools": tools}
        for record in (explicit, implicit):
            try:
                _reference(tok, prompt + [chosen], tools), _reference(tok, prompt + [rejected], tools)
            except Exception:  # mistral-common rejects it: so must we
                with pytest.raises(RecordError):
                    _samples(tok, record)
                continue
            _, s = _samples(tok, record)
            assert isinstance(s, PreferenceSample)
            pc = _check_sequence(tok, test_tok, s.chosen_input_ids, s.chosen_labels, prompt, chosen, tools)
            pr = _check_sequence(tok, test_tok, s.rejected_input_ids, s.rejected_labels, prompt, rejected, tools)
            assert pc == pr == s.prompt_len and s.chosen_input_ids[:pc] == s.rejected_input_ids[:pr]
            checked += 1
        # KTO: the same prompt with one completion, desirable or not
        label = n % 2 == 0
        try:
            _reference(tok, prompt + [chosen], tools)
        except Exception:
            continue
        _, k = _samples(tok, {"prompt": prompt, "completion": [chosen], "label": label, "tools": tools}, kto=True)
        assert isinstance(k, KTOSample) and k.label is label
        _check_sequence(tok, test_tok, k.input_ids, k.labels, prompt, chosen, tools)
    assert checked >= 60


def _decode_trained(tok, ids, labels):
    trained = [t for t, y in zip(ids, labels) if y != IGNORE_INDEX]
    return tok.instruct_tokenizer.tokenizer.decode(trained, special_token_policy=SpecialTokenPolicy.KEEP)


TOOLS = [{"type": "function", "function": {"name": "add", "description": "add two numbers",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}]


def test_thinking_tool_calls_multi_turn(tiny_tok):
    """A multi-turn prompt with a system message, tools, an earlier assistant tool call and its result; answers
    with thinking (both spellings) and a tool call. Only the final answer is trained."""
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "tool_calls": [{"id": "abc123def", "type": "function",
                                              "function": {"name": "add", "arguments": '{"a": 2}'}}]},
        {"role": "tool", "tool_call_id": "abc123def", "content": "5"},
        {"role": "assistant", "content": "It is 5."},
        {"role": "user", "content": "And doubled?"},
    ]
    chosen = {"role": "assistant", "reasoning_content": "5 times 2 is 10.", "content": "10."}
    rejected = {"role": "assistant", "content": [{"type": "thinking", "thinking": "Hmm."}, {"type": "text", "text": "Eleven."}],
                "tool_calls": [{"id": "xyz789abc", "type": "function", "function": {"name": "add", "arguments": '{"a": 11}'}}]}
    record = {"prompt": prompt, "chosen": [chosen], "rejected": [rejected], "tools": TOOLS}
    _, s = _samples(tiny_tok, record)
    assert s.chosen_input_ids == _reference(tiny_tok, prompt + [chosen], TOOLS)
    assert s.rejected_input_ids == _reference(tiny_tok, prompt + [rejected], TOOLS)
    assert _decode_trained(tiny_tok, s.chosen_input_ids, s.chosen_labels) == "[THINK]5 times 2 is 10.[/THINK]10.</s>"
    rejected_text = _decode_trained(tiny_tok, s.rejected_input_ids, s.rejected_labels)
    assert rejected_text.startswith("[THINK]Hmm.[/THINK]Eleven.[TOOL_CALLS]add") and rejected_text.endswith("</s>")
    assert "It is 5." not in rejected_text and s.chosen_input_ids[:s.prompt_len] == s.rejected_input_ids[:s.prompt_len]


def test_system_prompt_option_goes_into_both(tiny_tok):
    record = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
              "rejected": [{"role": "assistant", "content": "bye"}]}
    _, s = _samples(tiny_tok, record, system_prompt="You are kind.")
    system = {"role": "system", "content": "You are kind."}
    assert s.chosen_input_ids == _reference(tiny_tok, [system] + record["prompt"] + record["chosen"], None)
    assert s.rejected_input_ids == _reference(tiny_tok, [system] + record["prompt"] + record["rejected"], None)


def test_image_in_prompt(tiny_tok, tmp_path):
    from PIL import Image
    from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage

    from magistune.data.images import ImageOptions

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    prompt = [{"role": "user", "content": [{"type": "text", "text": "Colour?"}, {"type": "image", "path": "red.png"}]}]
    record = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Red."}],
              "rejected": [{"role": "assistant", "content": "Blue."}]}
    _, s = _samples(tiny_tok, record, supports_images=True, images=ImageOptions(base_dir=tmp_path))
    for ids, answer in ((s.chosen_input_ids, "Red."), (s.rejected_input_ids, "Blue.")):
        request = ChatCompletionRequest(messages=[
            UserMessage(content=[TextChunk(text="Colour?"), ImageChunk(image=Image.open(tmp_path / "red.png"))]),
            AssistantMessage(content=answer)])
        assert ids == tiny_tok.encode_chat_completion(request).tokens
    assert len(s.images) == 1 and bytes(s.images[0]) == (tmp_path / "red.png").read_bytes()


U, A = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}


@pytest.mark.parametrize("record,kto,reason,words", [
    ([1], False, "wrong_type", "must be a JSON object"),
    ({"prompt": [U], "chosen": [A]}, False, "missing_field", "no 'rejected' field"),
    ({"prompt": [U], "chosen": "a", "rejected": [A]}, False, "wrong_type", "'chosen' must be a list of messages"),
    ({"prompt": [U], "chosen": [A, A], "rejected": [A]}, False, "bad_answer", "exactly one assistant message"),
    ({"prompt": [U], "chosen": [U], "rejected": [A]}, False, "bad_answer", "got [user]"),
    ({"chosen": [U, A], "rejected": [{"role": "user", "content": "other"}, A]}, False, "no_common_prompt", "share no leading"),
    ({"chosen": [U, A, U, A], "rejected": [U, {"role": "assistant", "content": "b"}, U, A]}, False,
     "differ_before_last_assistant", "differ at message 1"),
    ({"chosen": [U, A], "rejected": [U, A, U, A]}, False, "differ_before_last_assistant", "differ at message 1"),
    ({"chosen": [U, U], "rejected": [U, U]}, False, "bad_answer", "chosen[1]: the last message must be"),
    ({"prompt": [U, A], "chosen": [A], "rejected": [A]}, False, "bad_prompt", "must end with a user or tool"),
    ({"prompt": [{"role": "user", "content": "q", "weight": 1}], "chosen": [A], "rejected": [A]}, False, "bad_weight", "prompt[0]"),
    ({"prompt": [{"role": "robot", "content": "q"}], "chosen": [A], "rejected": [A]}, False, "unknown_role", "prompt[0].role"),
    ({"prompt": [U], "chosen": [A], "rejected": [{"role": "assistant", "content": "x", "reasoning_contnt": "y"}]},
     False, "unknown_key", "rejected[0] has unknown key(s) reasoning_contnt"),
    ({"chosen": [U, {"role": "assistant", "content": ""}], "rejected": [U, A]}, False, "empty_assistant", "chosen[1]:"),
    ({"prompt": [U], "completion": [A]}, True, "bad_label", "'label' must be true"),
    ({"prompt": [U], "completion": [A], "label": 1}, True, "bad_label", "got 1"),
    ({"prompt": [U], "label": False}, True, "missing_field", "no 'completion' field"),
])
def test_bad_records(tiny_tok, record, kto, reason, words):
    with pytest.raises(RecordError) as e:
        _samples(tiny_tok, record, kto=kto)
    assert e.value.reason == reason and words in e.value.message, e.value.message


def test_thinking_without_think_token_is_rejected(v3_tok):
    record = {"prompt": [U], "chosen": [{"role": "assistant", "content": "a", "reasoning_content": "r"}], "rejected": [A]}
    with pytest.raises(RecordError) as e:
        _samples(v3_tok, record)
    assert e.value.reason == "thinking_unsupported" and "chosen[0]" in e.value.message


def test_truncation_drops_whole_turns_from_the_start(tiny_tok):
    long = " ".join(["word"] * 60)
    system = {"role": "system", "content": "S."}
    prompt = [system, {"role": "user", "content": long}, {"role": "assistant", "content": long},
              {"role": "user", "content": "short question"}]
    record = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "yes"}],
              "rejected": [{"role": "assistant", "content": "no, not at all"}]}
    enc = ConversationEncoder(tiny_tok)
    penc = PreferenceEncoder(enc, RecordOptions())
    rec = split_record(record, kto=False)
    full = penc.encode(rec)
    limit = max(len(e.ids) for e in full) - 1
    assert fit(penc, rec, full, limit, "drop") == (None, f"{limit + 1} tokens > sequence_len {limit}")
    kept, why = fit(penc, rec, full, limit, "truncate")
    assert why is None and max(len(e.ids) for e in kept) <= limit
    shorter = [system, prompt[-1]]  # the system message stays, the first turn went
    for e, answer in zip(kept, (record["chosen"][0], record["rejected"][0])):
        assert e.ids == _reference(tiny_tok, shorter + [answer], None)
    kept, why = fit(penc, rec, full, 8, "truncate")
    assert kept is None and "the last user turn with the answer does not fit either" in why


def test_parquet_style_none_keys_are_absent(tiny_tok):
    """Parquet and datasets rows fill absent keys with None: not a weight, not a reasoning."""
    none = {"weight": None, "train": None, "reasoning_content": None, "tool_calls": None}
    record = {"prompt": [{"role": "user", "content": "q", **none}], "chosen": [{"role": "assistant", "content": "a", **none}],
              "rejected": [{"role": "assistant", "content": "b", **none}], "tools": None}
    _, s = _samples(tiny_tok, record)
    assert s.chosen_input_ids == _reference(tiny_tok, [U, A], None)


def test_kto_mismatched_pairs_are_exact(tiny_tok):
    from magistune.data.preference import kto_mismatched

    prompts = [[{"role": "system", "content": "S."}, U], [{"role": "user", "content": "other question"}], [U, A, U]]
    answers = [{"role": "assistant", "reasoning_content": "hmm", "content": "x"}, A,
               {"role": "assistant", "tool_calls": [{"id": "abc123def", "type": "function",
                                                      "function": {"name": "add", "arguments": "{}"}}]}]
    samples = [_samples(tiny_tok, {"prompt": p, "completion": [c], "label": True, "tools": TOOLS}, kto=True)[1]
               for p, c in zip(prompts, answers)]
    for i, (ids, labels) in enumerate(kto_mismatched(samples)):
        assert ids == _reference(tiny_tok, prompts[i] + [answers[i - 1]], TOOLS)
        p = samples[i].prompt_len
        assert labels[:p] == [IGNORE_INDEX] * p and labels[p:] == ids[p:]
