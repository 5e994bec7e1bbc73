"""Preference records (TRL's conversational format) → pairs of exact token sequences (DPO, IPO, ORPO, SimPO) or
labelled single sequences (KTO).

Record forms (`type: chat_template` with `rl:` set):
    explicit prompt   {"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message], "tools": [...]}
    implicit prompt   {"chosen": [conversation], "rejected": [conversation]}: the prompt is their longest common prefix
                      of whole messages; they may differ only in their last message, the assistant's answer
    KTO               {"prompt": [messages], "completion": [assistant message], "label": true | false}

Each sequence is prompt + one answer, parsed by records.parse_record (every SFT check applies: roles, thinking,
tool calls, images, system_prompt) and encoded by data/encode.py's ConversationEncoder, so the ids equal
mistral-common's `encode_chat_completion` of that conversation. Only the answer is labelled (its thinking, text,
tool calls and `</s>`); earlier assistant turns of the prompt are masked like the rest of the prompt. The two
sequences of a pair must start with the same prompt ids; if they do not, the record is rejected.

Truncation (`excess_length_strategy: truncate`) drops whole turns from the start of the prompt: the prompt
restarts at a later user message (leading system messages and the tools stay), and the shorter conversation is
encoded again, so a truncated sample is still exactly mistral-common's encoding of a real conversation; no token
sequence is ever cut. If even the last user turn and the answer do not fit, the record is dropped and counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from magistune.data.encode import ConversationEncoder, LabelOptions
from magistune.data.errors import RecordError
from magistune.data.records import Conversation, RecordOptions, parse_record
from magistune.data.sample import IGNORE_INDEX, KTOSample, PreferenceSample

PAIR_FIELDS = ("prompt", "chosen", "rejected")
KTO_FIELDS = ("prompt", "completion", "label")


@dataclass
class PreferenceRecord:
    prompt: list[dict]  # messages before the answer(s)
    answers: dict[str, dict]  # field name ("chosen", "rejected" or "completion") → one assistant message
    tools: list | None
    label: bool | None  # KTO: is the completion desirable
    implicit: bool  # the prompt came from chosen/rejected themselves: error locations name those fields


def _messages(record: dict, name: str) -> list:
    value = record.get(name)
    if value is None:
        raise RecordError("missing_field", f"no '{name}' field")
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise RecordError("wrong_type", f"'{name}' must be a list of messages, got {type(value).__name__}")
    if not value:
        raise RecordError("missing_field", f"'{name}' is an empty list")
    for i, m in enumerate(value):
        if m.get("weight") is not None or m.get("train") is not None:  # None: a parquet row's absent key
            raise RecordError("bad_weight", f"{name}[{i}]: weight/train are not used in preference records (the "
                                            "final answer is trained, the prompt never)")
    return value


def _one_answer(record: dict, name: str) -> dict:
    answer = _messages(record, name)
    if len(answer) != 1 or answer[0].get("role") != "assistant":
        roles = ", ".join(str(m.get("role")) for m in answer)
        raise RecordError("bad_answer", f"'{name}' must hold exactly one assistant message (the answer), got [{roles}]")
    return answer[0]


def split_record(record: Any, kto: bool, field_tools: str = "tools") -> PreferenceRecord:
    """Check a record's shape and split it into prompt and answer(s). Raises RecordError."""
    if not isinstance(record, dict):
        raise RecordError("wrong_type", f"a record must be a JSON object, got {type(record).__name__}")
    tools = record.get(field_tools)
    if kto:
        label = record.get("label")
        if not isinstance(label, bool):
            raise RecordError("bad_label", f"'label' must be true (desirable) or false (undesirable), got {label!r}")
        prompt = _messages(record, "prompt")
        return PreferenceRecord(prompt, {"completion": _one_answer(record, "completion")}, tools, label, False)
    if record.get("prompt") is not None:
        prompt = _messages(record, "prompt")
        answers = {name: _one_answer(record, name) for name in ("chosen", "rejected")}
        return PreferenceRecord(prompt, answers, tools, None, False)
    chosen, rejected = _messages(record, "chosen"), _messages(record, "rejected")
    n, last = 0, min(len(chosen), len(rejected)) - 1
    while n < last and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise RecordError("no_common_prompt", "no 'prompt', and 'chosen' and 'rejected' share no leading message "
                                              "(the implicit prompt is their common first messages)")
    if n != len(chosen) - 1 or n != len(rejected) - 1:
        raise RecordError("differ_before_last_assistant", f"'chosen' and 'rejected' differ at message {n}, before "
                                                          "their last message; only the final answer may differ")
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1].get("role") != "assistant":
            raise RecordError("bad_answer", f"{name}[{len(conv) - 1}]: the last message must be the assistant's "
                                            f"answer, not {conv[-1].get('role')!r}")
    return PreferenceRecord(chosen[:n], {"chosen": chosen[-1], "rejected": rejected[-1]}, tools, None, True)


def _located(e: RecordError, rec: PreferenceRecord, name: str) -> RecordError:
    """parse_record says messages[i] of prompt + answer: name the record's own field instead."""
    n = len(rec.prompt)

    def where(m: re.Match) -> str:
        i = int(m.group(1))
        if rec.implicit:
            return f"{name}[{i}]"
        return f"prompt[{i}]" if i < n else f"{name}[{i - n}]"

    return RecordError(e.reason, re.sub(r"messages\[(\d+)\]", where, e.message))


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]
    images: list
    prompt_len: int
    conv: Conversation


class PreferenceEncoder:
    """prompt + answer → exact ids, labels on the answer only, with the encoder of data/encode.py."""

    def __init__(self, encoder: ConversationEncoder, opts: RecordOptions):
        self.encoder = encoder
        self.opts = replace(opts, train_on="last_assistant", field_messages="messages", field_tools="tools")

    def encode_one(self, rec: PreferenceRecord, prompt: list[dict], name: str) -> Encoded:
        if prompt[-1].get("role") in ("assistant", "system"):  # other roles: parse_record's own reason
            raise RecordError("bad_prompt", f"the prompt must end with a user or tool message, not "
                                            f"{prompt[-1].get('role')!r}")
        try:
            conv = parse_record({"messages": prompt + [rec.answers[name]], "tools": rec.tools}, self.opts)
        except RecordError as e:
            raise _located(e, rec, name) from None
        ids, labels, images = self.encoder.encode(conv, LabelOptions())
        start = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
        if start == len(labels) or any(t == IGNORE_INDEX for t in labels[start:]):
            raise RecordError("invalid_format", f"'{name}': the answer is not the labelled end of the sequence")
        return Encoded(ids, labels, images, start, conv)

    def encode(self, rec: PreferenceRecord, prompt: list[dict] | None = None) -> list[Encoded]:
        """One Encoded per answer (chosen, rejected; or completion). Pairs must share their prompt ids."""
        prompt = rec.prompt if prompt is None else prompt
        out = [self.encode_one(rec, prompt, name) for name in rec.answers]
        if len(out) == 2:
            c, r = out
            if c.prompt_len != r.prompt_len or c.ids[:c.prompt_len] != r.ids[:r.prompt_len]:
                raise RecordError("prompt_mismatch", f"the prompt encodes to different ids before the chosen "
                                                     f"({c.prompt_len} tokens) and the rejected answer "
                                                     f"({r.prompt_len} tokens)")
        return out

    def shorter_prompts(self, prompt: list[dict]) -> list[list[dict]]:
        """Truncation candidates, longest first: the prompt from each later user message on, after the leading
        system messages (whole turns are dropped; the tools stay)."""
        lead = 0
        while lead < len(prompt) and prompt[lead].get("role") == "system":
            lead += 1
        starts = [i for i in range(lead + 1, len(prompt)) if prompt[i].get("role") == "user"]
        return [prompt[:lead] + prompt[i:] for i in starts]


def fit(penc: PreferenceEncoder, rec: PreferenceRecord, encoded: list[Encoded], limit: int,
        policy: str) -> tuple[list[Encoded] | None, str | None]:
    """The length policy: (encoded, None) when it fits (maybe truncated), (None, why) when dropped."""
    longest = max(len(e.ids) for e in encoded)
    if longest <= limit:
        return encoded, None
    if policy == "drop":
        return None, f"{longest} tokens > sequence_len {limit}"
    for prompt in penc.shorter_prompts(rec.prompt):
        try:
            shorter = penc.encode(rec, prompt)
        except RecordError:  # mistral-common refuses this shorter conversation: try the next, shorter one
            continue
        if max(len(e.ids) for e in shorter) <= limit:
            return shorter, None
    return None, (f"{longest} tokens > sequence_len {limit}, and no shorter prompt (whole turns dropped from the "
                  "start) fits: the last user turn with the answer does not fit either")


def to_sample(rec: PreferenceRecord, encoded: list[Encoded], where: str) -> PreferenceSample | KTOSample:
    if rec.label is not None:
        (e,) = encoded
        return KTOSample(e.ids, e.labels, where, e.images, label=rec.label)
    c, r = encoded
    return PreferenceSample(c.ids, c.labels, r.ids, r.labels, where, c.images)


def kto_mismatched(samples: list[KTOSample]) -> list[tuple[list[int], list[int]]]:
    """KTO's KL estimate runs on mismatched pairs: example i's prompt with example i−1's completion (TRL rolls the
    completions of a batch by one; a batch of one pairs an example with itself). Each is (input_ids, labels), the
    completion labelled. Token concatenation is exact: a final answer encodes the same whatever the prompt (the
    tail after prompt_len is mistral-common's encoding of that assistant message alone), so prompt_i's ids +
    answer_j's ids are `encode_chat_completion` of that conversation (its images: example i's). It can be longer
    than either sample."""
    out = []
    for i, s in enumerate(samples):
        other = samples[i - 1]
        answer = other.input_ids[other.prompt_len:]
        prompt = s.input_ids[:s.prompt_len]
        out.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return out
