"""Checkpoints of multi-GPU runs: sharded, written by every rank at once (torch.distributed.checkpoint), and
consolidated into what a one-process run writes (a PEFT adapter, or a Hugging Face model folder).

    checkpoint-120/
      dcp/.metadata, dcp/__<rank>_0.distcp   model + optimizer, each rank writing its own shards (DCP)
      dcp/config.json                        full fine-tunes: the model config, for `magistune consolidate`
      adapter_config.json, adapter_model.safetensors   LoRA runs: the adapter, gathered on rank 0 (PEFT format)
      scheduler.pt        the LambdaLR step counter
      rng/rank<r>.json    every rank's RNG (LoRA dropout draws from it), JSON as in checkpoint.py
      trainer_state.json  as in checkpoint.py, plus "parallel": mode, world_size, kind (adapter | full), dtype
      tekken.json, COMPLETE

What dcp/ holds: torch.distributed.checkpoint.state_dict.get_state_dict(model, optimizer). LoRA runs store only the
trained parameters (the frozen base comes from base_model again), full fine-tunes every parameter (frozen ones
too: consolidation then needs nothing else). The AdamW moments are keyed by parameter name and sharded like their
parameters. Magistral Small, full fine-tune: 47 GB of weights + 94 GB of moments in bf16, 71 GB written by each
of 2 ranks, in parallel.

Atomic as in checkpoint.py: everything goes into `.checkpoint-<step>.tmp/`, then rank 0 commits it with
checkpoint.commit (COMPLETE, rename, rotation), as a one-process save does. On several nodes, output_dir must be storage that every node sees (each rank writes its own shards into it).

Resuming needs the same number of processes: the data position counts steps of world × micro_batch_size ×
gradient_accumulation_steps samples. DCP itself could reshard the weights to another world size; the data
position could not, so it is an error that says so.

Consolidation: the final output of a run is gathered from the live model (get_model_state_dict with
full_state_dict: the whole model on rank 0's CPU, one tensor at a time through the GPU) and written as a
one-process run writes it. `magistune consolidate checkpoint-N --output DIR` does the same from the files:
the adapter is copied (it is already in PEFT format), a full model is built on the meta device from
dcp/config.json, materialised on the CPU (the whole model in host RAM: 47 GB for Magistral Small), filled by
dcp.load without a process group, and saved with save_pretrained.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from magistune.hf_tokenizer import copy_tokenizer_files
from magistune.model.adapt import keep_declared_dtype
from magistune.model_files.system_prompt import resolve_system_prompt, write_prompt_file
from magistune.train import checkpoint as ckpt
from magistune.train.checkpoint import DCP_DIR, MARKER, PREFIX, CheckpointError
from magistune.train.checkpoint_load import is_sharded, parallel_info
from magistune.train.distributed import Ranks

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def check_resumable(path: Path, world: int, mode: str) -> None:
    """A sharded checkpoint written by `world` processes; anything else is an error naming the difference."""
    if not is_sharded(path):
        raise CheckpointError(f"{path}: written by one process (no {DCP_DIR}/ folder); a run on {world} processes "
                              "resumes only its own sharded checkpoints. Resume it with one process, or start a new "
                              "output_dir (lora_model_dir continues from an adapter)")
    info = parallel_info(path)
    if info.get("world_size") != world:
        raise CheckpointError(f"{path}: written by {info.get('world_size')} processes, this run has {world}; the data "
                              f"position (samples per step) would not match. Resume with --nproc {info.get('world_size')}, "
                              "or consolidate it and start a new output_dir from it")
    if info.get("mode") != mode:
        raise CheckpointError(f"{path}: written by a {info.get('mode')} run, this one is {mode}; set the same "
                              "fsdp / ddp keys as that run")


def _options(adapter: bool, **kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=adapter, **kwargs)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_sharded(ranks: Ranks, mode: str, dtype: torch.dtype, out: Path, step: int, model, optimizer, scheduler,
                 trainer_state: dict, rng: dict, cfg, tokenizer_file: Path) -> Path:
    """Every rank writes its shards of `checkpoint-<step>/`; rank 0 commits it atomically. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out = Path(out)
    tmp = out / f".{PREFIX}{step}.tmp"
    if ranks.is_main:
        (ckpt.start(out, step) / "rng").mkdir()
    ranks.barrier()
    adapter = cfg.adapter is not None
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(adapter))
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))  # fsyncs its files
        rng_file = tmp / "rng" / f"rank{ranks.rank}.json"
        ckpt.save_rng(rng_file, rng)
        _fsync_file(rng_file)
        error = None
    except Exception as e:  # noqa: BLE001 (every rank must learn of it before the next collective)
        error = e
    _stop_if_any_failed(ranks, error, out, step, tmp)
    if adapter:
        _write_adapter(ranks, model, tmp)  # collective: gathers the adapter on rank 0
    error = None
    if ranks.is_main:
        try:
            if not adapter:
                _base(model).config.save_pretrained(tmp / DCP_DIR)
            copy_tokenizer_files(tokenizer_file, tmp)
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            state = dict(trainer_state, parallel={"mode": mode, "world_size": ranks.world,
                                                  "kind": "adapter" if adapter else "full",
                                                  "dtype": str(dtype).removeprefix("torch.")})
            (tmp / ckpt.STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
            ckpt.commit(out, step, tmp, cfg.save_total_limit)  # every rank's files are written and fsynced
        except Exception as e:  # noqa: BLE001
            error = e
    _stop_if_any_failed(ranks, error, out, step, tmp)  # also: nobody goes on before the checkpoint is in place
    return out / f"{PREFIX}{step}"


def _stop_if_any_failed(ranks: Ranks, error: BaseException | None, out: Path, step: int, tmp: Path) -> None:
    """Collective: if a rank's save failed, every rank raises (NoSpace when a disk was full, after rank 0
    removed the partial folder), so that no rank waits for the others in the next collective."""
    no_space = ranks.any(error is not None and ckpt.is_no_space(error))
    if not ranks.any(error is not None):
        return
    if no_space:
        failure = ckpt.no_space(out, step, tmp) if ranks.is_main else None
        failure = ranks.broadcast_object(str(failure) if failure else None)
        raise ckpt.NoSpace(failure)
    if error is not None:
        raise error
    raise RuntimeError(f"checkpoint-{step}: another rank failed to save its part (see its message)")


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _full_state_dict(model, adapter: bool) -> dict:
    """The whole (trained part of the) model on rank 0's CPU, gathered tensor by tensor; {} on other ranks."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(adapter, full_state_dict=True, cpu_offload=True))


def _write_adapter(ranks: Ranks, model, out: Path) -> None:
    full = _full_state_dict(model, adapter=True)
    if ranks.is_main:
        model.save_pretrained(out, state_dict=full)  # PEFT picks the adapter's tensors and names from it


def save_consolidated(ranks: Ranks, model, out: Path, cfg, tokenizer_file: Path) -> None:
    """The run's final output, as one process writes it: the adapter (PEFT) or the model (HF). Collective."""
    out = Path(out)
    adapter = cfg.adapter is not None
    full = _full_state_dict(model, adapter)
    if ranks.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if adapter:
            model.save_pretrained(out, state_dict=full)
        else:
            model.save_pretrained(out, state_dict=full, safe_serialization=True)
            keep_declared_dtype(out, cfg)  # as model.save_trained does for one process
        copy_tokenizer_files(tokenizer_file, out)
        write_prompt_file(out, resolve_system_prompt(cfg))  # the system prompt the data was encoded with
    del full
    ranks.barrier()


def load_sharded(ranks: Ranks, mode: str, path: Path, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from a sharded checkpoint; the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    if not ckpt.is_complete(path):
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MARKER} marker)")
    check_resumable(path, ranks.world, mode)
    state = ckpt.read_state(path)
    adapter = state["parallel"]["kind"] == "adapter"
    if adapter != hasattr(model, "peft_config"):
        raise CheckpointError(f"{path}: holds {'an adapter' if adapter else 'a full model'} but the config trains "
                              f"{'the full model' if adapter else 'an adapter'}")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(adapter))
    target = {"model": model_sd, "optim": optim_sd}
    dcp.load(target, checkpoint_id=str(path / DCP_DIR))
    # An adapter checkpoint holds the trained parameters only: the frozen base is not "missing"
    result = set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"],
                            options=_options(adapter, strict=not adapter))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = [k for k in result.missing_keys if k in trained]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path}: does not match the model (missing {missing[:3]}, unexpected "
                              f"{list(result.unexpected_keys)[:3]}); lora_target_modules or the model changed?")
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    ckpt.restore_rng(ckpt.load_rng(path / "rng" / f"rank{ranks.rank}.json"))
    return state


def consolidate(checkpoint: Path, output: Path) -> str:
    """`magistune consolidate`: a sharded checkpoint → an adapter folder or a Hugging Face model folder. One
    process, no GPU. Returns what was written, for the message."""
    checkpoint, output = Path(checkpoint), Path(output)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: no such checkpoint folder")
    if not is_sharded(checkpoint):
        raise CheckpointError(f"{checkpoint}: not a sharded checkpoint (no {DCP_DIR}/ folder); a one-process "
                              "checkpoint already holds the adapter or model files")
    if not ckpt.is_complete(checkpoint):
        raise CheckpointError(f"{checkpoint}: incomplete checkpoint (no {MARKER} marker: the save was interrupted)")
    if output.resolve() == checkpoint.resolve():
        raise CheckpointError(f"--output: {output} is the checkpoint itself; choose a new folder")
    info = parallel_info(checkpoint)
    output.mkdir(parents=True, exist_ok=True)
    tokenizers = [p for p in checkpoint.iterdir() if p.is_file() and (p.name.startswith("tekken") or
                                                                       p.name.startswith("tokenizer.model"))]
    for tok in tokenizers:
        shutil.copyfile(tok, output / tok.name)
    if info.get("kind") == "adapter":
        for name in ADAPTER_FILES:
            shutil.copyfile(checkpoint / name, output / name)
        return f"LoRA adapter (PEFT format) of step {ckpt.step_of(checkpoint)}"
    n = _consolidate_full(checkpoint, output, getattr(torch, info.get("dtype", "bfloat16")))
    return f"full model of step {ckpt.step_of(checkpoint)}: {n / 1e6:.1f}M parameters"


def _consolidate_full(checkpoint: Path, output: Path, dtype: torch.dtype) -> int:
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig

    from magistune.model.parts import model_class

    config = AutoConfig.from_pretrained(checkpoint / DCP_DIR)
    cls = model_class(config)
    if cls is None:
        raise CheckpointError(f"{checkpoint / DCP_DIR / 'config.json'}: {type(config).__name__} is not a model magistune trains")
    with torch.device("meta"):
        model = cls._from_config(config, dtype=dtype)
    model.to_empty(device="cpu")  # uninitialised: every saved tensor is overwritten below
    target = model.state_dict()
    dcp.load({"model": target}, checkpoint_id=str(checkpoint / DCP_DIR), no_dist=True)
    model.save_pretrained(output, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())
