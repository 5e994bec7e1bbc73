"""The model of a multi-GPU run: sharded by FSDP2 or replicated by DDP, loaded without N copies in host RAM.

sft_distributed.py calls build_parallel_model, which returns the plain (PEFT) model and the FSDP / DDP root:
a LossModule built around the model and the loss function, through which every forward runs.

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

Fused modules (tiled MLP, liger, the LoRA kernels: model/fused.py) are swapped in by build_model, so before
fully_shard on every path: they run inside their layer's FSDP unit, on the gathered weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from magistune.config import Config
from magistune.model import build_model, model_info, resolve_dtype
from magistune.model.parts import vision_parts
from magistune.train import checkpoint as ckpt
from magistune.train.distributed import DistributedError, Ranks
from magistune.train.preflight import seed_everything


class LossModule(nn.Module):
    """The FSDP2 / DDP root: forward(batch, ...) = loss_fn(model, batch, ...) (the preference recipe passes what
    its forward should compute: preference_ranks.preference_forward).

    Both engines do their work in module hooks: FSDP2 gathers the root's own parameters (embed_tokens, the final
    norm, lm_head, a frozen vision tower) in its pre-forward hook and DDP prepares its gradient buckets in forward.
    The loss runs the decoder and lm_head separately (loss.py), never model.forward, so the root is this module."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch, **kwargs):
        return self.loss_fn(self.model, batch, **kwargs)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The Mistral decoder layers (each one FSDP unit), found by class."""
    from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

    return [m for m in model.modules() if isinstance(m, MistralDecoderLayer)]


def fsdp_mesh(ranks: Ranks):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(ranks.device.type, (ranks.world,))


def fsdp_kwargs(cfg: Config, mesh, dtype: torch.dtype) -> dict:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    kwargs = {"mesh": mesh, "reshard_after_forward": cfg.fsdp_reshard_after_forward}
    if dtype == torch.bfloat16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cfg.fsdp_cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())  # pinning needs CUDA
    return kwargs


def fsdp_shard(model: nn.Module, loss_fn: Callable, cfg: Config, mesh, dtype: torch.dtype) -> LossModule:
    """fully_shard each decoder layer, then the loss root (everything else: embeddings, norm, lm_head, vision)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = fsdp_kwargs(cfg, mesh, dtype)
    layers = decoder_layers(model)
    if not layers:
        raise DistributedError(f"fsdp: no MistralDecoderLayer in {type(model).__name__}; nothing to shard")
    for layer in layers:
        fully_shard(layer, **kwargs)
    root = LossModule(model, loss_fn)
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


def ddp_wrap(model: nn.Module, loss_fn: Callable, ranks: Ranks, dtype: torch.dtype) -> nn.Module:
    """DistributedDataParallel around the loss root; bf16 gradients are averaged in fp32."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    vision_trained = any(p.requires_grad for part in vision_parts(model).values()
                         for p in model.get_submodule(part).parameters())
    root = DDP(LossModule(model, loss_fn), device_ids=[ranks.local_rank] if ranks.nccl else None,
               find_unused_parameters=vision_trained)
    if dtype == torch.bfloat16:
        root.register_comm_hook(None, _fp32_allreduce_hook)
    return root


@contextlib.contextmanager
def fsdp_sync_off(root: nn.Module):
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def grad_sync(root: nn.Module, mode: str, cfg: Config) -> Callable[[bool], contextlib.AbstractContextManager]:
    """grad_sync(is_last) around each micro-batch's backward. Adapters: gradients are reduced over the ranks only
    after the last micro-batch of the step (one reduce-scatter / all-reduce instead of one per micro-batch;
    unsharded LoRA gradients are small). Full fine-tuning keeps reducing every micro-batch: holding the unsharded
    gradients of a 24B model would cost what FSDP saves."""
    def around(last: bool):
        if last or cfg.adapter is None:
            return contextlib.nullcontext()
        return root.no_sync() if mode == "ddp" else fsdp_sync_off(root)

    return around


def check_trainable(mode: str, model: nn.Module) -> None:
    """FSDP needs every rank to produce a gradient for every trained weight in every step; the vision tower
    runs only on micro-batches with images, so training it (or LoRA on it) cannot be sharded."""
    if mode != "fsdp":
        return
    for part in vision_parts(model).values():
        if any(p.requires_grad for p in model.get_submodule(part).parameters()):
            raise DistributedError(f"fsdp: {part} is trained (train_vision_tower / train_projector / LoRA "
                                   "targets in it), which FSDP cannot shard: a micro-batch without images leaves "
                                   "it without gradients on that rank. Use ddp: true, or train the language model only")


# --- the model of a torchrun run -------------------------------------------------------------------------------

def build_parallel_model(ranks: Ranks, mode: str, cfg: Config, tokenizer, loss_fn: Callable):
    """The model of `cfg`, sharded (FSDP2) or replicated (DDP) over the ranks; returns (model, root, info).

    `model` stays the plain (PEFT) model, whose parameters are now FSDP's DTensors: the optimizer, the
    checkpoints and evaluation's train/eval switch use it; the loss runs through `root` (root(batch))."""
    dtype = resolve_dtype(cfg, ranks.device)
    ckpt.restore_rng(ranks.broadcast_object(ckpt.capture_rng() if ranks.is_main else None))  # same LoRA init
    if mode == "fsdp" and not cfg.load_in_4bit:
        model, root, info = _build_from_rank0(ranks, cfg, tokenizer, loss_fn, dtype)
    else:
        model, info, _ = build_model(cfg, ranks.device, tokenizer=tokenizer)
        check_trainable(mode, model)
        if mode == "fsdp":
            root = fsdp_shard(model, loss_fn, cfg, fsdp_mesh(ranks), dtype)
        else:
            root = ddp_wrap(model, loss_fn, ranks, dtype)
    if ranks.rank:  # dropout masks differ between ranks (rank 0 keeps the one-process stream)
        seed_everything(cfg.seed + 1_000_003 * ranks.rank)
    return model, root, info


def _build_from_rank0(ranks: Ranks, cfg: Config, tokenizer, loss_fn: Callable, dtype: torch.dtype):
    """Rank 0 loads on the CPU; every rank builds on meta, shards, and receives its shard from rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full, buffers, trainable, info = {}, {}, None, None
    if ranks.is_main:  # the CPU copy, only a source of weights: the GPUs' dtype (never runs a forward)
        host_cfg = cfg.model_copy(update={"bf16": dtype == torch.bfloat16, "attn_implementation": "sdpa",
                                          "flash_attention": False})
        real, info, _ = build_model(host_cfg, torch.device("cpu"), tokenizer=tokenizer)
        full = real.state_dict()
        buffers = {n: b for n, b in real.named_buffers() if n not in full}  # non-persistent (rotary inv_freq)
        trainable = [n for n, p in real.named_parameters() if p.requires_grad]
        del real
    trainable, info = ranks.broadcast_object((trainable, info))

    # the same model on the meta device; its notes are the ones of the device that runs it (rank 0's CPU copy
    # keeps the stock modules where liger needs CUDA, and its weights load into the swapped ones by name)
    model, device_info, _ = build_model(cfg, ranks.device, tokenizer=tokenizer, meta=True)
    info = dataclasses.replace(info, notes=device_info.notes) if info is not None else None
    wanted = set(trainable)
    for name, p in model.named_parameters():
        p.requires_grad = name in wanted
    missing = wanted - {n for n, _ in model.named_parameters()}
    if missing:
        raise DistributedError(f"the meta-device model lacks parameters that rank 0 loaded: {sorted(missing)[:3]}")
    check_trainable("fsdp", model)
    root = fsdp_shard(model, loss_fn, cfg, fsdp_mesh(ranks), dtype)
    if not cfg.fsdp_cpu_offload:
        model.to_empty(device=ranks.device)  # this rank's shards, uninitialised; filled from rank 0 below
    # (with offload the shards stay on meta until set_model_state_dict assigns them, on the CPU)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=cfg.fsdp_cpu_offload)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*_get_pg_default_device.*")
        warnings.filterwarnings("ignore", message="Multiple backends are registered.*")
        set_model_state_dict(model, full, options=opts)
    del full
    _broadcast_buffers(ranks, model, buffers)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise DistributedError(f"after loading, tensors are still on the meta device: {left[:3]}")
    return model, root, info if info is not None else model_info(model)


def _broadcast_buffers(ranks: Ranks, model: nn.Module, buffers: dict) -> None:
    """The non-persistent buffers (not in the state dict: rotary inv_freq), from rank 0 to every rank."""
    for name in ranks.broadcast_object(sorted(buffers) if ranks.is_main else None):
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        old = module._buffers[leaf]
        value = buffers[name].to(ranks.comm_device) if ranks.is_main else torch.empty(
            old.shape, dtype=old.dtype, device=ranks.comm_device)
        dist.broadcast(value, src=0)
        module._buffers[leaf] = value.to(ranks.device)


__all__ = ["LossModule", "build_parallel_model", "check_trainable", "ddp_wrap", "decoder_layers", "fsdp_kwargs",
           "fsdp_mesh", "fsdp_shard", "fsdp_sync_off", "grad_sync"]
