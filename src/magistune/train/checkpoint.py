"""Checkpoints: `checkpoint-<step>/` folders that a run resumes from exactly, written atomically.

A checkpoint holds everything the next step depends on:

    checkpoint-120/
      adapter_config.json, adapter_model.safetensors   the LoRA adapter (PEFT format), or
      config.json, model*.safetensors                  the full model (Hugging Face format)
      optimizer.pt      AdamW moments: 2 × 4 bytes per trained parameter (8-bit AdamW: ~2 bytes)
      scheduler.pt      the LambdaLR step counter
      rng_state.json    python, numpy, torch CPU and CUDA generators (LoRA dropout draws from torch's): JSON, no pickle
      trainer_state.json  step, data position (epoch, step of epoch), per-step losses, the logging window
      COMPLETE          written last: the size and SHA-256 of every other file; a folder without it is never
                        resumed from, one whose files do not match it is skipped (auto) or refused (a named one)

Atomicity: everything is written into `.checkpoint-<step>.tmp/`, fsync'ed, marked COMPLETE, and only then
renamed to `checkpoint-<step>/` (rename(2) is atomic on one filesystem). A crash or SIGKILL at any moment
leaves either the old set of checkpoints or the old set plus the new one — never a half-written folder
under a checkpoint name. Rotation (save_total_limit) renames a folder out of the way before deleting it.

This module writes, finds and checks checkpoints; checkpoint_load.py restores one into a one-process run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from magistune.train.rng import capture_rng, restore_rng, rng_from_json, rng_to_json  # noqa: F401 (recipes' names)

PREFIX = "checkpoint-"
MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
DCP_DIR = "dcp"  # a sharded checkpoint's model + optimizer (dist_checkpoint.py)
_NAME = re.compile(r"^checkpoint-(\d+)$")
_STALE = re.compile(r"^\.checkpoint-\d+\.(tmp|old|deleting)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: the message names the folder and the reason."""


class NoSpace(Exception):
    """A save that ran out of disk space: the partial folder is removed, the earlier checkpoints are kept."""


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


# --- RNG ---------------------------------------------------------------------------------------------
# Stored as JSON (integers, and the torch generators' byte states in base64), never pickled: loading a
# checkpoint must not be able to run code. Checkpoints of older versions held a pickled rng_state.pt; they
# are refused with a message rather than unpickled.
RNG_FILE = "rng_state.json"
LEGACY_RNG_FILE = "rng_state.pt"


def save_rng(path: Path, state: dict) -> None:
    path.write_text(json.dumps(rng_to_json(state)), encoding="utf-8")


def load_rng(path: Path) -> dict:
    """The RNG state saved at `path` (a .json file); a legacy pickled rng_state.pt is refused, never loaded."""
    legacy = path.with_name(LEGACY_RNG_FILE) if path.name == RNG_FILE else path.with_suffix(".pt")
    if not path.is_file() and legacy.is_file():
        raise CheckpointError(
            f"{legacy}: a pickled RNG state written by an older magistune; loading pickle can run code hidden in the "
            "file, so it is not loaded. Continue from this checkpoint's weights in a new output_dir instead "
            "(lora_model_dir: for an adapter, base_model: for a full model), or resume a checkpoint of this version")
    try:
        return rng_from_json(json.loads(path.read_text(encoding="utf-8")))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the RNG state ({e.strerror or e})") from None
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: not a valid RNG state ({type(e).__name__}: {e})") from None


# --- finding checkpoints -----------------------------------------------------------------------------

def step_of(path: Path) -> int:
    m = _NAME.match(path.name)
    if not m:
        raise CheckpointError(f"{path}: not a checkpoint folder (expected a name like checkpoint-120)")
    return int(m.group(1))


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file()


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints of `out_dir`, oldest step first."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if _NAME.match(p.name) and is_complete(p)]
    return sorted(found, key=step_of)


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):  # streaming: a 47 GB shard needs 1 MB of memory
            h.update(chunk)
    return h.hexdigest()


def manifest(root: Path) -> dict:
    """Every file under `root` but the marker: {relative path: {"size": bytes, "sha256": hex}}."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MARKER)
    return {str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}


def damage(path: Path) -> str | None:
    """Why checkpoint `path` cannot be trusted (incomplete, a file missing, truncated or changed), or None."""
    marker = path / MARKER
    if not marker.is_file():
        return f"incomplete (no {MARKER} marker: the save was interrupted)"
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{marker}: unreadable marker ({type(e).__name__})"
    if not isinstance(files, dict):
        return None  # an older marker without sizes and checksums: nothing to compare
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{f}: missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{f}: {size} bytes, {want['size']} when it was saved (truncated or replaced)"
        if _sha256(f) != want["sha256"]:
            return f"{f}: its SHA-256 differs from the one recorded when it was saved (the file is damaged)"
    return None


def resolve_resume(cfg, verify: bool = True) -> tuple[Path | None, str | None]:
    """The checkpoint `resume_from_checkpoint` names, and a note. Raises CheckpointError if it cannot be used.

    "auto": the newest intact checkpoint of output_dir (damaged newer ones are skipped, and the note says why),
    or None (start fresh, with a note) when there is none at all.
    A path: relative to the config's folder, else to output_dir; it must be a complete, intact checkpoint.
    `verify`: compare every file with the marker's sizes and checksums (reads the whole checkpoint).
    """
    value = cfg.resume_from_checkpoint
    if value is None:
        return None, None
    if value == "auto":
        found = list_checkpoints(cfg.out_dir.resolve())
        if not found:
            return None, f"resume_from_checkpoint: auto: no complete checkpoint in {cfg.out_dir}; starting fresh"
        skipped = []
        for path in reversed(found):
            why = damage(path) if verify else None
            if why is None:
                return path, "".join(f"skipped {s}\n" for s in skipped) + f"resuming from {path}"
            skipped.append(f"{path.name}: {why}")
        raise CheckpointError(f"resume_from_checkpoint: auto: no intact checkpoint in {cfg.out_dir}:\n  " +
                              "\n  ".join(skipped))
    path = cfg.resolve(value)
    if not path.exists() and (cfg.out_dir / value).exists():
        path = cfg.out_dir / value
    if not path.is_dir():
        raise CheckpointError(f"resume_from_checkpoint: {path}: no such checkpoint folder")
    if not is_complete(path):
        raise CheckpointError(f"resume_from_checkpoint: {path}: incomplete checkpoint (no {MARKER} marker: the save "
                              "was interrupted); pick an earlier one or use resume_from_checkpoint: auto")
    why = damage(path) if verify else None
    if why is not None:
        raise CheckpointError(f"resume_from_checkpoint: {path} is damaged: {why}; pick an earlier checkpoint or "
                              "use resume_from_checkpoint: auto (the newest intact one)")
    return path, f"resuming from {path}"


# --- the same run? -----------------------------------------------------------------------------------
# The keys that change what a step trains on or how many steps there are: a checkpoint resumed under other
# values would continue another run (other data, another model or adapter, another schedule length).
RUN_KEYS = ("base_model", "tokenizer_path", "datasets", "sequence_len", "excess_length_strategy", "val_set_size",
            "system_prompt", "system_prompt_file", "sample_packing", "adapter", "load_in_4bit", "load_in_8bit",
            "lora_model_dir", "lora_r", "lora_alpha", "lora_target_modules", "lora_target_linear", "peft_use_dora",
            "peft_use_rslora", "unfrozen_parameters", "train_vision_tower", "train_projector", "micro_batch_size",
            "gradient_accumulation_steps", "num_epochs", "max_steps", "seed", "rl", "added_tokens_overrides", "tokens")


def run_config(resolved: dict) -> dict:
    """The RUN_KEYS of a resolved config (preflight.resolved_config: paths absolute), as JSON values."""
    return json.loads(json.dumps({k: resolved.get(k) for k in RUN_KEYS}))


def check_same_run(path: Path, state: dict, now: dict, total: int, ignore_changes: bool) -> list[str]:
    """Refuse to resume checkpoint `path` (its trainer `state`) into a run whose RUN_KEYS differ, unless
    `ignore_changes`; then the notes name the changes. A checkpoint past the end of the schedule is refused."""
    if state.get("step", 0) > total:
        raise CheckpointError(f"{path} is at step {state['step']}, past the {total} steps of this config's schedule "
                              "(another run's checkpoint, or max_steps / num_epochs lowered); choose another "
                              "output_dir, or overwrite_output_dir: true without resume_from_checkpoint")
    saved = state.get("run_config") or {}
    changed = [f"{k}: {json.dumps(saved[k])} → {json.dumps(now.get(k))}" for k in RUN_KEYS
               if k in saved and saved[k] != now.get(k)]
    if not changed:
        return []
    if not ignore_changes:
        raise CheckpointError(f"{path} was saved by a run with other settings:\n  " + "\n  ".join(changed) +
                              "\nresuming would continue that run with this one's data/model/schedule. Restore "
                              "those keys, choose another output_dir, or set resume_ignore_config_changes: true "
                              "to resume anyway")
    return [f"resume_ignore_config_changes: resuming {path.name} although {c}" for c in changed]


# --- saving ------------------------------------------------------------------------------------------

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            _fsync(Path(dirpath) / f)
        _fsync(Path(dirpath))


def remove_stale(out_dir: Path) -> None:
    """Leftovers of interrupted saves and rotations (dot-folders, never resumed from)."""
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            if _STALE.match(p.name):
                shutil.rmtree(p, ignore_errors=True)


def start(out_dir: Path, step: int) -> Path:
    """The temporary folder `.checkpoint-<step>.tmp/` that a save writes into (leftovers of older saves removed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale(out_dir)
    tmp = out_dir / f".{PREFIX}{step}.tmp"
    tmp.mkdir()
    return tmp


def commit(out_dir: Path, step: int, tmp: Path, keep: int | None = None) -> Path:
    """Make the written `tmp` folder `checkpoint-<step>/`: fsync, COMPLETE, rename (replacing a checkpoint of the
    same step), then keep only the newest `keep` complete checkpoints. One-process and sharded saves both end here."""
    final = out_dir / f"{PREFIX}{step}"
    _fsync_tree(tmp)
    marker = {"step": step, "files": manifest(tmp)}  # sizes and SHA-256s: a damaged file is found on resume
    (tmp / MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
    _fsync(tmp / MARKER)
    _fsync(tmp)
    old = None
    if final.exists():  # the same step saved again (e.g. the end of a run resumed from its last checkpoint)
        old = out_dir / f".{PREFIX}{step}.old"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep is not None:
        rotate(out_dir, keep)
    return final


def save_checkpoint(out_dir: Path, step: int, save_weights: Callable[[Path], None],
                    optimizer: torch.optim.Optimizer, scheduler, trainer_state: dict, rng_state: dict,
                    keep: int | None = None) -> Path:
    """Write `checkpoint-<step>/` atomically, then keep only the newest `keep` complete checkpoints.
    Out of disk space: NoSpace, after removing the partial folder (the earlier checkpoints stay)."""
    tmp = start(out_dir, step)
    try:
        save_weights(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        save_rng(tmp / RNG_FILE, rng_state)
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
        return commit(out_dir, step, tmp, keep)
    except OSError as e:
        if not is_no_space(e):
            raise  # a crash mid-save: the .tmp folder stays until the next save clears it
        raise no_space(out_dir, step, tmp) from None


# --- disk space --------------------------------------------------------------------------------------

def is_no_space(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when a library wrapped the OSError (its __cause__ or __context__)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
            return True
        e = e.__cause__ or e.__context__
    return False


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def no_space(out_dir: Path, step: int, tmp: Path) -> NoSpace:
    """The error of a save that filled the disk; removes the partial `tmp` folder first."""
    written = folder_size(tmp) if tmp.exists() else 0
    shutil.rmtree(tmp, ignore_errors=True)
    last = latest_checkpoint(out_dir)
    need = max(written, folder_size(last) if last else 0)
    free = shutil.disk_usage(out_dir).free
    return NoSpace(f"no space left on {out_dir}: {'' if last else 'at least '}{_gb(need)} needed for "
                   f"checkpoint-{step}, {_gb(free)} free. The partial save was removed; the earlier checkpoints are "
                   f"kept (newest: {last.name if last else 'none'}). Free some space (save_total_limit keeps fewer "
                   "checkpoints) or move output_dir to a larger disk, then resume_from_checkpoint: auto")


def space_warning(out_dir: Path) -> str | None:
    """A warning when the disk of `out_dir` has less free space than the last checkpoint took (the next save
    is as large, and the old ones are rotated out only after it is complete)."""
    last = latest_checkpoint(out_dir)
    if last is None:
        return None
    need, free = folder_size(last), shutil.disk_usage(out_dir).free
    if free >= need:
        return None
    return (f"warning: {_gb(free)} free on {out_dir}, the last checkpoint ({last.name}) took {_gb(need)}: the next "
            "save will probably not fit. Free some space now (save_total_limit keeps fewer checkpoints)")


def rotate(out_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints; returns the deleted ones."""
    found = list_checkpoints(out_dir)
    doomed = found[:-keep] if keep > 0 else found
    for p in doomed:
        gone = out_dir / f".{p.name}.deleting"
        os.rename(p, gone)  # atomically not a checkpoint any more, then deleted at leisure
        shutil.rmtree(gone, ignore_errors=True)
    return doomed


# --- the trainer state (checkpoint_load.py restores the rest) -------------------------------------------

def read_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable ({type(e).__name__}: {e})") from None
