"""Checks on the folders a command writes to, shared by every command (base layer: config only).

`check_writable_dir` fails in the first second, with the config key, where writing later would end in a
traceback after minutes of work: a path that is (or runs through) a file, a read-only folder, a missing mount.
"""

from __future__ import annotations

import os
from pathlib import Path

from magistune.config import ConfigError


def check_writable_dir(path: Path, key: str) -> None:
    """Create `path` (and its parents) if needed and prove a file can be written in it; else a ConfigError
    that names `key`, the path and the reason."""
    for folder in (path, *path.parents):  # the nearest part that exists must be a folder
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"{key}: {folder} is a file, not a folder" +
                                  (f" (needed for {path})" if folder != path else ""))
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{key}: {path} is not writable ({e.strerror or e})") from None
