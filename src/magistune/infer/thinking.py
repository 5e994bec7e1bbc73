"""Generated ids → thinking and answer, split on the tokenizer's special ids, never on strings.

Magistral writes `[THINK] … [/THINK] answer </s>`. The ids are the truth: a text that merely spells "[THINK]"
encodes to ordinary tokens and can never be mistaken for the control token, so the split is exact.

Rules, for any id sequence:
    everything after the first `</s>` is ignored (`stopped` says whether one came);
    the ids inside each `[THINK] … [/THINK]` span are thinking (several spans are concatenated);
    every other id is answer; the delimiters themselves belong to neither;
    `closed` is False only when a `[THINK]` was opened and not closed before the end (or before `</s>`);
    a `[/THINK]` with no open span, or a `[THINK]` inside one, is a stray delimiter: dropped, like the others.
A tokenizer without [THINK] (before v13) has no thinking: every id before `</s>` is answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from magistune.tokenizer import SpecialIds

# What one id is, as `Segmenter.push` reports it.
THINKING, ANSWER = "thinking", "answer"  # content ids
OPEN, CLOSE, STRAY, STOP, AFTER_STOP = "open", "close", "stray", "stop", "after_stop"  # control ids


class Segmenter:
    """The split, one id at a time (the chat streams with it; `split_thinking` runs it over a whole list)."""

    def __init__(self, special: SpecialIds):
        self.special = special
        self.in_thinking = False
        self.stopped = False
        self.opened = 0  # [THINK] spans seen

    def push(self, token: int) -> str:
        s = self.special
        if self.stopped:
            return AFTER_STOP
        if token == s.eos:
            self.stopped = True
            return STOP
        if s.has_think and token == s.begin_think:
            if self.in_thinking:
                return STRAY
            self.in_thinking, self.opened = True, self.opened + 1
            return OPEN
        if s.has_think and token == s.end_think:
            if not self.in_thinking:
                return STRAY
            self.in_thinking = False
            return CLOSE
        return THINKING if self.in_thinking else ANSWER

    @property
    def closed(self) -> bool:
        return not self.in_thinking


def split_thinking(ids: list[int], special: SpecialIds) -> tuple[list[int], list[int], bool, bool]:
    """(thinking_ids, answer_ids, closed, stopped) of generated `ids`; see the module docstring."""
    seg = Segmenter(special)
    thinking: list[int] = []
    answer: list[int] = []
    for t in ids:
        kind = seg.push(t)
        if kind == THINKING:
            thinking.append(t)
        elif kind == ANSWER:
            answer.append(t)
        elif kind == STOP:
            break
    return thinking, answer, seg.closed, seg.stopped


@dataclass(frozen=True)
class Completion:
    """One generated sequence, parsed. `tokens` counts every generated id, delimiters and `</s>` included."""

    thinking_ids: list[int]
    answer_ids: list[int]
    had_thinking: bool  # a [THINK] was generated (thinking may still be empty: "[THINK][/THINK]")
    closed: bool
    stopped: bool
    tokens: int

    @property
    def finish_reason(self) -> str:
        return "stop" if self.stopped else "length"

    @classmethod
    def parse(cls, ids: list[int], special: SpecialIds) -> "Completion":
        thinking, answer, closed, stopped = split_thinking(ids, special)
        had = special.has_think and special.begin_think in _until_eos(ids, special.eos)
        return cls(thinking, answer, had, closed, stopped, len(_until_eos(ids, special.eos)) + int(stopped))


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos)] if eos in ids else ids
