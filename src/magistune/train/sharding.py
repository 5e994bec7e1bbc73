"""The model of a multi-GPU run: sharded by FSDP2 or replicated by DDP, loaded without N copies in host RAM.

Distributed.build_model and build_random (distributed.py) call build_parallel_model and build_random_model here,
which leave the FSDP / DDP root in `par.root` and the compute dtype in `par.dtype`.

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
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from magistune.config import Config
from magistune.train.distributed import DistributedError


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
def fsdp_sync_off(root: nn.Module):
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


# --- the model of a torchrun run: Distributed.build_model, Distributed.build_random ------------------------------

def build_parallel_model(par, cfg: Config, tokenizer):
    """The model of `cfg`, sharded (FSDP2) or replicated (DDP) over the ranks; returns (model, info).

    `model` stays the plain (PEFT) model, whose parameters are now FSDP's DTensors: the optimizer, the
    checkpoints and the loss use it; the loss goes through the root (wrap_loss)."""
    from magistune.model.load import resolve_dtype
    from magistune.train import checkpoint as ckpt

    par.dtype = resolve_dtype(cfg, par.device)
    ckpt.restore_rng(par.broadcast_object(ckpt.capture_rng() if par.is_main else None))  # same LoRA init
    if par.mode == "fsdp" and not cfg.load_in_4bit:
        model, info = _build_from_rank0(par, cfg, tokenizer)
    else:
        from magistune.model import build_model

        model, info, _ = build_model(cfg, par.device, tokenizer=tokenizer)
        _check_trainable(par, model)
        if par.mode == "fsdp":
            par.root = fsdp_shard(model, cfg, par.mesh, par.dtype)
        else:
            par.root = _ddp(par, model)
    if par.rank:  # dropout masks differ between ranks (rank 0 keeps the one-process stream)
        from magistune.train.preflight import seed_everything

        seed_everything(cfg.seed + 1_000_003 * par.rank)
    return model, info


def _check_trainable(par, model: nn.Module) -> None:
    """FSDP needs every rank to produce a gradient for every trained weight in every step; the vision tower
    runs only on micro-batches with images, so training it (or LoRA on it) cannot be sharded."""
    if par.mode != "fsdp":
        return
    from magistune.model.parts import vision_parts

    for part in vision_parts(model).values():
        if any(p.requires_grad for p in model.get_submodule(part).parameters()):
            raise DistributedError(f"fsdp: {part} is trained (train_vision_tower / train_projector / LoRA "
                                   "targets in it), which FSDP cannot shard: a micro-batch without images leaves "
                                   "it without gradients on that rank. Use ddp: true, or train the language model only")


def _ddp(par, model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP
    from magistune.model.parts import vision_parts

    vision_trained = any(p.requires_grad for part in vision_parts(model).values()
                         for p in model.get_submodule(part).parameters())
    root = DDP(LossModule(model), device_ids=[par.local_rank] if par.device.type == "cuda" else None,
               find_unused_parameters=vision_trained)
    if par.dtype == torch.bfloat16:
        root.register_comm_hook(None, _fp32_allreduce_hook)
    return root


def _build_from_rank0(par, cfg: Config, tokenizer):
    """Rank 0 loads on the CPU; every rank builds on meta, shards, and receives its shard from rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from magistune.model import build_model, model_info
    from magistune.model.load import check_model_dir, resolve_attn, resolve_model_dir
    from magistune.model.parts import model_class

    attn = resolve_attn(cfg, par.device, training=True)
    full, buffers, trainable, info = {}, {}, None, None
    if par.is_main:  # the CPU copy, only a source of weights: the GPUs' dtype (never runs a forward)
        host_cfg = cfg.model_copy(update={"bf16": par.dtype == torch.bfloat16, "attn_implementation": "sdpa",
                                          "flash_attention": False})
        real, info, _ = build_model(host_cfg, torch.device("cpu"), tokenizer=tokenizer)
        full = real.state_dict()
        buffers = {n: b for n, b in real.named_buffers() if n not in full}  # non-persistent (rotary inv_freq)
        trainable = [n for n, p in real.named_parameters() if p.requires_grad]
        del real
    trainable, info = par.broadcast_object((trainable, info))

    config = check_model_dir(resolve_model_dir(cfg.base_model, cfg.config_dir), cfg.trust_remote_code)
    config._attn_implementation = attn
    with torch.device("meta"):
        model = model_class(config)._from_config(config, dtype=par.dtype)
    model = _adapt_like_build_model(model, cfg, par.device)
    wanted = set(trainable)
    for name, p in model.named_parameters():
        p.requires_grad = name in wanted
    missing = wanted - {n for n, _ in model.named_parameters()}
    if missing:
        raise DistributedError(f"the meta-device model lacks parameters that rank 0 loaded: {sorted(missing)[:3]}")
    _check_trainable(par, model)
    par.root = fsdp_shard(model, cfg, par.mesh, par.dtype)
    if not cfg.fsdp_cpu_offload:
        model.to_empty(device=par.device)  # this rank's shards, uninitialised; filled from rank 0 below
    # (with offload the shards stay on meta until set_model_state_dict assigns them, on the CPU)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=cfg.fsdp_cpu_offload)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*_get_pg_default_device.*")
        warnings.filterwarnings("ignore", message="Multiple backends are registered.*")
        set_model_state_dict(model, full, options=opts)
    del full
    for name in par.broadcast_object(sorted(buffers) if par.is_main else None):
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        old = module._buffers[leaf]
        value = buffers[name].to(par.comm_device) if par.is_main else torch.empty(
            old.shape, dtype=old.dtype, device=par.comm_device)
        dist.broadcast(value, src=0)
        module._buffers[leaf] = value.to(par.device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise DistributedError(f"after loading, tensors are still on the meta device: {left[:3]}")
    return model, info if info is not None else model_info(model)


def build_random_model(par, config, cfg: Config):
    """Benchmarks: the model `config` describes with random weights, sharded or replicated like build_model.

    FSDP without 4-bit: built on the meta device, sharded, then each rank fills only its own shards
    (normal(0, 0.02), norms 1, LoRA B 0): no rank ever holds the whole model (Magistral Small in bf16 is
    47 GB). QLoRA and DDP: random_init.random_model on every rank's GPU (a 4-bit model quantises layer by
    layer from bf16), then sharded or wrapped."""
    from magistune.model import model_info
    from magistune.model.load import resolve_attn, resolve_dtype
    from magistune.model.parts import model_class
    from magistune.model.random_init import random_model

    par.dtype = resolve_dtype(cfg, par.device)
    if par.mode == "fsdp" and not cfg.load_in_4bit:
        torch.manual_seed(cfg.seed)
        config._attn_implementation = resolve_attn(cfg, par.device, training=True)
        with torch.device("meta"):
            model = model_class(config)._from_config(config, dtype=par.dtype)
        model = _adapt_like_build_model(model, cfg, par.device)
        info = model_info(model)
        par.root = fsdp_shard(model, cfg, par.mesh, par.dtype)
        model.to_empty(device=torch.device("cpu") if cfg.fsdp_cpu_offload else par.device)
        init_random_shards(model, par.device, seed=cfg.seed + par.rank)
        return model, info
    model, _ = random_model(config, cfg, par.device, seed=cfg.seed)
    model = _adapt_like_build_model(model, cfg, par.device)
    info = model_info(model)
    par.root = fsdp_shard(model, cfg, par.mesh, par.dtype) if par.mode == "fsdp" else _ddp(par, model)
    return model, info


def _adapt_like_build_model(model: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """What model.build_model does after loading (fused parts, LoRA, checkpointing), here on a weightless model."""
    from peft import LoraConfig, get_peft_model

    from magistune.model import apply_lora, enable_checkpointing
    from magistune.model.fused import apply_fused_parts

    apply_fused_parts(model, cfg, device)  # module swaps only: fine on the meta device; rank 0 reported the notes
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


__all__ = ["LossModule", "build_parallel_model", "build_random_model", "decoder_layers", "fsdp_kwargs",
           "fsdp_shard", "fsdp_sync_off", "init_random_shards"]
