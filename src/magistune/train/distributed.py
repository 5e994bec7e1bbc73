"""Multi-GPU training: one process per GPU, launched by torchrun, sharded by PyTorch's FSDP2 (or replicated by DDP).

    magistune train config.yaml --nproc 2          # = torchrun --standalone --nproc-per-node 2 -m magistune train config.yaml
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m magistune train config.yaml

The recipe asks a `Parallel` object for everything that differs between one process and many; `Single` is the
one-process run (every method a no-op or the plain call), `Distributed` the torchrun run. docs/multi-gpu.md has
the user's side; this docstring the arithmetic. How the model is sharded, replicated and loaded on the ranks:
sharding.py; how the ranks check that they read the same config and data: rank_agreement.py.

Loss normalisation across ranks. One step's loss is Σ token losses / T, T = the trained tokens of the step on
ALL ranks. Each rank counts its own tokens t_r, all-reduces T = Σ t_r before any backward, and backpropagates
loss_sum_r × N / T; FSDP2 and DDP average gradients over the N ranks (÷ N), so the result is
Σ_r ∇ loss_sum_r / T: exactly the one-process gradient of the same global batch (tests/distributed).

Data. StepStream(shard=(rank, world)) gives rank r the items r, r+N, r+2N … of each epoch's shuffled order
(packing.shard_for_rank): disjoint, equally many on every rank (the ≤ N-1 left over sit out that epoch, a different
few each epoch). Eval batches go round-robin; a rank with one fewer runs a filler batch with no trained token, because
every rank must run the same number of forwards.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from magistune.config import Config, ConfigError
from magistune.data.sample import IGNORE_INDEX
from magistune.train.rank_agreement import describe_disagreement, sample_digest


class DistributedError(ConfigError):
    """A config that cannot run on several processes, or ranks that disagree: the message says what differs."""


def torchrun_env() -> dict | None:
    """RANK, WORLD_SIZE, LOCAL_RANK as torchrun sets them, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return {"rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"]),
            "local_rank": int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))}


# What `say` prints on which rank: rank 0 says everything, the others only errors (prefixed with their rank).
_RANK: tuple[int, int] = (0, 1)


def speaks(msg: str) -> str | None:
    rank, world = _RANK
    if rank == 0:
        return msg
    return f"[rank {rank}] {msg}" if msg.lstrip().startswith("error") else None


# --- the one-process run -------------------------------------------------------------------------------------

class Single:
    """One process: what the recipe did before multi-GPU, unchanged."""

    mode = "single"
    rank, world, is_main, distributed = 0, 1, True, False
    device: torch.device | None = None  # preflight picks it
    notes: list[str] = []
    normaliser = None
    grad_sync = None

    def run_main_first(self, fn: Callable):
        return fn()

    def agree(self, cfg: Config, model_dir: Path, data) -> None:
        pass

    def model_source(self, cfg: Config, resume: Path | None) -> Config:
        from magistune.train import checkpoint as ckpt
        from magistune.train.dist_checkpoint import check_not_sharded

        if resume is not None:
            check_not_sharded(resume)
        return ckpt.full_model_source(cfg, resume)

    def build_model(self, cfg: Config, device: torch.device, tokenizer):
        from magistune.model import build_model

        model, info, _ = build_model(cfg, device, tokenizer=tokenizer)
        return model, info

    def wrap_loss(self, loss_fn):
        return loss_fn

    def step_total(self, result):
        return result

    def clip_grad_norm_(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def eval_share(self, batches: Iterable) -> Iterable:
        return batches

    def any_rank(self, flag: bool) -> bool:
        return flag

    def save_checkpoint(self, out: Path, step: int, model, optimizer, scheduler, trainer_state: dict, rng: dict,
                        cfg: Config, tokenizer_file: Path) -> Path:
        from magistune.model import save_trained
        from magistune.train import checkpoint as ckpt

        return ckpt.save_checkpoint(out, step, lambda d: save_trained(model, d, cfg, tokenizer_file),
                                    optimizer, scheduler, trainer_state, rng, cfg.save_total_limit)

    def load_checkpoint(self, path: Path, model, optimizer, scheduler) -> dict:
        from magistune.train import checkpoint as ckpt

        return ckpt.load_checkpoint(path, model, optimizer, scheduler)

    def save_trained(self, model, out: Path, cfg: Config, tokenizer_file: Path) -> None:
        from magistune.model import save_trained

        save_trained(model, out, cfg, tokenizer_file)

    def close(self) -> None:
        pass


# --- torchrun ------------------------------------------------------------------------------------------------

class Distributed:
    """One of N processes started by torchrun: rank `rank`, on GPU `local_rank` (or the CPU, with gloo)."""

    distributed = True

    def __init__(self, cfg: Config, mode: str, env: dict, notes: list[str]):
        self.mode, self.cfg, self.notes = mode, cfg, notes
        self.rank, self.world, self.local_rank = env["rank"], env["world"], env["local_rank"]
        self.is_main = self.rank == 0
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.created_group = not dist.is_initialized()
        if self.created_group:
            kwargs = {"device_id": self.device} if self.device.type == "cuda" else {}
            # NCCL for GPU tensors, plus gloo for CPU ones: with fsdp_cpu_offload the gradient shards live on the
            # CPU, and the global gradient norm is a collective over them
            backends = "cuda:nccl,cpu:gloo" if self.backend == "nccl" else "gloo"
            dist.init_process_group(backends, timeout=timedelta(seconds=cfg.ddp_timeout), **kwargs)
        if dist.get_world_size() != self.world or dist.get_rank() != self.rank:
            raise DistributedError(f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
                                   f"torchrun said {self.rank} of {self.world}")
        self.comm_device = self.device if self.backend == "nccl" else torch.device("cpu")
        self.mesh = None
        if mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(self.device.type, (self.world,))
        self.root: nn.Module | None = None  # the FSDP / DDP root: sharding.py builds it
        self.dtype = torch.float32
        global _RANK
        _RANK = (self.rank, self.world)

    # --- small collectives ---
    def _sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _gather_objects(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    # --- before the model ---
    def run_main_first(self, fn: Callable):
        """fn() on rank 0 (e.g. tokenising into the shared cache), then on the others (reading the cache).
        An error on rank 0 becomes an error on every rank, so that none waits for the others forever."""
        if self.is_main:
            error = None
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 (re-raised below, after telling the others)
                error = e
            self.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
            if error is not None:
                raise error
            return result
        failed = self.broadcast_object(None)
        if failed is not None:
            raise DistributedError(f"rank 0 failed to prepare the data ({failed.splitlines()[0]})")
        return fn()

    def agree(self, cfg: Config, model_dir: Path, data) -> None:
        """all_gather each rank's resolved config and data digests; any difference is an error naming it."""
        from magistune.train.preflight import resolved_config

        mine = {"config": resolved_config(cfg, model_dir),
                "data": {"train": [len(data.train), sample_digest(data.train)],
                         "eval": [len(data.eval), sample_digest(data.eval)]}}
        problem = describe_disagreement(self._gather_objects(mine))
        if problem:
            raise DistributedError(problem)

    def model_source(self, cfg: Config, resume: Path | None) -> Config:
        """Every rank builds from the base model; a sharded checkpoint then overwrites what was trained."""
        if resume is not None:
            from magistune.train.dist_checkpoint import check_resumable

            check_resumable(resume, self.world, self.mode)
        return cfg

    # --- the model (sharding.py) ---
    def build_model(self, cfg: Config, device: torch.device, tokenizer):
        """The model of `cfg`, sharded (FSDP2) or replicated (DDP) over the ranks; returns (model, info)."""
        from magistune.train.sharding import build_parallel_model

        return build_parallel_model(self, cfg, tokenizer)

    def build_random(self, config, cfg: Config):
        """Benchmarks: the model `config` describes with random weights, sharded or replicated like build_model."""
        from magistune.train.sharding import build_random_model

        return build_random_model(self, config, cfg)

    # --- the step ---
    def wrap_loss(self, loss_fn):
        """The loss through the root module, so that FSDP's and DDP's hooks run."""
        root = self.root
        getattr(root, "module", root).loss_fn = loss_fn  # DDP holds the LossModule as .module
        return lambda model, batch: root(batch)

    def grad_sync(self, last: bool):
        """Around each micro-batch's backward. Adapters: gradients are reduced over the ranks only after the last
        micro-batch of the step (one reduce-scatter / all-reduce instead of one per micro-batch; unsharded LoRA
        gradients are small). Full fine-tuning keeps reducing every micro-batch: holding the unsharded gradients
        of a 24B model would cost what FSDP saves."""
        if last or self.cfg.adapter is None:
            return contextlib.nullcontext()
        if self.mode == "ddp":
            return self.root.no_sync()
        from magistune.train.sharding import fsdp_sync_off

        return fsdp_sync_off(self.root)

    def normaliser(self, n_trained: int) -> float:
        """The divisor of each rank's loss sum: all ranks' trained tokens / N (see the module docstring)."""
        return self._sum([float(n_trained)])[0] / self.world

    def step_total(self, result):
        """The step's loss over all ranks: Σ loss sums, Σ trained tokens, Σ tokens."""
        loss_sum, n_trained, n_tokens = self._sum([result.loss_sum, float(result.n_trained), float(result.n_tokens)])
        return replace(result, loss_sum=loss_sum, n_trained=int(n_trained), n_tokens=int(n_tokens))

    def clip_grad_norm_(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """The global gradient norm (over every rank's shard) and clipping by it."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)

    def eval_share(self, batches: Iterable) -> Iterator:
        """Batch i goes to rank i % N; a rank left one short runs a filler (no trained token) so that every rank
        runs the same number of forwards."""
        mine, seen, last = 0, 0, None
        for i, batch in enumerate(batches):
            seen, last = i + 1, batch
            if i % self.world == self.rank:
                mine += 1
                yield batch
        if last is not None and mine < -(-seen // self.world):
            yield filler(last)

    def any_rank(self, flag: bool) -> bool:
        return self._sum([1.0 if flag else 0.0])[0] > 0

    # --- checkpoints and outputs ---
    def save_checkpoint(self, out: Path, step: int, model, optimizer, scheduler, trainer_state: dict, rng: dict,
                        cfg: Config, tokenizer_file: Path) -> Path:
        from magistune.train.dist_checkpoint import save_sharded

        return save_sharded(self, out, step, model, optimizer, scheduler, trainer_state, rng, cfg, tokenizer_file)

    def load_checkpoint(self, path: Path, model, optimizer, scheduler) -> dict:
        from magistune.train.dist_checkpoint import load_sharded

        return load_sharded(self, path, model, optimizer, scheduler)

    def save_trained(self, model, out: Path, cfg: Config, tokenizer_file: Path) -> None:
        from magistune.train.dist_checkpoint import save_consolidated

        save_consolidated(self, model, out, cfg, tokenizer_file)

    def close(self) -> None:
        global _RANK
        _RANK = (0, 1)
        if self.created_group and dist.is_initialized():
            dist.destroy_process_group()



def filler(batch):
    """A copy of `batch` that trains nothing: every label ignored (its forward and backward still run)."""
    return replace(batch, labels=torch.full_like(batch.labels, IGNORE_INDEX))


Parallel = Single | Distributed


def setup(cfg: Config) -> Single | Distributed:
    """The run's parallelism from the launcher's environment and the config; raises DistributedError."""
    env = torchrun_env()
    notes: list[str] = []
    if env is None:
        if cfg.fsdp or cfg.ddp:
            notes.append(f"{'fsdp' if cfg.fsdp else 'ddp'}: true, but not launched by torchrun: training in this one "
                         "process; use `magistune train CONFIG --nproc N` for N GPUs")
        single = Single()
        single.notes = notes
        return single
    mode = "fsdp" if cfg.fsdp else "ddp" if cfg.ddp else None
    if mode is None:
        if env["world"] == 1:
            return Single()
        mode = "ddp"
        notes.append(f"launched on {env['world']} processes with neither fsdp nor ddp set: DDP (a whole model on every "
                     "GPU, as Axolotl does); set fsdp: true to shard the model instead")
    if cfg.optimizer in ("adamw_bnb_8bit", "paged_adamw_8bit") and mode == "fsdp":
        raise DistributedError(f"optimizer: {cfg.optimizer} with fsdp: bitsandbytes' 8-bit optimizers cannot update "
                               "FSDP's sharded (DTensor) parameters; use optimizer: adamw_torch (its state is sharded "
                               "across the GPUs too), or ddp: true")
    if cfg.fsdp_cpu_offload and not torch.cuda.is_available():
        notes.append("fsdp_cpu_offload: no CUDA device, the shards are on the CPU anyway")
    return Distributed(cfg, mode, env, notes)


def launch_command(config: str, nproc: int, extra: list[str] | None = None) -> list[str]:
    """`magistune train CONFIG --nproc N` → torchrun on this machine with N processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            *(extra or []), "-m", "magistune", "train", config]



class QuietLogger:
    """The metrics logger of ranks other than 0: rank 0 writes metrics.jsonl and TensorBoard; the others keep
    only their error messages."""

    bar = None
    path = None

    def log_train(self, step: int, **values) -> dict:
        return {"step": step, **values}

    def log_eval(self, step: int, eval_loss: float, eval_tokens: int) -> dict:
        return {"step": step, "eval_loss": eval_loss, "eval_tokens": eval_tokens}

    def advance(self, n: int = 1) -> None:
        pass

    def message(self, text: str) -> None:
        text = speaks(text)
        if text is not None:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


__all__ = ["Distributed", "DistributedError", "QuietLogger", "Single", "filler", "launch_command", "setup", "speaks",
           "torchrun_env"]
