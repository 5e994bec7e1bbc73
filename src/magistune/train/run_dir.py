"""output_dir belongs to one run: an exclusive lock while it trains, and an earlier run is never overwritten
by accident.

    .magistune.lock   held (flock) by the run training into output_dir; the OS releases it when the process
                      ends, crashes or is killed. It holds the PID and start time, for the message of a second run.
    an earlier run    checkpoints, metrics.jsonl, the resolved config.yaml, a trained adapter or model: a new run
                      is refused unless it continues it (resume_from_checkpoint) or replaces it
                      (overwrite_output_dir: true deletes exactly those files, and says which).
    config.yaml       the resolved config; a config.yaml that magistune did not write (the user's own, e.g. with
                      `output_dir: .`) is never overwritten: the run is refused.

Under torchrun only rank 0 calls these (sft_distributed.py): the other ranks learn the outcome from it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from pathlib import Path

from magistune.config import Config, ConfigError

LOCK_FILE = ".magistune.lock"
CONFIG_FILE = "config.yaml"
CONFIG_HEADER = "# written by magistune train"
# What `magistune train` writes into output_dir (the final outputs of sft.py / save_trained, the logs).
RUN_FILES = ("metrics.jsonl", "loss.png", "tensorboard", "adapter_config.json", "adapter_model.safetensors",
             "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
RUN_GLOBS = ("checkpoint-*", ".checkpoint-*", "model-*-of-*.safetensors")


class RunLock:
    """The open lock file: the lock lasts as long as it is open (or the process lives)."""

    def __init__(self, file):
        self.file = file

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def lock_output_dir(out_dir: Path) -> RunLock:
    """Take output_dir's lock, or a ConfigError naming the run that holds it."""
    file = open(out_dir / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "a process that has not written its PID yet"
        file.close()
        raise ConfigError(f"output_dir: {out_dir} is in use by another magistune run ({holder}); two runs in one "
                          "folder would delete each other's checkpoints. Wait for it to end, stop it, or choose "
                          "another output_dir") from None
    file.seek(0)
    file.truncate()
    file.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    file.flush()
    return RunLock(file)


def is_our_config(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().startswith(CONFIG_HEADER)
    except OSError:
        return False


def earlier_run(out_dir: Path) -> list[Path]:
    """The files and folders of an earlier run in `out_dir`, sorted by name."""
    found = {out_dir / name for name in RUN_FILES if (out_dir / name).exists()}
    found |= {p for pattern in RUN_GLOBS for p in out_dir.glob(pattern)}
    if (out_dir / CONFIG_FILE).is_file() and is_our_config(out_dir / CONFIG_FILE):
        found.add(out_dir / CONFIG_FILE)
    return sorted(found, key=lambda p: p.name)


def _describe(out_dir: Path, files: list[Path]) -> str:
    from magistune.train.checkpoint import latest_checkpoint

    config = out_dir / CONFIG_FILE
    when = (f", config.yaml written {time.strftime('%Y-%m-%d %H:%M', time.localtime(config.stat().st_mtime))}"
            if config in files else "")
    last = latest_checkpoint(out_dir)
    names = ", ".join(p.name for p in files[:6]) + (f" and {len(files) - 6} more" if len(files) > 6 else "")
    return f"{names}{when}; last checkpoint: {last.name if last else 'none'}"


def claim_output_dir(cfg: Config) -> list[str]:
    """Make output_dir this run's, before anything is written there; returns notes. Call with the lock held."""
    out = cfg.out_dir
    config = out / CONFIG_FILE
    if config.is_file() and not is_our_config(config):
        raise ConfigError(f"output_dir: {out} holds a config.yaml that magistune did not write (your own config?); "
                          "the run writes its resolved config.yaml there and would overwrite it. Choose another "
                          "output_dir (e.g. outputs/run1)")
    if cfg.overwrite_output_dir and cfg.resume_from_checkpoint is not None:
        raise ConfigError("overwrite_output_dir: true deletes the earlier run that resume_from_checkpoint: "
                          f"{cfg.resume_from_checkpoint} continues; set one of them")
    files = earlier_run(out)
    if not files or cfg.resume_from_checkpoint is not None:
        return []
    if not cfg.overwrite_output_dir:
        raise ConfigError(
            f"output_dir: {out} holds an earlier run ({_describe(out, files)}). Set resume_from_checkpoint: auto "
            "to continue it, overwrite_output_dir: true to delete it and start again, or choose another output_dir")
    for p in files:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return [f"overwrite_output_dir: deleted the earlier run's {', '.join(p.name for p in files)} from {out}"]
