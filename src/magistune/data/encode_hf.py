"""Conversation → (input_ids, labels) with a Hugging Face tokenizer and the model's own chat template.

The conversation is rendered once (transformers' `apply_chat_template`): the cost is one render and one
tokenisation per record, linear in its length (Axolotl re-renders every prefix: quadratic). The trained tokens
of each assistant turn come from, in order of preference:

  - the template's `{% generation %}` blocks (`return_assistant_tokens_mask`): exactly what the template marks,
    one block per assistant message (a template that merges turns is fine while their weights agree);
  - else the rendered text: each message's text is found in it, in order, and an assistant turn is trained from
    the start of its first text (its reasoning, else its content) through the end-of-turn `eos_token` that
    follows it. The offsets of one tokenisation map these characters to tokens; a turn whose start or end
    falls inside a token, whose text the template changed or dropped, or which has no text at all (tool calls
    only) rejects the record with the reason: never a guess. Markup the template writes before the first text
    (Magistral's [THINK], Qwen's <think>) is the prompt's, and stays untrained.

Labels follow data/encode.py's options (train_thinking masks [THINK]…[/THINK] by their ids, train_on_inputs,
train_on_eos). Text that spells one of the tokenizer's special tokens becomes that token, as transformers does at
inference (mistral-common keeps it text): docs/config.md lists this difference.
"""

from __future__ import annotations

from magistune.data.encode import LabelOptions
from magistune.data.errors import RecordError, short_error
from magistune.data.records import Conversation
from magistune.data.sample import IGNORE_INDEX
from magistune.hf_tokenizer import HFChatTokenizer, template_messages


class HFConversationEncoder:
    supports_images = False  # images go through mistral-common's image encoder only

    def __init__(self, tokenizer: HFChatTokenizer, use_generation_markers: bool | None = None):
        self.tokenizer = tokenizer
        self.hf = tokenizer.hf
        self.ids = tokenizer.special_ids()
        self.eos_text = self.hf.eos_token
        self.generation = tokenizer.has_generation_markers if use_generation_markers is None else use_generation_markers

    def encode(self, conv: Conversation, opts: LabelOptions = LabelOptions()) -> tuple[list[int], list[int], list]:
        messages, tools = template_messages(conv.request)
        try:
            if self.generation:
                ids, spans = self._by_markers(messages, tools)
            else:
                ids, spans = self._by_offsets(messages, tools)
        except RecordError:
            raise
        except Exception as e:  # the template's raise_exception, jinja errors
            raise RecordError("rejected_by_chat_template", f"the chat template could not render it: {short_error(e)}") from None
        weights = conv.weights
        if not spans:
            raise RecordError("turns_not_separable", "the template's generation blocks mark no assistant turn")
        if len(spans) != len(weights):
            if len(set(weights)) > 1:
                raise RecordError("turns_not_separable", f"the template's generation blocks make {len(spans)} "
                                  f"assistant turn(s) of {len(weights)} assistant messages with different weights")
            weights = [weights[0]] * len(spans)
        labels = [IGNORE_INDEX] * len(ids)
        for (start, end, answer), weight in zip(spans, weights):
            if weight:
                labels[start:end] = ids[start:end]
                if not opts.train_thinking:
                    self._mask_thinking(ids, labels, start, end, answer)
        if opts.train_on_inputs:
            return ids, [IGNORE_INDEX] + ids[1:], []
        eos_at = [end - 1 for start, end, _ in spans if ids[end - 1] == self.ids.eos]
        if opts.train_on_eos != "turn":
            for k, pos in enumerate(eos_at):
                keep = {"all": True, "none": False, "last": k == len(eos_at) - 1}[opts.train_on_eos]
                labels[pos] = ids[pos] if keep else IGNORE_INDEX
        return ids, labels, []

    def _by_markers(self, messages: list[dict], tools) -> tuple[list[int], list[tuple[int, int, int | None]]]:
        out = self.hf.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        spans, start = [], None
        for i, m in enumerate(mask + [0]):
            if m and start is None:
                start = i
            elif not m and start is not None:
                spans.append((start, i, None))
                start = None
        return ids, spans

    def _by_offsets(self, messages: list[dict], tools) -> tuple[list[int], list[tuple[int, int, int | None]]]:
        text = self.tokenizer.render(messages, tools)
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        starts, ends = token_boundaries(offsets)
        spans, cursor, pending = [], 0, None  # pending: (message index, end of its end-of-turn) to check
        for i, msg in enumerate(messages):
            located = []
            for piece in text_pieces(msg):
                at = text.find(piece, cursor)
                if at < 0:
                    raise RecordError("turn_not_found", f"messages[{i}] ({msg['role']}): its text {_clip(piece)} is "
                                      "not in the rendered chat template (the template changes or drops it)")
                located.append((at, at + len(piece)))
                cursor = at + len(piece)
            if pending is not None and located:
                if located[0][0] < pending[1]:
                    raise RecordError("no_end_of_turn", f"messages[{pending[0]}]: the chat template writes no "
                                      f"{self.eos_text!r} (eos_token) between this assistant turn and the next message")
                pending = None
            if msg["role"] != "assistant":
                continue
            if not located:
                raise RecordError("turn_not_located", f"messages[{i}]: an assistant message without text (tool calls "
                                  "only) cannot be found in the rendered template; use a chat template with "
                                  "{% generation %} markers")
            eos = text.find(self.eos_text, cursor)
            if eos < 0:
                raise RecordError("no_end_of_turn", f"messages[{i}]: no {self.eos_text!r} (eos_token) follows the "
                                  "assistant turn in the rendered chat template")
            start, end = located[0][0], eos + len(self.eos_text)
            answer_char = located[1][0] if msg.get("reasoning_content") and len(located) > 1 else start
            for where, char, table in (("starts", start, starts), ("ends", end, ends)):
                if char not in table:
                    raise RecordError("turn_boundary_inside_token", f"messages[{i}]: the assistant turn {where} inside "
                                      f"a token (character {char} of the rendered text: {_clip(text[max(char - 10, 0):char + 10])}); "
                                      "its tokens cannot be separated from the prompt's")
            answer = starts.get(answer_char) if answer_char != start else None
            spans.append((starts[start], ends[end], answer))
            pending = (i, end)
        return ids, spans

    def _mask_thinking(self, ids: list[int], labels: list[int], start: int, end: int, answer: int | None) -> None:
        """train_thinking: false. [THINK] … [/THINK] by their ids; on the offsets path a turn starting with its
        reasoning text (its [THINK] is the prompt's) is masked up to its answer."""
        if answer is not None:
            labels[start:answer] = [IGNORE_INDEX] * (answer - start)
        if self.ids.has_think:
            pos = start
            while self.ids.begin_think in ids[pos:end]:
                a = ids.index(self.ids.begin_think, pos, end)
                b = ids.index(self.ids.end_think, a, end) + 1 if self.ids.end_think in ids[a:end] else end
                labels[a:b] = [IGNORE_INDEX] * (b - a)
                pos = b


def text_pieces(msg: dict) -> list[str]:
    """The texts of a message, in the order templates write them: reasoning, then the content's parts."""
    pieces = [msg["reasoning_content"]] if isinstance(msg.get("reasoning_content"), str) else []
    content = msg.get("content")
    if isinstance(content, str):
        pieces.append(content)
    elif isinstance(content, list):
        for part in content:
            pieces.append(part.get("text") if part.get("type") == "text" else part.get("thinking"))
    return [p for p in pieces if isinstance(p, str) and p]


def token_boundaries(offsets: list[tuple[int, int]]) -> tuple[dict[int, int], dict[int, int]]:
    """Characters where a token cleanly starts → its index, and where one cleanly ends → the index after it.
    Byte-level BPE can give two tokens the same character (a character cut in two): no boundary lies there."""
    starts, ends = {}, {}
    prev_end = 0
    for i, (s, e) in enumerate(offsets):
        if s >= prev_end:
            starts.setdefault(s, i)
            ends[s] = i  # the tokens before i end at or before s
        prev_end = max(prev_end, e)
    ends[prev_end] = len(offsets)
    return starts, ends


def _clip(s: str, n: int = 40) -> str:
    return repr(s if len(s) <= n else s[:n] + "…")
