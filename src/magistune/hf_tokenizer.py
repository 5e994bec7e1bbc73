"""Hugging Face tokenizers beside mistral-common's: a `tokenizer.json` and the model's own chat template.

Used when `tokenizer_use_mistral_common: false`, or when a model folder has a tokenizer.json and a chat template but
no mistral-common file (tekken.json, tokenizer.model.v*). Everywhere else magistune names a tokenizer by one file;
for these it is the tokenizer.json, and its siblings (tokenizer_config.json, chat_template.jinja,
special_tokens_map.json) travel with it (`tokenizer_files`).

Axolotl's tokenizer keys apply as Axolotl defines them (`customised_tokenizer`): `added_tokens_overrides`
renames entries of tokenizer.json's `added_tokens` (same ids, same size), `tokens` goes through
`tokenizer.add_tokens`, `special_tokens` through `tokenizer.add_special_tokens`. The result is saved as a folder
of its own, so the data cache, the checkpoints and the exported model all carry the modified files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from magistune.tokenizer import (SpecialIds, TokenizerError, default_cache_dir, file_digest, find_tokenizer_file,
                                 hf_tokenizer_in, load_tokenizer, tiny_tokenizer_path)

HF_TOKENIZER_FILE = "tokenizer.json"
HF_SIDE_FILES = ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
V13_TEMPLATE = Path(__file__).parent / "model_files" / "magistral_v13.jinja"  # our template for tiny-random-hf
_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")
THINK_PAIRS = (("[THINK]", "[/THINK]"), ("<think>", "</think>"))  # thinking delimiters, when single added tokens


def is_hf_tokenizer_file(path: str | Path) -> bool:
    return Path(path).name == HF_TOKENIZER_FILE


def model_tokenizer_file(folder: Path, use_mistral_common: bool = True) -> Path:
    """A model folder's tokenizer: its mistral-common file first (tokenizer_use_mistral_common: true), else its
    tokenizer.json with a chat template."""
    if use_mistral_common:
        return find_tokenizer_file(Path(folder))
    hf = hf_tokenizer_in(Path(folder))
    if hf is None:
        raise TokenizerError(f"{folder}: tokenizer_use_mistral_common is false, but the folder has no tokenizer.json "
                             "with a chat template (chat_template.jinja or tokenizer_config.json's chat_template)")
    return hf


def tokenizer_file_in(folder: Path, use_mistral_common: bool = True) -> Path | None:
    """model_tokenizer_file, or None when the folder has no tokenizer (e.g. an adapter folder from before
    training copied its tokenizer there)."""
    try:
        return model_tokenizer_file(folder, use_mistral_common)
    except TokenizerError:
        return None


def tiny_hf_tokenizer_path() -> Path:
    """The tiny models' Tekken file as Hugging Face files with our v13 template (written once per template)."""
    template = V13_TEMPLATE.read_text(encoding="utf-8")
    tag = hashlib.sha256(template.encode()).hexdigest()[:12]
    folder = default_cache_dir() / "tiny-random-hf-tokenizer" / tag
    if not (folder / HF_TOKENIZER_FILE).is_file():
        tmp = folder.with_name(f".{tag}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        write_hf_tokenizer(tiny_tokenizer_path(), tmp, template)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process won the race: its folder is the same
            shutil.rmtree(tmp, ignore_errors=True)
    return folder / HF_TOKENIZER_FILE


def tokenizer_files(tokenizer_file: str | Path) -> list[Path]:
    """The files that make the tokenizer: a mistral-common file alone, or tokenizer.json and its siblings."""
    path = Path(tokenizer_file)
    if not is_hf_tokenizer_file(path):
        return [path]
    return [path] + [p for name in HF_SIDE_FILES if (p := path.parent / name).is_file()]


def copy_tokenizer_files(tokenizer_file: str | Path, out_dir: str | Path) -> None:
    for path in tokenizer_files(tokenizer_file):
        if path.resolve() != (Path(out_dir) / path.name).resolve():
            shutil.copyfile(path, Path(out_dir) / path.name)


def tokenizer_digest(tokenizer_file: str | Path) -> str:
    """A hash of every file of the tokenizer (the data cache's key has it)."""
    h = hashlib.sha256()
    for path in tokenizer_files(tokenizer_file):
        h.update(f"{path.name}:{file_digest(path)}\n".encode())
    return h.hexdigest()


class HFChatTokenizer:
    """A `transformers` fast tokenizer with its chat template: what the data, train and infer stages need."""

    kind = "hf"

    def __init__(self, hf, path: Path):
        self.hf = hf
        self.path = path
        if not hf.chat_template:
            raise TokenizerError(f"{path}: no chat template (chat_template.jinja or tokenizer_config.json's "
                                 "chat_template); the Hugging Face tokenizer path renders records with it")
        if hf.eos_token_id is None:
            raise TokenizerError(f"{path}: the tokenizer has no eos_token; set special_tokens: {{eos_token: ...}}")
        code = re.sub(r"{#.*?#}", "", hf.chat_template, flags=re.S)  # markers named in comments do not count
        self.has_generation_markers = bool(_GENERATION.search(code))

    @property
    def n_words(self) -> int:
        return len(self.hf)

    def single_id(self, text: str) -> int | None:
        """The id of an added token whose text is `text`, or None."""
        for i, tok in self.hf.added_tokens_decoder.items():
            if tok.content == text:
                return i
        return None

    def special_ids(self) -> SpecialIds:
        hf = self.hf
        think = next(((a, b) for a, b in (tuple(map(self.single_id, p)) for p in THINK_PAIRS)
                      if a is not None and b is not None), (None, None))
        pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id  # padding is masked anyway
        bos = hf.bos_token_id if hf.bos_token_id is not None else -1  # -1: the tokenizer has no BOS
        return SpecialIds(bos=bos, eos=hf.eos_token_id, pad=pad, begin_think=think[0], end_think=think[1],
                          img=None, img_break=None, img_end=None)  # images: mistral-common's path only

    def render(self, messages: list[dict], tools: list | None, add_generation_prompt: bool = False) -> str:
        return self.hf.apply_chat_template(messages, tools=tools, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)

    def encode_prompt(self, request) -> list[int]:
        """Inference: a mistral-common request (ending with the user) → the template's prompt ids."""
        messages, tools = template_messages(request)
        text = self.render(messages, tools, add_generation_prompt=True)
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def load_any_tokenizer(path: str | Path, mode=None):
    """A tokenizer.json as HFChatTokenizer, anything else as tokenizer.load_tokenizer does (`mode`: its
    validation mode; a chat template has none)."""
    if is_hf_tokenizer_file(path):
        return load_hf_tokenizer(path)
    return load_tokenizer(path) if mode is None else load_tokenizer(path, mode=mode)


def load_hf_tokenizer(path: str | Path) -> HFChatTokenizer:
    """The tokenizer.json at `path` with its siblings; memoised on the files' digests."""
    path = Path(path).resolve()
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer file not found")
    return _load(str(path), tokenizer_digest(path))


@functools.lru_cache(maxsize=8)
def _load(path: str, digest: str) -> HFChatTokenizer:
    return HFChatTokenizer(_fast_tokenizer(Path(path)), Path(path))


def _fast_tokenizer(path: Path):
    """A fresh transformers fast tokenizer from tokenizer.json's folder (never memoised: callers may modify it)."""
    from transformers import PreTrainedTokenizerFast

    try:  # the fast tokenizer class itself: JSON files only, never code from the folder
        return PreTrainedTokenizerFast.from_pretrained(str(path.parent), local_files_only=True)
    except Exception as e:  # tokenizers raises Exception subclasses of its own on a bad file
        raise TokenizerError(f"{path}: not a Hugging Face tokenizer ({type(e).__name__}: {e})") from None


def template_messages(request) -> tuple[list[dict], list | None]:
    """A mistral-common request → the OpenAI messages and tools a chat template takes. A leading closed thinking
    part becomes `reasoning_content` (the field most templates read); other thinking parts stay parts. Text parts
    are joined with a blank line (mistral-common's join); tool-call arguments are objects."""
    messages = []
    for m in request.messages:
        dump = m.to_openai(reasoning_field_format="thinking_chunks") if m.role == "assistant" else m.to_openai()
        msg = {k: v for k, v in dump.items() if v is not None}
        for call in msg.get("tool_calls") or []:  # arguments as an object: templates render them with tojson
            call["function"]["arguments"] = _as_object(call["function"]["arguments"])
        content = msg.get("content")
        if msg["role"] == "assistant" and isinstance(content, list) and content:
            head, rest = content[0], content[1:]
            if (head.get("type") == "thinking" and head.get("closed", True)
                    and all(p.get("type") == "text" for p in rest)):
                msg["reasoning_content"] = head["thinking"]
                msg["content"] = "\n\n".join(p["text"] for p in rest if p["text"])
        if isinstance(msg.get("content"), list) and all(p.get("type") == "text" for p in msg["content"]):
            msg["content"] = "\n\n".join(p["text"] for p in msg["content"] if p["text"])  # mistral-common's join
        messages.append(msg)
    tools = None
    if request.tools:
        tools = [t.model_dump(mode="json") for t in request.tools]
        for t in tools:  # mistral-common's own `strict: false` default is not part of the record
            if t.get("function", {}).get("strict") is False:
                t["function"].pop("strict")
    return messages, tools


def _as_object(arguments):
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        return arguments  # not JSON: the template renders the string as it is


def write_hf_tokenizer(tekken_file: Path, folder: Path, template: str) -> Path:
    """Convert a Tekken file with transformers' own converter and save it with `template` (the Hugging Face
    files of a Magistral model). Returns the tokenizer.json."""
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    hf = convert_tekken_tokenizer(str(tekken_file), chat_template=template)
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(folder))
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    return folder / HF_TOKENIZER_FILE


def customised_tokenizer(tokenizer_file: Path, folder: Path, tokens: list[str] | None = None,
                         special_tokens: dict[str, str] | None = None,
                         overrides: dict[int, str] | None = None) -> Path:
    """The tokenizer with Axolotl's `added_tokens_overrides`, `tokens` and `special_tokens` applied, saved in
    `folder` (a folder named by a hash of the source and the options: rebuilt only when one changes)."""
    from tokenizers import AddedToken

    blob = json.dumps([tokenizer_digest(tokenizer_file), tokens, special_tokens,
                       {str(k): v for k, v in (overrides or {}).items()}], sort_keys=True)
    target = folder / f"tokenizer-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
    if (target / HF_TOKENIZER_FILE).is_file():
        return target / HF_TOKENIZER_FILE
    tmp = folder / f".{target.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        copy_tokenizer_files(tokenizer_file, tmp)
        if overrides:
            _override_added_tokens(tmp, overrides, tokenizer_file)
        hf = _fast_tokenizer(tmp / HF_TOKENIZER_FILE)
        plain = lambda t: AddedToken(t, rstrip=False, lstrip=False, normalized=False)  # noqa: E731 (Axolotl's)
        if tokens:
            hf.add_tokens([plain(t) for t in tokens])
        if special_tokens:
            hf.add_special_tokens({k: plain(v) for k, v in special_tokens.items()})
        hf.save_pretrained(str(tmp))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except OSError as e:
        raise TokenizerError(f"{folder}: cannot write the modified tokenizer ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a failed attempt leaves nothing
    return target / HF_TOKENIZER_FILE


def _override_added_tokens(folder: Path, overrides: dict[int, str], source: Path) -> None:
    """Rename tokenizer.json's added tokens in place, as Axolotl does (and tokenizer_config.json's copy). Errors
    name `source`, the file the copy came from."""
    path = folder / HF_TOKENIZER_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    for token_id, name in overrides.items():
        if token_id not in added:
            ids = sorted(added)
            raise TokenizerError(f"added_tokens_overrides: {token_id} is not an added token of {source} (its added "
                                 f"tokens are ids {ids[0]}–{ids[-1]})" if ids else
                                 f"added_tokens_overrides: {source} has no added tokens")
        old = added[token_id]["content"]
        added[token_id]["content"] = name
        vocab = data.get("model", {}).get("vocab")
        if isinstance(vocab, dict) and vocab.get(old) == token_id:
            vocab[name] = vocab.pop(old)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        for token_id, name in overrides.items():
            entry = config.get("added_tokens_decoder", {}).get(str(token_id))
            if isinstance(entry, dict):
                entry["content"] = name
        config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
