"""The run's tokenizer file: the model's own, rewritten as `added_tokens_overrides:` and `tokens:` say.

    added_tokens_overrides: {20: "<ANSWER>"}   renames reserved slot 20 (Tekken's <SPECIAL_20>, SentencePiece's
                                               [control_N]); the vocabulary keeps its size
    tokens: ["<CITE>", "</CITE>"]              new tokens: the lowest free reserved slots; a SentencePiece file
                                               without enough of them grows (new ids from its size on); Tekken
                                               cannot grow (every text token's id would shift), so it says so
    special_tokens: {eos_token: "</s>"}        Axolotl's form, accepted where it restates the tokenizer's own

The renamed and added tokens are "named tokens" (tokenizer.py): text containing their names encodes them as
single ids. The rewritten file keeps the original's name (tekken.json, tokenizer.model.v3, ...) and is written once
per content under <prepared>/tokenizer/<hash>/; training copies it into output_dir, so chat, evaluate, merge and
export read it from there. mistral-common itself loads it and decodes the new names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from magistune.config import Config, ConfigError
from magistune.tokenizer import file_digest, load_tokenizer
from magistune.tokenizer import SP_USER_DEFINED, named_token_ids, read_sp_proto

SPECIAL_TOKEN_KEYS = {"bos_token": "bos_id", "eos_token": "eos_id", "pad_token": "pad_id", "unk_token": "unk_id"}
SP_RESERVED = re.compile(r"\[control_\d+\]")  # SentencePiece's unused control pieces (v2, v3, v7)


@dataclass(frozen=True)
class TokenEdits:
    overrides: dict[int, str] = field(default_factory=dict)
    tokens: tuple[str, ...] = ()
    special_tokens: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg: Config) -> "TokenEdits":
        return cls(dict(cfg.added_tokens_overrides or {}), tuple(cfg.tokens or ()), dict(cfg.special_tokens or {}))


@dataclass(frozen=True)
class EditPlan:
    renames: dict[int, str]  # reserved slot -> its new name
    appended: tuple[str, ...]  # new ids n_words, n_words + 1, ... (SentencePiece only)

    def __bool__(self) -> bool:
        return bool(self.renames or self.appended)

    def describe(self, first_new_id: int) -> str:
        parts = [f"{i} -> {n}" for i, n in sorted(self.renames.items())]
        parts += [f"{first_new_id + k} -> {n} (new)" for k, n in enumerate(self.appended)]
        return ", ".join(parts)


def compress_ranges(ids: list[int]) -> str:
    """[20, 21, 22, 36, 40, 41] -> '20-22, 36, 40-41'."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs) or "none"


def _slot_name(raw, i: int) -> str:
    if isinstance(raw, Tekkenizer):
        return str(getattr(raw._all_special_tokens[i]["token_str"], "value", raw._all_special_tokens[i]["token_str"]))
    return raw._model.id_to_piece(i)


def _n_reserved(raw) -> int:
    return raw.num_special_tokens if isinstance(raw, Tekkenizer) else raw.n_words


def free_slots(raw) -> list[int]:
    """Reserved control slots that nothing uses: Tekken's <SPECIAL_k> (k = its id), SentencePiece's [control_N]."""
    if isinstance(raw, Tekkenizer):
        return [i for i in range(raw.num_special_tokens) if _slot_name(raw, i) == Tekkenizer.SPECIAL_TOKEN_TEMPLATE.format(id=i)]
    return [i for i in range(raw.n_words) if raw._model.IsControl(i) and SP_RESERVED.fullmatch(raw._model.id_to_piece(i))]


def _existing_id(raw, name: str) -> int | None:
    """The id `name` already has in the tokenizer as a whole token (control token or piece), else None."""
    if isinstance(raw, Tekkenizer):
        return raw._special_tokens_reverse_vocab.get(name)
    i = raw._model.piece_to_id(name)
    return None if i == raw.unk_id and name != _slot_name(raw, raw.unk_id) else i


def _check_name(raw, name: str, where: str) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: {name!r}: a token name must be non-empty text")
    taken = _existing_id(raw, name)
    if taken is not None:
        raise ConfigError(f"{where}: {name!r} is already token {taken} of the tokenizer (a standard token keeps its "
                          "meaning; mistral-common encodes it as text inside messages): choose another name")


def plan_edits(raw, edits: TokenEdits, where: Path) -> EditPlan:
    """Validate the edits against the tokenizer; raises ConfigError naming the key and listing the free slots.
    Names the file already carries at the same place (an edited file given again) are not changes."""
    named = named_token_ids(raw)
    free = free_slots(raw)
    renames: dict[int, str] = {}
    for i, name in edits.overrides.items():
        if named.get(name) == i:
            continue
        key = f"added_tokens_overrides.{i}"
        _check_name(raw, name, key)
        if i not in free:
            what = (f"it is {_slot_name(raw, i)!r}" if 0 <= i < _n_reserved(raw) else
                    f"the reserved slots are ids 0-{_n_reserved(raw) - 1}")
            raise ConfigError(f"{key}: id {i} is not a free reserved slot of {where} ({what}); free slots: "
                              f"{compress_ranges(free)}")
        if name in renames.values():
            raise ConfigError(f"{key}: {name!r} is given to two ids")
        renames[i] = name
    new = []
    for name in edits.tokens:
        if name in named or name in renames.values() or name in new:
            continue  # already a named token: `tokens` lists what must exist
        _check_name(raw, name, "tokens")
        new.append(name)
    left = [i for i in free if i not in renames]
    renames.update(zip(left, new))
    appended = tuple(new[len(left):])
    if appended and isinstance(raw, Tekkenizer):
        raise ConfigError(f"tokens: {len(new)} new token(s) but {where} has {len(left)} free reserved slot(s) left "
                          f"({compress_ranges(left)}); a Tekken vocabulary cannot grow (every text token's id would "
                          "shift): add fewer tokens")
    return EditPlan(renames, appended)


def check_special_tokens(raw, special: dict[str, str], where: Path) -> None:
    """Axolotl's `special_tokens:` may only restate the tokenizer's own (mistral-common fixes them)."""
    for key, value in special.items():
        if key not in SPECIAL_TOKEN_KEYS:
            raise ConfigError(f"special_tokens.{key}: unknown; Axolotl's keys are {sorted(SPECIAL_TOKEN_KEYS)}")
        own_id = getattr(raw, SPECIAL_TOKEN_KEYS[key])
        own = _slot_name(raw, own_id) if own_id is not None and own_id >= 0 else None
        if own is None:
            raise ConfigError(f"special_tokens.{key}: {value!r}: {where} has no {key.removesuffix('_token')} token, "
                              "and mistral-common's special tokens come from the tokenizer file: remove the key")
        if value != own:
            raise ConfigError(f"special_tokens.{key}: {value!r} is not this tokenizer's {key.removesuffix('_token')} "
                              f"token ({own!r}, id {own_id} in {where}); mistral-common's special tokens are fixed by "
                              f"the tokenizer file: remove the key or write {own!r}")


def write_edited(src: Path, raw, plan: EditPlan, dest: Path) -> Path:
    """`src` with `plan` applied, written atomically to `dest`."""
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    if isinstance(raw, Tekkenizer):
        data = json.loads(src.read_text(encoding="utf-8"))
        # Every slot written out (older files list none, newer ones leave the <SPECIAL_k> fillers implicit).
        special = [{"rank": i, "token_str": _slot_name(raw, i), "is_control": t.get("is_control", True) is not False}
                   for i, t in enumerate(raw._all_special_tokens)]
        for i, name in plan.renames.items():
            special[i] = {"rank": i, "token_str": name, "is_control": False}  # a named token (tokenizer.py)
        data["special_tokens"] = special
        tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    else:
        proto = read_sp_proto(src)
        for i, name in plan.renames.items():
            proto.pieces[i].piece, proto.pieces[i].type = name, SP_USER_DEFINED
        for name in plan.appended:
            piece = proto.pieces.add()
            piece.piece, piece.score, piece.type = name, 0.0, SP_USER_DEFINED
        tmp.write_bytes(proto.SerializeToString())
    tmp.replace(dest)
    return dest


def run_tokenizer_file(base: Path, edits: TokenEdits, root: Path) -> Path:
    """`base` itself when the edits change nothing, else the rewritten file under `root` (written once)."""
    if not (edits.overrides or edits.tokens or edits.special_tokens):
        return base  # without loading it (a cached run reuses its samples without the tokenizer)
    raw = load_tokenizer(base).instruct_tokenizer.tokenizer
    check_special_tokens(raw, edits.special_tokens, base)
    plan = plan_edits(raw, edits, base)
    if not plan:
        return base
    spec = json.dumps([sorted(plan.renames.items()), plan.appended])
    key = hashlib.sha256(f"{file_digest(base)}\n{spec}".encode()).hexdigest()[:16]
    dest = root / key / base.name
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_edited(base, raw, plan, dest)
        print(f"note: tokenizer: {plan.describe(raw.n_words)}; the run's tokenizer is {dest}", file=sys.stderr)
    load_tokenizer(dest)  # it loads with mistral-common (a TokenizerError names the file otherwise)
    return dest
