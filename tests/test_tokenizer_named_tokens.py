"""Golden tests for named tokens: with an edited tokenizer, text holding a renamed or added name encodes it as its
single id, spliced between mistral-common's own encodings of the text around it; every other conversation (standard
control tokens such as [INST] or </s> typed in text included) encodes exactly as mistral-common's
encode_chat_completion. Expectations come from mistral-common loading the same file, never from hard-coded ids."""

from __future__ import annotations

import random

import pytest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from magistune.data.encode import ConversationEncoder
from magistune.data.records import RecordError, RecordOptions, parse_record
from magistune.data.sample import IGNORE_INDEX
from magistune.data.synthetic import generate
from magistune.tokenizer import load_tokenizer, shipped_tokenizer_file, tiny_tokenizer_path
from magistune.tokenizer_edit import TokenEdits, free_slots, run_tokenizer_file

BASES = {  # Tekken v13 (tiny-random), SentencePiece v3 (control slots), SentencePiece v1 (grows)
    "tekken-v13": tiny_tokenizer_path,
    "sp-v3": lambda: shipped_tokenizer_file("mistral_instruct_tokenizer_240323.model.v3"),
    "sp-v1": lambda: shipped_tokenizer_file("tokenizer.model.v1"),
}
NAMES = ("<CITE>", "</CITE>")


@pytest.fixture(scope="module", params=list(BASES))
def edited(request, tmp_path_factory):
    """(magistune's tokenizer, mistral-common's plain tokenizer) of one edited file, and the names' ids."""
    base = BASES[request.param]()
    raw = load_tokenizer(base).instruct_tokenizer.tokenizer
    overrides = {free_slots(raw)[-1]: "<ANSWER>"} if free_slots(raw) else {}
    path = run_tokenizer_file(base, TokenEdits(overrides, NAMES), tmp_path_factory.mktemp("tok"))
    plain = MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)
    praw = plain.instruct_tokenizer.tokenizer
    names = [*NAMES] + list(overrides.values())
    ids = {n: praw.get_special_token(n) if hasattr(praw, "_special_tokens_reverse_vocab") else praw._model.piece_to_id(n)
           for n in names}
    assert len(set(ids.values())) == len(names) and all(praw.id_to_piece(i).strip("▁") == n for n, i in ids.items())
    return load_tokenizer(path), plain, ids


def _supports(tok):
    version = tok.instruct_tokenizer.tokenizer.version.value
    return version != "v1", version == "v13"


def test_conversations_without_names_equal_mistral_common(edited):
    tok, plain, _ = edited
    enc = ConversationEncoder(tok)
    rng = random.Random(0)
    tools_ok, think_ok = _supports(tok)
    checked = 0
    for k in range(40):
        record = generate(rng, tools_ok, think_ok)
        if k % 2:  # standard control tokens typed in text stay text, as in mistral-common
            record["messages"][0]["content"] = "Say [INST] and </s> and <s> and [/INST] and <SPECIAL_998> please"
        conv = parse_record(record, RecordOptions(supports_thinking=enc.ids.has_think))
        try:
            expected = plain.encode_chat_completion(conv.request).tokens
        except Exception:
            continue
        try:
            ids, _, _ = enc.encode(conv)
        except RecordError:
            continue
        assert ids == expected, record
        checked += 1
    assert checked >= 20


def _splice(praw, pieces: list[str], ids: dict[str, int]) -> list[int]:
    """mistral-common's encoding of each text piece, a name's id between them."""
    out: list[int] = []
    for piece in pieces:
        out += [ids[piece]] if piece in ids else praw.encode(piece, bos=False, eos=False)
    return out


def _replace_once(seq: list[int], old: list[int], new: list[int]) -> list[int]:
    starts = [i for i in range(len(seq) - len(old) + 1) if seq[i:i + len(old)] == old]
    assert len(starts) == 1, "the message's tokens must appear once in the conversation"
    return seq[:starts[0]] + new + seq[starts[0] + len(old):]


def test_names_encode_as_single_ids(edited):
    tok, plain, ids = edited
    praw = plain.instruct_tokenizer.tokenizer
    names = list(ids)
    user = ["Quote the source between ", names[0], "and", names[1], ", then say ", names[-1], " once."]
    answer = [names[0], "Paris is the capital.", names[1], " Done", names[-1]]
    record = {"messages": [{"role": "user", "content": "".join(user)},
                           {"role": "assistant", "content": "".join(answer)}]}
    enc = ConversationEncoder(tok)
    conv = parse_record(record, RecordOptions(supports_thinking=enc.ids.has_think))
    ids_out, labels, _ = enc.encode(conv)
    # mistral-common's ids for the whole conversation, with each message's text encoding replaced by the splice
    expected = plain.encode_chat_completion(conv.request).tokens
    for pieces in (user, answer):
        expected = _replace_once(expected, praw.encode("".join(pieces), bos=False, eos=False), _splice(praw, pieces, ids))
    assert ids_out == expected
    for name, i in ids.items():
        assert i in ids_out
    # the trained span is the answer with its names, then </s>
    trained = [t for t, lab in zip(ids_out, labels) if lab != IGNORE_INDEX]
    assert trained == _splice(praw, answer, ids) + [praw.eos_id]
    text = tok.instruct_tokenizer.tokenizer.decode(trained, special_token_policy=SpecialTokenPolicy.KEEP)
    assert all(n in text for n in answer if n in ids) and text.endswith("</s>")


def test_name_inside_a_word_and_overlapping_names(tmp_path):
    """Longest name first; a name is found anywhere in the text (as Axolotl's added tokens are)."""
    path = run_tokenizer_file(tiny_tokenizer_path(), TokenEdits({}, ("<A>", "<A><B>")), tmp_path)
    raw = load_tokenizer(path).instruct_tokenizer.tokenizer
    praw = MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer
    a, ab = praw.get_special_token("<A>"), praw.get_special_token("<A><B>")
    got = raw.encode("x<A><B>y<A>", bos=True, eos=False)
    assert got == [praw.bos_id] + praw.encode("x", False, False) + [ab] + praw.encode("y", False, False) + [a]
    assert raw.encode("no names here", bos=False, eos=True) == praw.encode("no names here", bos=False, eos=True)
