"""Multi-GPU training step on Magistral Small shapes with random weights: tok/s and per-GPU peak memory, FSDP2 or DDP.

    torchrun --standalone --nproc-per-node 1 bench/fsdp_step.py --mode full  --layers 8 --out fsdp.jsonl
    torchrun --standalone --nproc-per-node 2 bench/fsdp_step.py --mode full  --layers 8 --out fsdp.jsonl
    torchrun --standalone --nproc-per-node 2 bench/fsdp_step.py --mode qlora --layers 40 --out fsdp.jsonl
    python bench/fsdp_step.py --report fsdp.jsonl          # the markdown table of docs/multi-gpu.md

The model is adapted and sharded as `magistune train` does it (model.adapt_model, then magistune.train.sharding's
fsdp_shard / ddp_wrap), from random weights instead of a checkpoint (build_random_model below): full and LoRA on
the meta device, then each rank fills its own shards with random values (nobody holds the whole model); QLoRA with
random_model.random_model on every GPU (NF4 packed in bf16 storage), then sharded. The step is
sft_distributed.py's: forward_backward with the all-rank token normaliser through the FSDP root, global gradient
clipping, AdamW.
Every token is trained; bf16 (FSDP2 MixedPrecisionPolicy: bf16 compute, fp32 gradient reduction); non-reentrant
gradient checkpointing. tok/s counts all GPUs' tokens; peak = torch.cuda.max_memory_allocated on each GPU after
the warm-up steps (allocator peak, not nvidia-smi's reserved memory).

Sizes (--layers 8): embed_tokens + lm_head 2 × 131072 × 5120 = 1.34B, a layer 556M, 8 layers 4.45B: 5.79B
parameters. Full fine-tune bf16 weights + grads + AdamW moments = 8 bytes × 5.79B = 46 GB on 1 GPU, 23 GB each
on 2 (plus activations). --layers 40 (the real model, 23.6B): 189 GB, which needs 2 × H200 (94 GB each).
--tiny: the tiny model on CPU (gloo), a smoke test of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def config_for(args):
    from magistune.config import parse_config

    raw = {"base_model": "bench", "datasets": [{"path": "bench.jsonl"}], "sequence_len": max(args.seq, 16),
           "micro_batch_size": args.mbs, "gradient_accumulation_steps": args.accum, "bf16": not args.tiny,
           "gradient_checkpointing": True, "learning_rate": 1e-5, "fsdp": args.engine == "fsdp",
           "ddp": args.engine == "ddp", "fsdp_cpu_offload": args.offload,
           "fsdp_reshard_after_forward": not args.no_reshard,
           "optimizer": "adamw_torch" if args.tiny or args.offload else "adamw_torch_fused"}
    if args.mode in ("lora", "qlora"):
        raw.update(adapter=args.mode, lora_r=32, lora_alpha=16, lora_dropout=0.05, lora_target_linear=True,
                   learning_rate=2e-4, load_in_4bit=args.mode == "qlora")
        if args.engine == "ddp":
            raw["optimizer"] = "adamw_bnb_8bit"  # what a one-GPU QLoRA run uses; not possible with FSDP
    return parse_config(raw)[0]


def model_config(args):
    from magistune.model_files import tiny_text_config
    from random_model import magistral_small_config  # bench/random_model.py (bench/ is on sys.path)

    if args.tiny:
        return tiny_text_config()
    config = magistral_small_config()
    config.num_hidden_layers = args.layers
    return config


def build_random_model(ranks, mode: str, config, cfg, loss_fn):
    """The model `config` describes with random weights, sharded or replicated as sft_distributed does it;
    returns (model, root, info, dtype).

    FSDP without 4-bit: built on the meta device, sharded, then each rank fills only its own shards
    (normal(0, 0.02), norms 1, LoRA B 0): no rank ever holds the whole model (Magistral Small in bf16 is
    47 GB). QLoRA and DDP: random_model.random_model on every rank's GPU (a 4-bit model quantises layer by
    layer from bf16), then sharded or wrapped."""
    from magistune.model import adapt_model, model_info
    from magistune.model.load import resolve_attn, resolve_dtype
    from magistune.model.parts import model_class
    from random_model import random_model
    from magistune.train.sharding import ddp_wrap, fsdp_mesh, fsdp_shard

    device, dtype = ranks.device, resolve_dtype(cfg, ranks.device)
    if mode == "fsdp" and not cfg.load_in_4bit:
        torch.manual_seed(cfg.seed)
        config._attn_implementation = resolve_attn(cfg, device, training=True)
        with torch.device("meta"):
            model = model_class(config)._from_config(config, dtype=dtype)
        model, _ = adapt_model(model, cfg, device, adapter_weights=False)
        info = model_info(model)
        root = fsdp_shard(model, loss_fn, cfg, fsdp_mesh(ranks), dtype)
        model.to_empty(device=torch.device("cpu") if cfg.fsdp_cpu_offload else device)
        init_random_shards(model, device, seed=cfg.seed + ranks.rank)
        return model, root, info, dtype
    model, _ = random_model(config, cfg, device, seed=cfg.seed)
    model, _ = adapt_model(model, cfg, device)
    info = model_info(model)
    root = fsdp_shard(model, loss_fn, cfg, fsdp_mesh(ranks), dtype) if mode == "fsdp" else ddp_wrap(model, loss_fn, ranks, dtype)
    return model, root, info, dtype


@torch.no_grad()
def init_random_shards(model, device: torch.device, seed: int) -> None:
    """Random values for a model materialised by to_empty: every local shard drawn on its own rank; the
    non-persistent buffers (rotary inv_freq) recomputed by a fresh copy of their module."""
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


def report(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    r0 = rows[0]
    head = (f"{r0['date']}, {r0['gpu']}, torch {r0['torch']}, transformers {r0['transformers']}, peft {r0['peft']}. "
            f"Magistral Small architecture, random weights, seq {r0['seq']}, every token trained, bf16, gradient "
            "checkpointing; tok/s over all GPUs; peak = torch.cuda.max_memory_allocated per GPU.\n\n")
    lines = ["| mode | engine | layers | GPUs | micro-batch × accum per GPU | tok/s (all GPUs) | tok/s per GPU | peak GiB per GPU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        engine = r["engine"] + (" + cpu offload" if r.get("offload") else "") + \
            (", no reshard" if r["engine"] == "fsdp" and r.get("reshard") is False else "") + \
            (", adapter grads reduced every micro-batch" if r.get("sync_every_micro") else "")
        peaks = " / ".join(f"{p:.1f}" for p in r["peak_gib_per_gpu"]) if r["peak_gib_per_gpu"][0] is not None else "–"
        lines.append(f"| {r['mode']} | {engine} | {r['layers']} | {r['gpus']} | {r['mbs']} × {r['accum']} | "
                     f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | {peaks} |")
    return head + "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["full", "lora", "qlora"], default="full")
    p.add_argument("--engine", choices=["fsdp", "ddp"], default="fsdp")
    p.add_argument("--offload", action="store_true", help="fsdp_cpu_offload")
    p.add_argument("--no-reshard", action="store_true", help="fsdp_reshard_after_forward: false")
    p.add_argument("--sync-every-micro", action="store_true",
                   help="reduce adapter gradients after every micro-batch (not only the last): for comparison")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tiny", action="store_true", help="the tiny model on CPU (gloo): a smoke test of this script")
    p.add_argument("--out", default="bench_fsdp_step.jsonl")
    p.add_argument("--report", metavar="JSONL", help="print the markdown table of a results file and exit")
    return p


def main() -> None:
    p = parser()
    args = p.parse_args()
    if args.report:
        print(report(Path(args.report)))
        return
    if "RANK" not in os.environ:
        p.error("launch with torchrun: torchrun --standalone --nproc-per-node N bench/fsdp_step.py …")

    import torch.distributed as dist

    from magistune.train.batches import Batch
    from magistune.train.distributed import clip_grad_norm_, join, step_total, token_normaliser
    from magistune.train.launch import torchrun_env
    from magistune.train.loss import forward_backward, loss_fn_for
    from magistune.train.optim import build_optimizer
    from magistune.train.preflight import autocast_for
    from magistune.train.sharding import grad_sync

    cfg = config_for(args)
    ranks = join(cfg, torchrun_env())
    device = ranks.device
    t0 = time.perf_counter()
    model, root, info, dtype = build_random_model(ranks, args.engine, model_config(args), cfg, loss_fn_for(cfg))
    build_s = time.perf_counter() - t0
    model.train()
    optimizer = build_optimizer(model, cfg, device)
    loss, autocast = (lambda _model, batch: root(batch)), autocast_for(device, dtype)
    normaliser, sync = token_normaliser(ranks), None if args.sync_every_micro else grad_sync(root, args.engine, cfg)
    params = [q for q in model.parameters() if q.requires_grad]
    vocab = model_config(args).vocab_size
    gen = torch.Generator().manual_seed(1000 + ranks.rank)  # each rank its own tokens

    def micro_batch() -> Batch:
        ids = torch.randint(1000, vocab, (args.mbs, args.seq), generator=gen)
        return Batch(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids), sources=["random"] * args.mbs)

    def step() -> int:
        micro = [micro_batch() for _ in range(args.accum)]
        result = step_total(ranks, forward_backward(model, micro, loss, autocast, device, normaliser, sync))
        clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return result.n_tokens

    for _ in range(args.warmup):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ranks.barrier()
    t0 = time.perf_counter()
    tokens = sum(step() for _ in range(args.steps))
    if cuda:
        torch.cuda.synchronize()
    ranks.barrier()
    seconds = time.perf_counter() - t0
    peaks = [None] * ranks.world
    dist.all_gather_object(peaks, round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)
    row = {
        "mode": args.mode, "engine": args.engine, "offload": args.offload, "reshard": not args.no_reshard, "sync_every_micro": args.sync_every_micro, "gpus": ranks.world,
        "layers": model_config(args).num_hidden_layers,
        "seq": args.seq, "mbs": args.mbs, "accum": args.accum, "steps": args.steps,
        "tokens_per_s": round(tokens / seconds, 1), "tokens_per_s_per_gpu": round(tokens / seconds / ranks.world, 1),
        "step_s": round(seconds / args.steps, 3), "peak_gib_per_gpu": peaks,
        "params": info.total_params, "trainable": info.trainable_params, "build_s": round(build_s, 1),
        "gpu": torch.cuda.get_device_name() if cuda else platform.processor(),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__, "date": time.strftime("%Y-%m-%d"),
    }
    if ranks.is_main:
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    ranks.close()


if __name__ == "__main__":
    main()
