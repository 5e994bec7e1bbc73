"""The system prompt a model is trained and used with.

Mistral ships Magistral with a `SYSTEM_PROMPT.txt` beside the weights and asks that it be used for training and
inference alike. What decides, first match wins:

    system_prompt_file: F        F's text                       (an explicit choice)
    system_prompt: TEXT          TEXT; `system_prompt: ""` means no system prompt at all
    SYSTEM_PROMPT.txt            in the model folder(s): the base model (local, or the Hugging Face cache),
                                 and for inference first the trained output folder, which keeps the one used

A dataset's own `system_prompt` (data/sources.py) and chat/generate's `--system` / `--no-system-prompt` come
before all of these. One note on stderr says when a SYSTEM_PROMPT.txt became the default.

Magistral 2507/2509's file holds its thinking template as `[THINK]…[/THINK]`: Mistral's model card sends it as
a system message of three parts (text, a closed thinking part, text), so that [THINK] and [/THINK] are the
control tokens and not the text "[THINK]". `system_message` does the same whenever the tokenizer has [THINK].
"""

from __future__ import annotations

import sys
from pathlib import Path

from magistune.config import Config, ConfigError
from magistune.tokenizer import TINY_NAMES

SYSTEM_PROMPT_FILE = "SYSTEM_PROMPT.txt"
THINK_OPEN, THINK_CLOSE = "[THINK]", "[/THINK]"
_noted: set[str] = set()  # the SYSTEM_PROMPT.txt files already announced in this process


def read_prompt_file(path: Path, key: str) -> str:
    """A prompt file's text: UTF-8 (a Windows byte-order mark dropped), surrounding blank space stripped."""
    if not path.is_file():
        raise ConfigError(f"{key}: {path} not found")
    try:
        return path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{key}: {path}: not valid UTF-8 (byte {e.start + 1}); save it as UTF-8") from None


def base_model_folder(cfg: Config) -> Path | None:
    """Where `base_model`'s files are, without converting or loading anything: a local folder, or its
    snapshot in the local Hugging Face cache; None for the tiny models and anything not found."""
    if cfg.base_model in TINY_NAMES:
        return None
    local = cfg.resolve(cfg.base_model)
    for candidate in (local, Path(cfg.base_model).expanduser()):
        if candidate is not None and candidate.is_dir():
            return candidate
    if cfg.base_model.count("/") != 1 or cfg.base_model.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(cfg.base_model, SYSTEM_PROMPT_FILE)
    except Exception:  # not a valid repo id: resolve_model_dir reports it when the model loads
        return None
    return Path(found).parent if isinstance(found, str) else None


def folder_prompt(folders: list[Path | None]) -> str | None:
    """The first SYSTEM_PROMPT.txt of `folders`, announced once per process."""
    for folder in folders:
        if folder is None:
            continue
        path = Path(folder) / SYSTEM_PROMPT_FILE
        if path.is_file():
            text = read_prompt_file(path, SYSTEM_PROMPT_FILE)
            if str(path) not in _noted:
                _noted.add(str(path))
                print(f"note: system prompt: {path} ({len(text)} characters) is the default for conversations "
                      "without a system message (system_prompt: \"\" or --no-system-prompt turns it off)",
                      file=sys.stderr)
            return text
    return None


def explicit_system_prompt(cfg: Config) -> tuple[bool, str | None]:
    """(the config decides, its prompt): system_prompt_file, or system_prompt ("" -> None: no prompt)."""
    if cfg.system_prompt_file:
        return True, read_prompt_file(cfg.resolve(cfg.system_prompt_file), "system_prompt_file")  # type: ignore[arg-type]
    if cfg.system_prompt is not None:
        return True, cfg.system_prompt or None
    return False, None


def resolve_system_prompt(cfg: Config, folders: list[Path | None] | None = None) -> str | None:
    """The config's system prompt, else the SYSTEM_PROMPT.txt of `folders` (default: the base model's)."""
    decided, text = explicit_system_prompt(cfg)
    if decided:
        return text
    return folder_prompt(folders if folders is not None else [base_model_folder(cfg)])


def system_message(text: str, supports_thinking: bool) -> dict:
    """The system message for `text`: its [THINK]…[/THINK] span as a closed thinking part when the tokenizer has
    [THINK] (see the module docstring), else the text as it is."""
    start, end = text.find(THINK_OPEN), text.find(THINK_CLOSE)
    if not supports_thinking or start < 0 or end < start:
        return {"role": "system", "content": text}
    parts = [{"type": "text", "text": text[:start]},
             {"type": "thinking", "thinking": text[start + len(THINK_OPEN):end], "closed": True},
             {"type": "text", "text": text[end + len(THINK_CLOSE):]}]
    return {"role": "system", "content": [p for p in parts if p.get("text", True)]}


def write_prompt_file(out_dir: Path, text: str | None) -> None:
    """Keep the prompt that was used beside what was trained (nothing when there was none)."""
    if text is not None:
        (Path(out_dir) / SYSTEM_PROMPT_FILE).write_text(text, encoding="utf-8")
