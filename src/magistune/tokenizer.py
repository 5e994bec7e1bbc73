"""Loading mistral-common tokenizers, the embedded `tiny-random` v13 Tekken tokenizer, and named tokens (a config's
added or renamed tokens, encoded as one id wherever text holds their names; the section at the end).

Every special-token id is read from the tokenizer (`SpecialIds`), never hard-coded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import mistral_common
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import SpecialTokens, TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

# The 20 control tokens of the legacy Tekken files, in rank order, then fillers and the v11/v13 additions.
_LEGACY_CONTROL = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
]
TINY_SPECIAL_TOKENS = _LEGACY_CONTROL + [f"<SPECIAL_{i}>" for i in range(20, 32)] + ["[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]"]
# Magistral Small 2509's image settings: 14-pixel patches, 2x2 spatial merge, images up to 1540 pixels.
TINY_IMAGE_CONFIG = {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2}
TINY_SOURCE = "tekken_240911.json"  # shipped inside the mistral-common wheel
# The built-in random-weight models (model_files/tiny.py writes them); all use the tokenizer below. Here, not in
# tiny.py, so that the data stage can recognise them without importing torch.
TINY_NAMES = ("tiny-random", "tiny-random-vision", "tiny-random-hf")  # -hf: Hugging Face tokenizer files (hf_tokenizer.py)


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used: the message names the path and the reason."""


def shipped_tokenizer_file(name: str) -> Path:
    """A tokenizer file from mistral-common's own `data/` folder (tests use these)."""
    return Path(mistral_common.__file__).parent / "data" / name


def tiny_tekken_json() -> dict:
    """The v13 Tekken tokenizer of `tiny-random`, derived from the file the mistral-common wheel ships."""
    data = json.loads(shipped_tokenizer_file(TINY_SOURCE).read_text(encoding="utf-8"))
    data["config"]["version"] = "v13"
    data["special_tokens"] = [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(TINY_SPECIAL_TOKENS)]
    data["image"] = dict(TINY_IMAGE_CONFIG)
    return data


def write_tiny_tekken(path: Path) -> Path:
    """Write the tiny-random tokenizer file to `path` (once; it is deterministic)."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")  # unique per process: concurrent writers never collide
        tmp.write_text(json.dumps(tiny_tekken_json()), encoding="utf-8")
        tmp.replace(path)
    return path


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "magistune"


def tiny_tokenizer_path() -> Path:
    return write_tiny_tekken(default_cache_dir() / "tiny-random" / "tekken.json")


def load_tokenizer(path: str | Path, mode: ValidationMode = ValidationMode.finetuning) -> MistralTokenizer:
    """A mistral-common tokenizer. Fine-tuning mode (the default) wants conversations that end with the
    assistant; inference uses ValidationMode.test (they end with the user). Memoised on the file's path,
    size and mtime: loading a Tekken file takes seconds. Named tokens (below) encode as their ids."""
    path = Path(path).resolve()
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer file not found")
    st = path.stat()
    return _load_tokenizer(str(path), st.st_size, st.st_mtime_ns, mode)


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str, size: int, mtime_ns: int, mode: ValidationMode) -> MistralTokenizer:
    try:
        tokenizer = MistralTokenizer.from_file(path, mode=mode)
    except Exception as e:  # mistral-common raises ValueError, AssertionError, KeyError … on bad files
        raise TokenizerError(f"{path}: not a mistral-common tokenizer file ({type(e).__name__}: {e})") from None
    install_named_tokens(tokenizer)
    return tokenizer


def find_tokenizer_file(model_dir: Path) -> Path:
    """`tekken.json` in a model folder, else the newest SentencePiece `tokenizer.model.v*`."""
    tekken = model_dir / "tekken.json"
    if tekken.is_file():
        return tekken
    def version(p: Path) -> int:
        digits = p.name.rsplit(".v", 1)[-1].split("m")[0]
        return int(digits) if digits.isdigit() else -1

    sp = sorted(model_dir.glob("tokenizer.model.v*"), key=version)
    if sp:
        return sp[-1]
    hf = hf_tokenizer_in(model_dir)  # a Hugging Face tokenizer.json with a chat template (hf_tokenizer.py)
    if hf is not None:
        return hf
    raise TokenizerError(f"{model_dir}: no tekken.json, tokenizer.model.v* or tokenizer.json with a chat template "
                         "found; set tokenizer_path")


def has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(isinstance(config, dict) and config.get("chat_template"))


def hf_tokenizer_in(folder: Path) -> Path | None:
    """The folder's Hugging Face tokenizer.json when it also has a chat template, else None."""
    path = Path(folder) / "tokenizer.json"
    return path if path.is_file() and has_chat_template(path.parent) else None


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class SpecialIds:
    """The ids the data pipeline needs, read from the tokenizer itself."""

    bos: int
    eos: int
    pad: int
    begin_think: int | None
    end_think: int | None
    img: int | None
    img_break: int | None
    img_end: int | None

    @classmethod
    def of(cls, tok: MistralTokenizer) -> "SpecialIds":
        if not isinstance(tok, MistralTokenizer):  # hf_tokenizer.HFChatTokenizer
            return tok.special_ids()
        raw = tok.instruct_tokenizer.tokenizer

        def get(token: SpecialTokens) -> int | None:
            try:
                i = raw.get_special_token(token.value)
            except Exception:  # Tekken raises for a token it does not have
                return None
            # SentencePiece maps an unknown string to <unk> instead of raising: that is "absent" too.
            return None if i == getattr(raw, "unk_id", None) else i

        think_ok = raw.version >= TokenizerVersion.v13
        return cls(
            bos=raw.bos_id,
            eos=raw.eos_id,
            pad=raw.pad_id,
            # mistral-common encodes thinking from v13 on; an older file that lists [THINK] cannot use it.
            begin_think=get(SpecialTokens.begin_think) if think_ok else None,
            end_think=get(SpecialTokens.end_think) if think_ok else None,
            img=get(SpecialTokens.img),
            img_break=get(SpecialTokens.img_break),
            img_end=get(SpecialTokens.img_end),
        )

    @property
    def has_think(self) -> bool:
        return self.begin_think is not None and self.end_think is not None


def tokenizer_version(tok: MistralTokenizer) -> str:
    if not isinstance(tok, MistralTokenizer):
        return "hf"
    return str(tok.instruct_tokenizer.tokenizer.version.value)


def vocab_size(tok: MistralTokenizer) -> int:
    if not isinstance(tok, MistralTokenizer):
        return tok.n_words
    return tok.instruct_tokenizer.tokenizer.n_words


def image_encoder_of(tok) -> object | None:
    """mistral-common's image encoder of the tokenizer; None without an image config or for a Hugging Face one."""
    return getattr(getattr(tok, "instruct_tokenizer", None), "image_encoder", None)


# --- named tokens ---------------------------------------------------------------------------------------
# Named tokens: tokens a config added or renamed (`tokens:`, `added_tokens_overrides:`), and how text maps to them.
#
# mistral-common encodes every control token that appears inside message text as plain text ("[INST]" typed by a
# user is 5 tokens, not the control id). A named token is the exception a config asks for: wherever its name occurs
# in text, it is that one id. The tokenizer file says which tokens are named, so every stage that loads it (training,
# chat, evaluate, export) agrees without the config:
#
#     Tekken          a `special_tokens` entry with "is_control": false (mistral-common's own files mark every special
#                     token true; the flag is informational to mistral-common, which loads and decodes the file as usual)
#     SentencePiece   a USER_DEFINED piece that the model's trainer_spec.user_defined_symbols does not list (the
#                     pieces the tokenizer was trained with, e.g. v7's [REF], are listed and stay as they are)
#
# `SplicingEncode` replaces the raw tokenizer's `encode`: the text is cut at each name (longest name first), the
# pieces between are encoded by mistral-common's own `encode`, and the names' ids are put between them. Text with no
# name is passed through whole, so its ids are exactly mistral-common's.

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
