"""`base_model` -> a local Hugging Face model folder: a tiny model, a local folder, a native folder converted
once, or a hub id in the local Hugging Face cache. magistune never downloads."""

from __future__ import annotations

import sys
from pathlib import Path

from magistune.config import ConfigError
from magistune.model_files.native import hf_layout_for, is_native
from magistune.model_files.tiny import TINY_NAMES, materialize_tiny
from magistune.tokenizer import default_cache_dir


class ModelError(ConfigError):
    """A model that cannot be used as configured: the message names the path or key and the reason."""


def resolve_model_dir(base_model: str, config_dir: Path | None = None) -> Path:
    """`base_model` -> a local Hugging Face model folder.

    "tiny-random" / "tiny-random-vision" are written on first use; a local folder is used as it is (relative
    paths against `config_dir` first, then the working directory), one in Mistral's native layout through its
    Hugging Face conversion (made once, native.py); anything else is a hub id, looked up in the local Hugging
    Face cache only.
    """
    if base_model in TINY_NAMES:
        return materialize_tiny(base_model)
    path = Path(base_model).expanduser()
    candidates = [path] if path.is_absolute() or config_dir is None else [Path(config_dir) / path, path]
    for candidate in candidates:
        if candidate.is_dir():
            return _as_hf_layout(candidate)
    if path.is_absolute() or base_model.startswith((".", "~")) or base_model.count("/") != 1:
        raise ModelError(f"base_model: {base_model}: model folder not found")
    return _as_hf_layout(_from_hub_cache(base_model))


def _as_hf_layout(path: Path) -> Path:
    if is_native(path):
        target = hf_layout_for(path, default_cache_dir() / "native")
        print(f"note: {path} is in Mistral's native layout; using its Hugging Face conversion in {target}", file=sys.stderr)
        return target
    check_layout(path)
    return path


def check_layout(path: Path) -> None:
    """A Hugging Face model folder has a config.json; a native one must go through resolve_model_dir first."""
    if (path / "config.json").is_file():
        return
    if is_native(path):
        raise ModelError(
            f"{path}: Mistral's native layout (params.json + consolidated.safetensors); give it as base_model or "
            "--model, which convert it once to the Hugging Face layout"
        )
    raise ModelError(f"base_model: {path}: no config.json in this folder; it is not a Hugging Face model folder")


def _from_hub_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as e:
        raise ModelError(
            f"base_model: {repo_id}: not a local folder, and not in the local Hugging Face cache "
            f"({type(e).__name__}); magistune has no hub access and never downloads. Download it first "
            f"(`hf download {repo_id}`) or set base_model to a local model folder"
        ) from None
