"""Multi-GPU training: one process per GPU, launched by torchrun, sharded by PyTorch's FSDP2 (or replicated by DDP).

    magistune train config.yaml --nproc 2          # = torchrun --standalone --nproc-per-node 2 -m magistune train config.yaml
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m magistune train config.yaml

The recipe asks a `Parallel` object for everything that differs between one process and many; `Single` is the
one-process run (every method a no-op or the plain call), `Distributed` the torchrun run. docs/multi-gpu.md has
the user's side; this docstring the arithmetic.

Sharding (`fsdp: true`). torch.distributed.fsdp.fully_shard on every decoder layer, then on a root module that
holds the whole model and computes the loss (`LossModule`: FSDP2's hooks run on module forwards, and the loss
calls the decoder and lm_head separately, so the root must be the loss itself for embed_tokens, the final norm and
lm_head to be gathered). A layer's weights, gradients and AdamW moments live 1/N on each GPU; a layer is
all-gathered for its forward, freed after it (fsdp_reshard_after_forward), gathered again for backward, and its
gradients are reduce-scattered. Magistral Small, full fine-tune, 2 GPUs: 23.6B × (2 bf16 weight + 2 bf16 grad +
4 AdamW moments in bf16) / 2 = 94 GB per GPU, against 189 GB on one.
Mixed precision (bf16 runs): MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the gradients of the N
ranks are summed in fp32, then stored in the parameter's dtype (bf16 weights, fp32 LoRA matrices), as on one GPU.

Loading without N copies in host RAM. Non-quantised models (full fine-tune, LoRA): rank 0 alone loads the
checkpoint on the CPU (from_pretrained: one copy, 47 GB for Magistral Small in bf16), adds LoRA as one process
would; every rank builds the same model on the meta device (no memory), shards it, and
set_model_state_dict(broadcast_from_rank0=True) sends each tensor from rank 0, every rank keeping its 1/N.
Host RAM: 1 copy instead of N; GPU: the shard plus one tensor in flight (at most lm_head: 131072 × 5120 × 2 B =
1.3 GB). QLoRA: the 4-bit quantisation state is not a parameter and cannot be broadcast that way, so each rank
loads the 4-bit model onto its own GPU (from_pretrained streams the safetensors through the shared page cache:
one copy of the file's pages for all ranks) and then shards it: 14.2 GB per GPU while loading, then 14.2 / N +
the quantisation constants. The packed 4-bit weights are stored as bf16 (bnb_4bit_quant_storage) so that FSDP2
can shard and gather them like any bf16 tensor. DDP: each rank loads its own copy; DDP broadcasts rank 0's.

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

import hashlib
import os
import sys
import warnings
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from magistune.config import Config, ConfigError
from magistune.data.sample import IGNORE_INDEX


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


class LossModule(nn.Module):
    """The FSDP2 / DDP root: forward(batch) = loss_fn(model, batch).

    Both engines do their work in module hooks: FSDP2 gathers the root's own parameters (embed_tokens, the final
    norm, lm_head, a frozen vision tower) in its pre-forward hook and DDP prepares its gradient buckets in forward.
    The loss runs the decoder and lm_head separately (loss.py), never model.forward, so the root is this module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.loss_fn: Callable | None = None

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The Mistral decoder layers (each one FSDP unit), found by class."""
    from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

    return [m for m in model.modules() if isinstance(m, MistralDecoderLayer)]


def fsdp_kwargs(cfg: Config, mesh, dtype: torch.dtype) -> dict:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    kwargs = {"mesh": mesh, "reshard_after_forward": cfg.fsdp_reshard_after_forward}
    if dtype == torch.bfloat16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cfg.fsdp_cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())  # pinning needs CUDA
    return kwargs


def fsdp_shard(model: nn.Module, cfg: Config, mesh, dtype: torch.dtype) -> LossModule:
    """fully_shard each decoder layer, then the loss root (everything else: embeddings, norm, lm_head, vision)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = fsdp_kwargs(cfg, mesh, dtype)
    layers = decoder_layers(model)
    if not layers:
        raise DistributedError(f"fsdp: no MistralDecoderLayer in {type(model).__name__}; nothing to shard")
    for layer in layers:
        fully_shard(layer, **kwargs)
    root = LossModule(model)
    fully_shard(root, **kwargs)
    return root


def _fp32_allreduce_hook(process_group, bucket):
    """DDP communication hook for bf16 gradients: averaged in fp32, stored back in bf16 (as FSDP's reduce_dtype)."""
    group = process_group if process_group is not None else dist.group.WORLD
    buf = bucket.buffer()
    wide = buf.float().div_(dist.get_world_size(group))
    fut = dist.all_reduce(wide, group=group, async_op=True).get_future()

    def back(f):
        buf.copy_(f.value()[0])
        return buf

    return fut.then(back)


@contextlib.contextmanager
def _fsdp_sync_off(root: nn.Module):
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def sample_digest(samples) -> str:
    """sha256 over every sample's source, token ids and labels: equal on every rank that read the same data."""
    import numpy as np

    h = hashlib.sha256()
    for s in samples:
        h.update(s.source.encode("utf-8", "surrogatepass") + b"\0")
        h.update(np.asarray(s.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(s.labels, dtype=np.int64).tobytes())
        h.update(len(s.images).to_bytes(4, "little"))
    return h.hexdigest()


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix[:-1]}[{i}]."))
    else:
        out[prefix[:-1]] = d
    return out


def describe_disagreement(prints: list[dict]) -> str | None:
    """What differs between the ranks' fingerprints (config keys, data), or None when they agree."""
    ref = prints[0]
    lines = []
    for rank, fp in enumerate(prints[1:], start=1):
        a, b = _flatten(ref["config"]), _flatten(fp["config"])
        keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
        for k in keys[:8]:
            lines.append(f"config key {k}: rank 0 has {a.get(k, '<unset>')!r}, rank {rank} has {b.get(k, '<unset>')!r}")
        if len(keys) > 8:
            lines.append(f"… and {len(keys) - 8} more config keys differ on rank {rank}")
        for split in ("train", "eval"):
            x, y = ref["data"][split], fp["data"][split]
            if x != y:
                lines.append(f"{split} data: rank 0 has {x[0]} samples (sha256 {x[1][:12]}), rank {rank} has "
                             f"{y[0]} samples (sha256 {y[1][:12]})")
    if not lines:
        return None
    return ("the ranks disagree, so they would not train one model:\n  " + "\n  ".join(lines) +
            "\nEvery rank must read the same config file and the same data (on several nodes: the same files "
            "on every node, or shared storage)")


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
        self.root: nn.Module | None = None
        self.dtype = torch.float32
        global _RANK
        _RANK = (self.rank, self.world)

    # --- small collectives ---
    def _sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def _broadcast_object(self, obj):
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
            self._broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
            if error is not None:
                raise error
            return result
        failed = self._broadcast_object(None)
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

    # --- the model ---
    def build_model(self, cfg: Config, device: torch.device, tokenizer):
        """The model of `cfg`, sharded (FSDP2) or replicated (DDP) over the ranks; returns (model, info).

        `model` stays the plain (PEFT) model, whose parameters are now FSDP's DTensors: the optimizer, the
        checkpoints and the loss use it; the loss goes through the root (wrap_loss)."""
        from magistune.model.load import resolve_dtype
        from magistune.train import checkpoint as ckpt

        self.dtype = resolve_dtype(cfg, self.device)
        ckpt.restore_rng(self._broadcast_object(ckpt.capture_rng() if self.is_main else None))  # same LoRA init
        if self.mode == "fsdp" and not cfg.load_in_4bit:
            model, info = self._build_from_rank0(cfg, tokenizer)
        else:
            from magistune.model import build_model

            model, info, _ = build_model(cfg, self.device, tokenizer=tokenizer)
            self._check_trainable(model)
            if self.mode == "fsdp":
                self.root = fsdp_shard(model, cfg, self.mesh, self.dtype)
            else:
                self.root = self._ddp(model)
        if self.rank:  # dropout masks differ between ranks (rank 0 keeps the one-process stream)
            from magistune.train.preflight import seed_everything

            seed_everything(cfg.seed + 1_000_003 * self.rank)
        return model, info

    def _check_trainable(self, model: nn.Module) -> None:
        """FSDP needs every rank to produce a gradient for every trained weight in every step; the vision tower
        runs only on micro-batches with images, so training it (or LoRA on it) cannot be sharded."""
        if self.mode != "fsdp":
            return
        from magistune.model.parts import vision_parts

        for part in vision_parts(model).values():
            if any(p.requires_grad for p in model.get_submodule(part).parameters()):
                raise DistributedError(f"fsdp: {part} is trained (train_vision_tower / train_projector / LoRA "
                                       "targets in it), which FSDP cannot shard: a micro-batch without images leaves "
                                       "it without gradients on that rank. Use ddp: true, or train the language model only")

    def _ddp(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP
        from magistune.model.parts import vision_parts

        vision_trained = any(p.requires_grad for part in vision_parts(model).values()
                             for p in model.get_submodule(part).parameters())
        root = DDP(LossModule(model), device_ids=[self.local_rank] if self.device.type == "cuda" else None,
                   find_unused_parameters=vision_trained)
        if self.dtype == torch.bfloat16:
            root.register_comm_hook(None, _fp32_allreduce_hook)
        return root

    def _build_from_rank0(self, cfg: Config, tokenizer):
        """Rank 0 loads on the CPU; every rank builds on meta, shards, and receives its shard from rank 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from magistune.model import build_model, model_info
        from magistune.model.load import check_model_dir, resolve_attn, resolve_model_dir
        from magistune.model.parts import model_class

        attn = resolve_attn(cfg, self.device)
        full, buffers, trainable, info = {}, {}, None, None
        if self.is_main:  # the CPU copy, only a source of weights: the GPUs' dtype (never runs a forward)
            host_cfg = cfg.model_copy(update={"bf16": self.dtype == torch.bfloat16, "attn_implementation": "sdpa",
                                              "flash_attention": False})
            real, info, _ = build_model(host_cfg, torch.device("cpu"), tokenizer=tokenizer)
            full = real.state_dict()
            buffers = {n: b for n, b in real.named_buffers() if n not in full}  # non-persistent (rotary inv_freq)
            trainable = [n for n, p in real.named_parameters() if p.requires_grad]
            del real
        trainable, info = self._broadcast_object((trainable, info))

        config = check_model_dir(resolve_model_dir(cfg.base_model, cfg.config_dir), cfg.trust_remote_code)
        config._attn_implementation = attn
        with torch.device("meta"):
            model = model_class(config)._from_config(config, dtype=self.dtype)
        model = self._adapt_like_build_model(model, cfg)
        wanted = set(trainable)
        for name, p in model.named_parameters():
            p.requires_grad = name in wanted
        missing = wanted - {n for n, _ in model.named_parameters()}
        if missing:
            raise DistributedError(f"the meta-device model lacks parameters that rank 0 loaded: {sorted(missing)[:3]}")
        self._check_trainable(model)
        self.root = fsdp_shard(model, cfg, self.mesh, self.dtype)
        if not cfg.fsdp_cpu_offload:
            model.to_empty(device=self.device)  # this rank's shards, uninitialised; filled from rank 0 below
        # (with offload the shards stay on meta until set_model_state_dict assigns them, on the CPU)
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=cfg.fsdp_cpu_offload)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*_get_pg_default_device.*")
            warnings.filterwarnings("ignore", message="Multiple backends are registered.*")
            set_model_state_dict(model, full, options=opts)
        del full
        for name in self._broadcast_object(sorted(buffers) if self.is_main else None):
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            old = module._buffers[leaf]
            value = buffers[name].to(self.comm_device) if self.is_main else torch.empty(
                old.shape, dtype=old.dtype, device=self.comm_device)
            dist.broadcast(value, src=0)
            module._buffers[leaf] = value.to(self.device)
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:
            raise DistributedError(f"after loading, tensors are still on the meta device: {left[:3]}")
        return model, info if info is not None else model_info(model)

    def build_random(self, config, cfg: Config):
        """Benchmarks: the model `config` describes with random weights, sharded or replicated like build_model.

        FSDP without 4-bit: built on the meta device, sharded, then each rank fills only its own shards
        (normal(0, 0.02), norms 1, LoRA B 0): no rank ever holds the whole model (Magistral Small in bf16 is
        47 GB). QLoRA and DDP: random_init.random_model on every rank's GPU (a 4-bit model quantises layer by
        layer from bf16), then sharded or wrapped."""
        from magistune.model import model_info
        from magistune.model.load import resolve_attn, resolve_dtype
        from magistune.model.parts import model_class
        from magistune.model.random_init import random_model

        self.dtype = resolve_dtype(cfg, self.device)
        if self.mode == "fsdp" and not cfg.load_in_4bit:
            torch.manual_seed(cfg.seed)
            config._attn_implementation = resolve_attn(cfg, self.device)
            with torch.device("meta"):
                model = model_class(config)._from_config(config, dtype=self.dtype)
            model = self._adapt_like_build_model(model, cfg)
            info = model_info(model)
            self.root = fsdp_shard(model, cfg, self.mesh, self.dtype)
            model.to_empty(device=torch.device("cpu") if cfg.fsdp_cpu_offload else self.device)
            init_random_shards(model, self.device, seed=cfg.seed + self.rank)
            return model, info
        model, _ = random_model(config, cfg, self.device, seed=cfg.seed)
        model = self._adapt_like_build_model(model, cfg)
        info = model_info(model)
        self.root = fsdp_shard(model, cfg, self.mesh, self.dtype) if self.mode == "fsdp" else self._ddp(model)
        return model, info

    @staticmethod
    def _adapt_like_build_model(model: nn.Module, cfg: Config) -> nn.Module:
        """What model.build_model does after loading (LoRA, checkpointing), here on a weightless model."""
        from peft import LoraConfig, get_peft_model

        from magistune.model import apply_lora, enable_checkpointing

        if cfg.adapter and cfg.lora_model_dir:
            if cfg.gradient_checkpointing:
                enable_checkpointing(model)
            lora = LoraConfig.from_pretrained(str(cfg.resolve(cfg.lora_model_dir)))
            lora.inference_mode = False
            return get_peft_model(model, lora)
        if cfg.adapter:
            return apply_lora(model, cfg)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        return model

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
        return _fsdp_sync_off(self.root)

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


@torch.no_grad()
def init_random_shards(model: nn.Module, device: torch.device, seed: int) -> None:
    """Random values for a model materialised by to_empty (benchmarks): every local shard drawn on its own rank;
    the non-persistent buffers (rotary inv_freq) recomputed by a fresh copy of their module."""
    from torch.distributed.tensor import DTensor

    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        if "norm" in name:
            local.fill_(1.0)
        elif "lora_B" in name:
            local.zero_()
        else:
            local.normal_(0.0, 0.02)
    for module in model.modules():
        transient = [n for n in module._buffers if n in module._non_persistent_buffers_set]
        if transient and hasattr(module, "config"):
            with torch.device("cpu"):
                fresh = type(module)(module.config)
            for n in transient:
                module._buffers[n] = fresh._buffers[n].to(device)


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


__all__ = ["Distributed", "DistributedError", "LossModule", "QuietLogger", "Single", "decoder_layers",
           "describe_disagreement", "filler", "fsdp_shard", "init_random_shards", "launch_command", "sample_digest",
           "setup", "speaks", "torchrun_env"]
