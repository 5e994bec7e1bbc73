"""One of torchrun's N processes: its rank, its device, and the collectives the multi-GPU recipe calls.

    magistune train config.yaml --nproc 2          # = torchrun --standalone --nproc-per-node 2 -m magistune train config.yaml
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m magistune train config.yaml

sft_distributed.py is the recipe; this module joins the process group (`join` → `Ranks`) and holds what the
ranks compute together. docs/multi-gpu.md has the user's side; this docstring the arithmetic. How the model is
sharded or replicated: sharding.py; how the ranks check that they read the same config and data:
rank_agreement.py; sharded checkpoints: dist_checkpoint.py.

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

from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from magistune.config import Config, ConfigError
from magistune.data.sample import IGNORE_INDEX
from magistune.train.rank_agreement import describe_disagreement, sample_digest


class DistributedError(ConfigError):
    """A config that cannot run on several processes, or ranks that disagree: the message says what differs."""


@dataclass
class Ranks:
    """This process among torchrun's N: rank `rank` on `device` (GPU `local_rank`, or the CPU with gloo)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    created_group: bool = False  # join() started the process group, so close() ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def nccl(self) -> bool:
        return self.device.type == "cuda"

    @property
    def comm_device(self) -> torch.device:
        """Where tensors for collectives live: the GPU with NCCL, the CPU with gloo."""
        return self.device if self.nccl else torch.device("cpu")

    # --- small collectives ---
    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a stop signal that reached one rank stops them all)."""
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.nccl:
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def close(self) -> None:
        if self.created_group and dist.is_initialized():
            dist.destroy_process_group()


def join(cfg: Config, env: dict) -> Ranks:
    """This process's place in torchrun's group (created here unless the caller already did)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(env["local_rank"])
        device = torch.device("cuda", env["local_rank"])
    else:
        device = torch.device("cpu")
    ranks = Ranks(env["rank"], env["world"], env["local_rank"], device, created_group=not dist.is_initialized())
    if ranks.created_group:
        kwargs = {"device_id": device} if ranks.nccl else {}
        # NCCL for GPU tensors, plus gloo for CPU ones: with fsdp_cpu_offload the gradient shards live on the
        # CPU, and the global gradient norm is a collective over them
        backends = "cuda:nccl,cpu:gloo" if ranks.nccl else "gloo"
        dist.init_process_group(backends, timeout=timedelta(seconds=cfg.ddp_timeout), **kwargs)
    if dist.get_world_size() != ranks.world or dist.get_rank() != ranks.rank:
        raise DistributedError(f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
                               f"torchrun said {ranks.rank} of {ranks.world}")
    return ranks


def mode_notes(cfg: Config, mode: str, world: int) -> list[str]:
    notes = []
    if not cfg.fsdp and not cfg.ddp:
        notes.append(f"launched on {world} processes with neither fsdp nor ddp set: DDP (a whole model on every "
                     "GPU, as Axolotl does); set fsdp: true to shard the model instead")
    if mode == "fsdp" and cfg.fsdp_cpu_offload and not torch.cuda.is_available():
        notes.append("fsdp_cpu_offload: no CUDA device, the shards are on the CPU anyway")
    return notes


# --- before the model -----------------------------------------------------------------------------------------

def run_main_first(ranks: Ranks, fn: Callable):
    """fn() on rank 0 (e.g. tokenising into the shared cache), then on the others (reading the cache).
    An error on rank 0 becomes an error on every rank, so that none waits for the others forever."""
    if ranks.is_main:
        error = None
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 (re-raised below, after telling the others)
            error = e
        ranks.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        return result
    failed = ranks.broadcast_object(None)
    if failed is not None:
        raise DistributedError(f"rank 0 failed to prepare the data ({failed.splitlines()[0]})")
    return fn()


def agree(ranks: Ranks, resolved_config: dict, data) -> None:
    """all_gather each rank's resolved config and data digests; any difference is an error naming it."""
    mine = {"config": resolved_config,
            "data": {"train": [len(data.train), sample_digest(data.train)],
                     "eval": [len(data.eval), sample_digest(data.eval)]}}
    problem = describe_disagreement(ranks.gather_objects(mine))
    if problem:
        raise DistributedError(problem)


# --- the step -------------------------------------------------------------------------------------------------

def token_normaliser(ranks: Ranks) -> Callable[[int], float]:
    """The divisor of each rank's loss sum: all ranks' trained tokens / N (see the module docstring)."""
    return lambda n_trained: ranks.sum([float(n_trained)])[0] / ranks.world


def step_total(ranks: Ranks, result, copies: int = 1):
    """The step's loss over all ranks: Σ loss sums, Σ trained tokens, Σ tokens. `copies`: how many ranks count the
    same tokens (sequence parallelism: the P ranks of a group each count the whole rows, and sum slices' losses)."""
    loss_sum, n_trained, n_tokens = ranks.sum([result.loss_sum, float(result.n_trained), float(result.n_tokens)])
    return replace(result, loss_sum=loss_sum, n_trained=round(n_trained / copies), n_tokens=round(n_tokens / copies))


def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """The global gradient norm (over every rank's shard) and clipping by it."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def eval_share(batches: Iterable, rank: int, world: int) -> Iterator:
    """Batch i goes to rank i % N; a rank left one short runs a filler (no trained token) so that every rank
    runs the same number of forwards."""
    mine, seen, last = 0, 0, None
    for i, batch in enumerate(batches):
        seen, last = i + 1, batch
        if i % world == rank:
            mine += 1
            yield batch
    if last is not None and mine < -(-seen // world):
        yield filler(last)


def filler(batch):
    """A copy of `batch` that trains nothing: every label ignored (its forward and backward still run)."""
    return replace(batch, labels=torch.full_like(batch.labels, IGNORE_INDEX))


__all__ = ["DistributedError", "Ranks", "agree", "clip_grad_norm_", "eval_share", "filler", "join", "mode_notes",
           "run_main_first", "step_total", "token_normaliser"]
