"""The Hugging Face tokenizer path (data/encode_hf.py) against mistral-common on the golden corpus.

tiny-random's Tekken file converted by transformers (convert_tekken_tokenizer) with our v13 template
(model_files/magistral_v13.jinja) must give mistral-common's `encode_chat_completion` ids and data/encode.py's
labels wherever the template can say the conversation. The documented differences are tested as such: text that
spells a control token becomes that token; without {% generation %} markers a turn is trained from its first
text (its [THINK] stays the prompt's), and a turn with no text (tool calls only), a text the template changes, a
boundary inside a token or a missing end-of-turn rejects the record. One render per record, whatever its length.
"""

from __future__ import annotations

import json
import random
import re
from unittest import mock

import pytest

from magistune.data.encode import ConversationEncoder, LabelOptions
from magistune.data.encode_hf import HFConversationEncoder
from magistune.data.records import RecordError, RecordOptions, parse_record
from magistune.data.sample import IGNORE_INDEX
from magistune.data.synthetic import generate
from magistune.hf_tokenizer import HFChatTokenizer, _fast_tokenizer, load_hf_tokenizer, tiny_hf_tokenizer_path
from magistune.tokenizer import load_tokenizer, tiny_tokenizer_path

N = 100


@pytest.fixture(scope="module")
def mc():
    return load_tokenizer(tiny_tokenizer_path())


@pytest.fixture(scope="module")
def hf():
    return load_hf_tokenizer(tiny_hf_tokenizer_path())


@pytest.fixture(scope="module")
def with_template():
    """The tiny tokenizer with another chat template: one spare copy (the memoised one stays as it is)."""
    path = tiny_hf_tokenizer_path()
    fast = _fast_tokenizer(path)

    def make(template: str) -> HFChatTokenizer:
        fast.chat_template = template
        return HFChatTokenizer(fast, path)
    return make


def spells_a_control_token(record: dict, hf: HFChatTokenizer) -> bool:
    text = json.dumps(record, ensure_ascii=False)
    return any(t.content in text for t in hf.hf.added_tokens_decoder.values())


def golden(mc, hf, seed=0):
    """(record, conv, mistral-common ids, data/encode.py labels) of the golden corpus, control-token look-alikes
    set apart (they are the documented difference, tested below)."""
    rng, enc = random.Random(seed), ConversationEncoder(mc)
    for _ in range(N):
        record = generate(rng, True, True)
        if spells_a_control_token(record, hf):
            continue
        conv = parse_record(record, RecordOptions())
        ids, labels, _ = enc.encode(conv)
        assert ids == mc.encode_chat_completion(conv.request).tokens
        yield record, conv, ids, labels


def test_generation_markers_give_mistral_commons_ids_and_labels(mc, hf):
    enc = HFConversationEncoder(hf)
    assert enc.generation  # our template marks each assistant turn
    n = 0
    for record, conv, ids, labels in golden(mc, hf):
        assert enc.encode(conv) == (ids, labels, []), record
        n += 1
    assert n >= 30  # tools, thinking (both forms), weights, several turns: all exact


def test_offsets_path_same_ids_and_labels_but_the_think_token(mc, hf):
    """Without the markers: ids equal; labels equal except the [THINK] a reasoning turn opens with (the template
    writes it before the first text, so it is the prompt's). Tool-call-only turns and answers whose trailing
    spaces the template strips are rejected with their reason."""
    enc = HFConversationEncoder(hf, use_generation_markers=False)
    think = hf.special_ids().begin_think
    exact = think_only = 0
    reasons = set()
    for record, conv, ids, labels in golden(mc, hf):
        try:
            got_ids, got_labels, _ = enc.encode(conv)
        except RecordError as e:
            reasons.add(e.reason)
            tool_only = any(m["role"] == "assistant" and m.get("tool_calls") and not m.get("content")
                            for m in record["messages"])
            stripped = any(m["role"] == "assistant" and isinstance(m.get("content"), str)
                           and m["content"] != m["content"].rstrip(" ") for m in record["messages"])
            assert tool_only or stripped, (e.message, record)
            continue
        assert got_ids == ids
        diff = [i for i, (a, b) in enumerate(zip(labels, got_labels)) if a != b]
        assert all(ids[i] == think and labels[i] == think and got_labels[i] == IGNORE_INDEX for i in diff), record
        exact += not diff
        think_only += bool(diff)
    assert exact >= 5 and think_only >= 5
    assert reasons <= {"turn_not_located", "turn_not_found"} and "turn_not_located" in reasons


def test_text_spelling_a_control_token_becomes_it(mc, hf):
    """The documented difference: mistral-common keeps "[INST]" in a user's text as text, a Hugging Face tokenizer
    (here as at inference) makes it the control token."""
    record = {"messages": [{"role": "user", "content": "say [INST] please"}, {"role": "assistant", "content": "no"}]}
    conv = parse_record(record, RecordOptions())
    ids, _, _ = HFConversationEncoder(hf).encode(conv)
    inst = hf.single_id("[INST]")
    assert ids.count(inst) == 2 and mc.encode_chat_completion(conv.request).tokens.count(inst) == 1


def test_label_options_match_mistral_common_path(mc, hf):
    record = {"messages": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "reasoning_content": "two and two", "content": "4"},
        {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]}
    conv = parse_record(record, RecordOptions())
    for opts in (LabelOptions(train_thinking=False), LabelOptions(train_on_inputs=True),
                 LabelOptions(train_on_eos="last"), LabelOptions(train_on_eos="none"), LabelOptions(train_on_eos="all")):
        assert HFConversationEncoder(hf).encode(conv, opts) == ConversationEncoder(mc).encode(conv, opts), opts
    # The offsets path masks the reasoning up to the answer: the same labels (its [THINK] was never trained).
    ids, labels, _ = HFConversationEncoder(hf, False).encode(conv, LabelOptions(train_thinking=False))
    assert (ids, labels, []) == ConversationEncoder(mc).encode(conv, LabelOptions(train_thinking=False))


def test_one_render_per_record(mc, hf):
    """Linear cost: one apply_chat_template and one tokenisation per record, however many
    turns it has; never a render per prefix."""
    turns = [m for i in range(40) for m in ({"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"})]
    conv = parse_record({"messages": turns}, RecordOptions())
    for generation in (True, False):
        enc = HFConversationEncoder(hf, generation)
        with mock.patch.object(hf.hf, "apply_chat_template", wraps=hf.hf.apply_chat_template) as render, \
                mock.patch.object(type(hf.hf), "__call__", autospec=True, side_effect=type(hf.hf).__call__) as tokenise:
            ids, labels, _ = enc.encode(conv)
        assert render.call_count == 1
        assert tokenise.call_count == 1  # apply_chat_template tokenises inside on the markers path
        assert sum(1 for t in labels if t == hf.special_ids().eos) == 40


def test_a_boundary_inside_a_token_is_rejected(with_template):
    """A template that glues the answer to its own text: ' hello' is one token, so the turn starting at 'h' cannot
    be cut from the prompt's space. Rejected with the reason, never guessed."""
    tok = with_template("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% else %} {{ m.content }}"
                        "{{ eos_token }}{% endif %}{% endfor %}")
    conv = parse_record({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hello"}]},
                        RecordOptions())
    with pytest.raises(RecordError) as e:
        HFConversationEncoder(tok).encode(conv)
    assert e.value.reason == "turn_boundary_inside_token" and "starts inside a token" in e.value.message


@pytest.mark.parametrize("template, reason", [
    ("{% for m in messages %}[INST]{{ m.content }}[/INST]{% endfor %}", "no_end_of_turn"),  # no </s> at all
    ("{% for m in messages %}{% if m.role == 'user' %}[INST]{{ m.content }}[/INST]{% else %}{{ m.content }}{% endif %}"
     "{% endfor %}</s>", "no_end_of_turn"),  # one </s> at the very end: not between the turns
    ("{% for m in messages %}[INST]{{ m.content | upper }}[/INST]</s>{% endfor %}", "turn_not_found"),
    ("{{ raise_exception('no tools here') }}", "rejected_by_chat_template"),
])
def test_templates_that_hide_a_turn_are_rejected(with_template, template, reason):
    conv = parse_record({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "first"},
                                      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "second"}]},
                        RecordOptions())
    with pytest.raises(RecordError) as e:
        HFConversationEncoder(with_template(template)).encode(conv)
    assert e.value.reason == reason


def test_generation_blocks_map_to_weighted_messages(hf, with_template):
    """One {% generation %} block per assistant message: a weight-0 message's block stays untrained; a template
    that merges blocks can only be used while the weights agree."""
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "first", "weight": 0},
                           {"role": "user", "content": "q2"}, {"role": "assistant", "content": "second"}]}
    conv = parse_record(record, RecordOptions())
    ids, labels, _ = HFConversationEncoder(hf).encode(conv)
    assert hf.decode([t for t in labels if t != IGNORE_INDEX]) == "second</s>"
    one_block = re.sub(r"{%-? generation -?%}|{%-? endgeneration -?%}", "", hf.hf.chat_template)
    one_block = "{% generation %}" + one_block + "{% endgeneration %}"
    with pytest.raises(RecordError) as e:
        HFConversationEncoder(with_template(one_block)).encode(conv)
    assert e.value.reason == "turns_not_separable"
