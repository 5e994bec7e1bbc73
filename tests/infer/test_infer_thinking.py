"""split_thinking: generated ids → (thinking, answer, closed, stopped), on the tokenizer's own special ids."""

from __future__ import annotations

from magistune.infer.thinking import Completion, split_thinking
from magistune.tokenizer import SpecialIds

A, B, C, D = 5000, 5001, 5002, 5003  # ordinary (non-control) token ids


def ids_of(special: SpecialIds):
    return special.begin_think, special.end_think, special.eos


def test_special_ids_come_from_the_tokenizer(special):
    think, end, eos = ids_of(special)
    assert (think, end, eos) == (34, 35, 2)  # the v13 Tekken ranks, read through SpecialIds


def test_closed_thinking_then_answer_then_eos(special):
    think, end, eos = ids_of(special)
    assert split_thinking([think, A, B, end, C, D, eos], special) == ([A, B], [C, D], True, True)


def test_unclosed_thinking_at_the_token_limit(special):
    think, _, _ = ids_of(special)
    assert split_thinking([think, A, B], special) == ([A, B], [], False, False)
    c = Completion.parse([think, A, B], special)
    assert (c.finish_reason, c.closed, c.had_thinking, c.tokens) == ("length", False, True, 3)


def test_no_thinking_at_all(special):
    _, _, eos = ids_of(special)
    assert split_thinking([A, B, eos], special) == ([], [A, B], True, True)
    assert split_thinking([A, B], special) == ([], [A, B], True, False)
    assert not Completion.parse([A, eos], special).had_thinking


def test_everything_after_eos_is_ignored(special):
    think, end, eos = ids_of(special)
    assert split_thinking([A, eos, think, B, end, C], special) == ([], [A], True, True)
    c = Completion.parse([A, eos, B, C], special)
    assert (c.tokens, c.finish_reason) == (2, "stop")  # A and </s>


def test_eos_inside_thinking_stops_it_unclosed(special):
    think, _, eos = ids_of(special)
    assert split_thinking([think, A, eos, B], special) == ([A], [], False, True)


def test_empty_thinking_and_several_spans(special):
    think, end, eos = ids_of(special)
    assert split_thinking([think, end, A, eos], special) == ([], [A], True, True)
    assert Completion.parse([think, end, A, eos], special).had_thinking
    assert split_thinking([think, A, end, B, think, C, end, D], special) == ([A, C], [B, D], True, False)


def test_stray_delimiters_are_dropped(special):
    think, end, eos = ids_of(special)
    assert split_thinking([A, end, B, eos], special) == ([], [A, B], True, True)
    assert split_thinking([think, A, think, B, end, C], special) == ([A, B], [C], True, False)


def test_text_spelling_think_is_not_the_control_token(chat_tok, special):
    text_ids = chat_tok.instruct_tokenizer.tokenizer.encode("[THINK]x[/THINK]", bos=False, eos=False)
    assert special.begin_think not in text_ids
    assert split_thinking(text_ids, special) == ([], text_ids, True, False)


def test_tokenizer_without_think(v3_tok):
    special = SpecialIds.of(v3_tok)  # tekken_240911.json: v3, no [THINK]
    assert not special.has_think
    assert split_thinking([A, B, special.eos], special) == ([], [A, B], True, True)
