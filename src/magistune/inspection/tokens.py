"""ids + labels → the tokens a person reads: decoded text, control tokens by name, images folded.

Each display token has a kind that says which part of the conversation it belongs to:
    ctl    a control token shown by name ([INST], [/INST], </s>, [SYSTEM_PROMPT], …)
    think  [THINK] … [/THINK] and everything between
    tool   [TOOL_CALLS] up to the end of the assistant turn (names, [ARGS], the JSON arguments)
    img    one image: its run of [IMG] / [IMG_BREAK] tokens and the closing [IMG_END], folded to `[IMG]×N`
    text   everything else
`trained` is whether its label is not IGNORE_INDEX (a folded image is trained if any of its tokens is).

Text: Tekken tokens are bytes; a character split over several tokens is shown on the token that completes it
(the tokens before it show nothing), so the texts of a sequence's tokens join to its decoded text.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from magistune.data.sample import IGNORE_INDEX
from magistune.tokenizer import SpecialIds


@dataclass
class Token:
    text: str
    ids: list[int]  # one id, or every id of a folded image
    labels: list[int]
    kind: str  # ctl, think, tool, img, text
    control: bool = False  # shown by name (a control token), not decoded text

    @property
    def trained(self) -> bool:
        return any(t != IGNORE_INDEX for t in self.labels)


def _byte_level_map() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


_BYTE_OF = _byte_level_map()


class TokenNamer:
    """id → bytes or control-token name, for one tokenizer."""

    def __init__(self, tokenizer: MistralTokenizer):
        self.hf = getattr(tokenizer, "hf", None)  # hf_tokenizer.HFChatTokenizer's transformers tokenizer
        self.raw = tokenizer.instruct_tokenizer.tokenizer if self.hf is None else None
        self.special = SpecialIds.of(tokenizer)
        self.image_ids = {i for i in (self.special.img, self.special.img_break, self.special.img_end) if i is not None}
        self._names: dict[int, str | None] = {}

    def control_name(self, i: int) -> str | None:
        """`[INST]`, `</s>` … for a control token, None for a text token."""
        if i not in self._names and self.hf is not None:
            added = self.hf.added_tokens_decoder.get(i)
            self._names[i] = added.content if added is not None and added.special else None
        if i not in self._names:
            self._names[i] = self.raw.id_to_piece(i) if self.raw.is_special(i) else None
        return self._names[i]

    def piece(self, i: int) -> bytes:
        if self.hf is not None:  # byte-level BPE: each character of the token's text stands for one byte
            text = self.hf.convert_ids_to_tokens(i)
            if all(c in _BYTE_OF for c in text):
                return bytes(_BYTE_OF[c] for c in text)
            return self.hf.convert_tokens_to_string([text]).encode("utf-8")
        if hasattr(self.raw, "id_to_byte_piece"):  # Tekken
            return self.raw.id_to_byte_piece(i, SpecialTokenPolicy.KEEP)
        piece = self.raw.id_to_piece(i)  # SentencePiece: ▁ is a space, <0xNN> a byte
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])
        return piece.replace("▁", " ").encode("utf-8")

    def name_of(self, i: int) -> str:
        """A token's name for a legend or a title: the control token's name or its text."""
        return self.control_name(i) or self.piece(i).decode("utf-8", "replace")


def display_tokens(ids: list[int], labels: list[int] | None, namer: TokenNamer) -> list[Token]:
    """The display tokens of one sequence (labels None: nothing is trained, e.g. a GRPO prompt)."""
    labels = labels if labels is not None else [IGNORE_INDEX] * len(ids)
    sp = namer.special
    out: list[Token] = []
    utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # holds a character's bytes until it is complete
    state = "text"  # think / tool while inside those spans
    i = 0
    while i < len(ids):
        tid = ids[i]
        if tid in namer.image_ids:  # fold the image's whole run, up to and with its [IMG_END]
            j = i
            while j < len(ids) and ids[j] in namer.image_ids and (j == i or ids[j - 1] != sp.img_end):
                j += 1
            out.append(Token(f"[IMG]×{j - i}", ids[i:j], labels[i:j], "img", control=True))
            i = j
            continue
        name = namer.control_name(tid)
        if name is not None:
            if tid == sp.begin_think:
                state = "think"
            elif name == "[TOOL_CALLS]":
                state = "tool"
            kind = state if state in ("think", "tool") else "ctl"
            if tid == sp.end_think or tid == sp.eos or name in ("[INST]", "[TOOL_RESULTS]"):
                kind = "think" if tid == sp.end_think else ("tool" if state == "tool" and tid == sp.eos else "ctl")
                state = "text"
            out.append(Token(name, [tid], [labels[i]], kind, control=True))
        else:
            out.append(Token(utf8.decode(namer.piece(tid)), [tid], [labels[i]], state))
        i += 1
    rest = utf8.decode(b"", final=True)  # bytes that never completed a character: shown as �
    if rest:
        last = next(t for t in reversed(out) if not t.control)
        last.text += rest
    return out


def trained_text(tokens: list[Token]) -> str:
    """The text of the trained tokens, spans joined: what a person compares with the assistant's answers."""
    return "".join(t.text for t in tokens if t.trained)


def trained_spans(tokens: list[Token]) -> list[str]:
    """Each contiguous run of trained tokens as its text."""
    spans: list[str] = []
    previous = False
    for t in tokens:
        if t.trained and previous:
            spans[-1] += t.text
        elif t.trained:
            spans.append(t.text)
        previous = t.trained
    return spans
