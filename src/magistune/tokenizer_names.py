"""Named tokens: tokens a config added or renamed (`tokens:`, `added_tokens_overrides:`), and how text maps to them.

mistral-common encodes every control token that appears inside message text as plain text ("[INST]" typed by a
user is 5 tokens, not the control id). A named token is the exception a config asks for: wherever its name occurs
in text, it is that one id. The tokenizer file says which tokens are named, so every stage that loads it (training,
chat, evaluate, export) agrees without the config:

    Tekken          a `special_tokens` entry with "is_control": false (mistral-common's own files mark every special
                    token true; the flag is informational to mistral-common, which loads and decodes the file as usual)
    SentencePiece   a USER_DEFINED piece that the model's trainer_spec.user_defined_symbols does not list (the
                    pieces the tokenizer was trained with, e.g. v7's [REF], are listed and stay as they are)

`SplicingEncode` replaces the raw tokenizer's `encode`: the text is cut at each name (longest name first), the
pieces between are encoded by mistral-common's own `encode`, and the names' ids are put between them. Text with no
name is passed through whole, so its ids are exactly mistral-common's.
"""

from __future__ import annotations

import re
from pathlib import Path

from mistral_common.tokens.tokenizers.tekken import Tekkenizer

SP_USER_DEFINED = 4  # sentencepiece_model.proto: ModelProto.SentencePiece.Type.USER_DEFINED


def read_sp_proto(path: Path):
    """The SentencePiece ModelProto of `path` (protobuf, no code runs)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


def sp_named_ids(proto) -> dict[str, int]:
    trained = set(proto.trainer_spec.user_defined_symbols)
    return {p.piece: i for i, p in enumerate(proto.pieces) if p.type == SP_USER_DEFINED and p.piece not in trained}


def named_token_ids(raw) -> dict[str, int]:
    """{name: id} of the named tokens of a raw mistral-common tokenizer (Tekkenizer or SentencePieceTokenizer)."""
    if isinstance(raw, Tekkenizer):
        return {t["token_str"]: t["rank"] for t in raw._all_special_tokens if t.get("is_control", True) is False}
    return sp_named_ids(read_sp_proto(raw.file_path))


class SplicingEncode:
    """`raw.encode` with every name in `names` encoded as its single id (see the module docstring)."""

    def __init__(self, encode, names: dict[str, int], bos_id: int, eos_id: int):
        self.plain = encode  # mistral-common's own encode(s, bos, eos)
        self.names = dict(names)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pattern = re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)))

    def __call__(self, s: str, bos: bool, eos: bool) -> list[int]:
        if not self.names or not self.pattern.search(s):
            return self.plain(s, bos=bos, eos=eos)
        ids = [self.bos_id] if bos else []
        pos = 0
        for m in self.pattern.finditer(s):
            if m.start() > pos:
                ids += self.plain(s[pos:m.start()], bos=False, eos=False)
            ids.append(self.names[m.group()])
            pos = m.end()
        if pos < len(s):
            ids += self.plain(s[pos:], bos=False, eos=False)
        return ids + ([self.eos_id] if eos else [])


def install_named_tokens(tokenizer) -> dict[str, int]:
    """Make a MistralTokenizer encode its named tokens (if any) as their ids. Returns {name: id}."""
    raw = tokenizer.instruct_tokenizer.tokenizer
    names = named_token_ids(raw)
    if names and not isinstance(raw.encode, SplicingEncode):
        # An instance attribute in front of the class's method: every caller inside mistral-common's instruct
        # tokenizer (user, system, assistant, tool texts) goes through it.
        raw.encode = SplicingEncode(raw.encode, names, raw.bos_id, raw.eos_id)
    return names
