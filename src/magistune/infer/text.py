"""Token ids → text with the mistral-common tokenizer, whole or one id at a time.

Streaming must print exactly what decoding the whole sequence gives. A Tekken token is a byte string, and a
UTF-8 character may span two tokens ("é" = C3 A9 can arrive as C3, then A9), so decoding token by token
would print replacement characters. `TextStream` feeds each token's bytes to an incremental UTF-8 decoder,
which holds an incomplete character back until its last byte arrives: O(1) per token, and the same text as
`decode_text` on the whole list (tests/infer/test_infer_text_prompts.py checks it on random ids).
"""

from __future__ import annotations

import codecs

from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from magistune.hf_tokenizer import HFChatTokenizer

# Control tokens the model writes into an answer ([TOOL_CALLS], [ARGS] …) are kept as their names: nothing
# the model produced is hidden. [THINK], [/THINK] and </s> never reach here (thinking.py removes them).
POLICY = SpecialTokenPolicy.KEEP


def decode_text(tokenizer: MistralTokenizer, ids: list[int]) -> str:
    if isinstance(tokenizer, HFChatTokenizer):
        return tokenizer.decode(ids)
    return tokenizer.instruct_tokenizer.tokenizer.decode(ids, special_token_policy=POLICY)


class TextStream:
    """push(id) → the text that id completes (maybe ""); flush() → what is still held back."""

    def __init__(self, tokenizer: MistralTokenizer):
        # A Hugging Face tokenizer re-decodes the ids so far, as SentencePiece does (its decoder owns the bytes).
        self.raw = tokenizer if isinstance(tokenizer, HFChatTokenizer) else tokenizer.instruct_tokenizer.tokenizer
        self.tekken = isinstance(self.raw, Tekkenizer)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []  # SentencePiece: the ids so far, re-decoded (a piece's text depends on its neighbours)
        self._shown = ""

    def push(self, token: int) -> str:
        if not self.tekken:
            self._ids.append(token)
            text = decode_text_raw(self.raw, self._ids)
            new = text[len(self._shown):] if text.startswith(self._shown) else ""
            self._shown = text
            return new
        piece = self.raw.id_to_byte_piece(token, special_token_policy=POLICY)
        if self.raw.is_special(token):
            # Tekken decodes the bytes between two control tokens as one run: close the run, then the name.
            return self._utf8.decode(b"", final=True) + piece.decode("utf-8")
        return self._utf8.decode(piece)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True) if self.tekken else ""


def decode_text_raw(raw, ids: list[int]) -> str:
    if isinstance(raw, HFChatTokenizer):
        return raw.decode(ids)
    return raw.decode(ids, special_token_policy=POLICY)
