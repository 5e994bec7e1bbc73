"""Everything checked and decided before a single weight loads: paths, device, precision, seeds, the config.

A 24B model takes minutes to load; a typo in a dataset path or an unwritable output_dir must fail in the
first second instead, with the key that is wrong.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from magistune.config import Config, ConfigError
from magistune.model import pick_device  # preflight.pick_device: tests replace it to fake a GPU
from magistune.paths import check_writable_dir
from magistune.train.checkpoint import resolve_resume
from magistune.train.memory_estimate import LONG_SEQUENCE
from magistune.train.optim import check_optimizer
from magistune.train.run_dir import RunLock, claim_output_dir, lock_output_dir


@dataclass
class Preflight:
    model_dir: Path
    resume: Path | None
    device: torch.device
    notes: list[str]
    lock: RunLock | None = None  # output_dir's lock, held until release() (or the process ends)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def preflight(cfg: Config, main: bool = True) -> Preflight:
    """Check every path the run needs; raises ConfigError (or a subclass) naming the key.

    `main`: this process owns output_dir (one process, or torchrun's rank 0): it takes the lock, checks for an
    earlier run there and verifies the checkpoint to resume. Other ranks check the rest and skip these."""
    from magistune.data.sources import SourceError, open_source
    from magistune.model.load import check_model_dir, resolve_model_dir

    notes: list[str] = []
    model_dir = resolve_model_dir(cfg.base_model, cfg.config_dir)
    model_config = check_model_dir(model_dir, trust_remote_code=cfg.trust_remote_code)
    check_sequence_len(cfg, model_config.get_text_config(), model_dir)
    for i, ds in enumerate(cfg.datasets):
        try:
            open_source(ds, cfg)
        except SourceError as e:
            raise ConfigError(f"datasets[{i}].path: {e}") from None
    for key in ("tokenizer_path", "system_prompt_file"):
        value = getattr(cfg, key)
        if value is not None and not cfg.resolve(value).is_file():
            raise ConfigError(f"{key}: {cfg.resolve(value)}: file not found")
    if cfg.lora_model_dir is not None:
        if cfg.adapter is None:
            raise ConfigError("lora_model_dir: continues training a saved adapter; set adapter: lora or qlora")
        if not (cfg.resolve(cfg.lora_model_dir) / "adapter_config.json").is_file():
            raise ConfigError(f"lora_model_dir: {cfg.resolve(cfg.lora_model_dir)}: no adapter_config.json")
    check_writable_dir(cfg.out_dir, "output_dir")
    device = pick_device()
    if device.type == "cpu":
        check_padded_batch_fits(cfg, model_config.get_text_config())
    note = check_optimizer(cfg.optimizer, device)
    notes += [note] if note else []
    if cfg.load_in_4bit and device.type == "cpu":
        notes.append("load_in_4bit on the CPU: bitsandbytes' CPU kernels are slow; fine for tiny models and tests")
    if not main:
        resume, note = resolve_resume(cfg, verify=False)
        return Preflight(model_dir, resume, device, notes)
    lock = lock_output_dir(cfg.out_dir)  # last: nothing after it can fail but the checks under it
    try:
        notes += claim_output_dir(cfg)
        resume, note = resolve_resume(cfg)
    except Exception:
        lock.release()
        raise
    notes += note.splitlines() if note else []
    return Preflight(model_dir, resume, device, notes, lock)


def check_sequence_len(cfg: Config, text_config, model_dir: Path) -> None:
    """sequence_len within the positions the model was built for (its config.json, read before any weight)."""
    limit = getattr(text_config, "max_position_embeddings", None)
    if limit is not None and cfg.sequence_len > limit:
        raise ConfigError(f"sequence_len: {cfg.sequence_len} is longer than the model's max_position_embeddings "
                          f"{limit} ({model_dir / 'config.json'}); use at most {limit}")


def available_ram() -> int | None:
    """Bytes of RAM available to a new allocation (MemAvailable of /proc/meminfo), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_padded_batch_fits(cfg: Config, text_config) -> None:
    """On the CPU, pad_to_sequence_len makes every micro-batch sequence_len wide; with attn_implementation: eager
    the attention scores of one layer (micro_batch_size × heads × sequence_len² fp32 values) are materialised and
    must fit in RAM, else the run would die in a huge allocation. The real need is higher: this is a floor.
    sdpa does not materialise them: right-padded rows run causal without a mask through the CPU's flash kernel,
    packed rows attend sample by sample (model/varlen_attention.py)."""
    heads = getattr(text_config, "num_attention_heads", None)
    ram = available_ram()
    if not cfg.pad_to_sequence_len or cfg.attn_implementation != "eager" or heads is None or ram is None:
        return
    seq, mbs = cfg.sequence_len, cfg.micro_batch_size
    need = mbs * heads * seq * seq * 4
    if need > ram:
        raise ConfigError(
            f"sequence_len: {seq} with pad_to_sequence_len: every micro-batch is {seq} tokens wide, and one layer's "
            f"attention scores alone take micro_batch_size {mbs} × {heads} heads × {seq}² × 4 bytes = "
            f"{need / 1e9:.1f} GB, more than the {ram / 1e9:.1f} GB of RAM available. Lower sequence_len or "
            "micro_batch_size, set pad_to_sequence_len: false (batches as wide as their longest sample), or use "
            "attn_implementation: sdpa (no score matrix)")


def seed_everything(seed: int) -> None:
    """Python, numpy and torch (CPU and every CUDA device) from one seed: LoRA init and dropout repeat."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_for(device: torch.device, dtype: torch.dtype) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast where the weights are bf16 (the fp32 LoRA matrices then run in bf16 as well);
    nothing in fp32, the CPU default, so tests are exact."""
    if dtype == torch.bfloat16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


_PATH_KEYS = ("tokenizer_path", "system_prompt_file", "lora_model_dir", "dataset_prepared_path", "output_dir")


def resolved_config(cfg: Config, model_dir: Path) -> dict:
    """The config with every default written out and local paths made absolute (runnable from anywhere)."""
    data = cfg.model_dump(mode="json")
    for key in _PATH_KEYS:
        if data.get(key) is not None:
            data[key] = str(cfg.resolve(data[key]).resolve())
    local = cfg.resolve(cfg.base_model)
    if local is not None and local.is_dir():
        data["base_model"] = str(local.resolve())
    for ds in data["datasets"]:
        path = cfg.resolve(ds["path"])
        if path is not None and path.exists():
            ds["path"] = str(path.resolve())
    return data


def write_resolved_config(cfg: Config, model_dir: Path) -> Path:
    path = cfg.out_dir / "config.yaml"
    header = f"# written by magistune train: every key with its value, paths absolute; model folder: {model_dir}\n"
    path.write_text(header + yaml.safe_dump(resolved_config(cfg, model_dir), sort_keys=False), encoding="utf-8")
    return path


def oom_advice(cfg: Config, longest: int | None) -> str:
    """What to change after a CUDA out-of-memory error, cheapest in quality first."""
    tips = []
    if cfg.micro_batch_size > 1:
        tips.append(f"micro_batch_size: {cfg.micro_batch_size // 2} with gradient_accumulation_steps: "
                    f"{cfg.gradient_accumulation_steps * 2} (the same tokens per step, half the activations)")
    if not cfg.gradient_checkpointing:
        tips.append("gradient_checkpointing: true (recompute activations in backward: ~1/layers of the memory, ~30% slower)")
    if cfg.adapter is None:
        tips.append("adapter: qlora with load_in_4bit: true (4-bit base weights: 24B × 0.5 bytes ≈ 13 GB instead of 47 GB)")
    elif cfg.adapter == "lora":
        tips.append("adapter: qlora with load_in_4bit: true (4-bit base weights instead of bf16)")
    if cfg.optimizer in ("adamw_torch", "adamw_torch_fused"):
        tips.append("optimizer: adamw_bnb_8bit or paged_adamw_8bit (8-bit optimizer state: 2 bytes per trained "
                    "parameter instead of 8)")
    if cfg.rl is None and (longest or cfg.sequence_len) >= LONG_SEQUENCE:  # the activations grow with the row
        degree = cfg.sequence_parallel_degree
        more = (f"a larger sequence_parallel_degree than {degree}" if degree > 1
                else "sequence_parallel_degree: 2 or more (dividing the attention heads)")
        tips.append(f"{more} with `magistune train CONFIG --nproc N`: Ulysses context parallelism splits every row's "
                    "tokens over the GPUs, the way past one GPU's memory for long sequences (docs/multi-gpu.md)")
    seq = f" (the longest sample here has {longest} tokens)" if longest else ""
    tips.append(f"sequence_len: lower than {cfg.sequence_len}{seq}; longer samples are then dropped or truncated "
                "(excess_length_strategy)")
    return "to use less memory, try:\n  - " + "\n  - ".join(tips)
