"""Multi-GPU training step on Magistral Small shapes with random weights: tok/s and per-GPU peak memory, FSDP2 or DDP.

    torchrun --standalone --nproc-per-node 1 bench/fsdp_step.py --mode full  --layers 8 --out fsdp.jsonl
    torchrun --standalone --nproc-per-node 2 bench/fsdp_step.py --mode full  --layers 8 --out fsdp.jsonl
    torchrun --standalone --nproc-per-node 2 bench/fsdp_step.py --mode qlora --layers 40 --out fsdp.jsonl
    python bench/fsdp_step.py --report fsdp.jsonl          # the markdown table of docs/multi-gpu.md

The model is built and sharded exactly as `magistune train` does it (magistune.train.sharding): full and LoRA
on the meta device, then each rank fills its own shards with random values (nobody holds the whole model); QLoRA
with random_init.random_model on every GPU (NF4 packed in bf16 storage), then sharded. The step is the recipe's:
forward_backward with the all-rank token normaliser through the FSDP root, global gradient clipping, AdamW.
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
    from magistune.model.tiny import magistral_small_config, tiny_text_config

    if args.tiny:
        return tiny_text_config()
    config = magistral_small_config()
    config.num_hidden_layers = args.layers
    return config


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


def main() -> None:
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
    args = p.parse_args()
    if args.report:
        print(report(Path(args.report)))
        return
    if "RANK" not in os.environ:
        p.error("launch with torchrun: torchrun --standalone --nproc-per-node N bench/fsdp_step.py …")

    import torch.distributed as dist

    from magistune.train.batches import Batch
    from magistune.train.distributed import setup
    from magistune.train.loss import forward_backward, loss_fn_for
    from magistune.train.optim import build_optimizer
    from magistune.train.preflight import autocast_for

    cfg = config_for(args)
    par = setup(cfg)
    device = par.device
    t0 = time.perf_counter()
    model, info = par.build_random(model_config(args), cfg)
    build_s = time.perf_counter() - t0
    model.train()
    optimizer = build_optimizer(model, cfg, device)
    loss_fn, autocast = par.wrap_loss(loss_fn_for(cfg)), autocast_for(device, par.dtype)
    params = [q for q in model.parameters() if q.requires_grad]
    vocab = model_config(args).vocab_size
    gen = torch.Generator().manual_seed(1000 + par.rank)  # each rank its own tokens

    def micro_batch() -> Batch:
        ids = torch.randint(1000, vocab, (args.mbs, args.seq), generator=gen)
        return Batch(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids), sources=["random"] * args.mbs)

    def step() -> int:
        result = par.step_total(forward_backward(model, [micro_batch() for _ in range(args.accum)], loss_fn, autocast,
                                                 device, par.normaliser,
                                                 None if args.sync_every_micro else par.grad_sync))
        par.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return result.n_tokens

    for _ in range(args.warmup):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    par.barrier()
    t0 = time.perf_counter()
    tokens = sum(step() for _ in range(args.steps))
    if cuda:
        torch.cuda.synchronize()
    par.barrier()
    seconds = time.perf_counter() - t0
    peaks = [None] * par.world
    dist.all_gather_object(peaks, round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)
    row = {
        "mode": args.mode, "engine": args.engine, "offload": args.offload, "reshard": not args.no_reshard, "sync_every_micro": args.sync_every_micro, "gpus": par.world,
        "layers": model_config(args).num_hidden_layers,
        "seq": args.seq, "mbs": args.mbs, "accum": args.accum, "steps": args.steps,
        "tokens_per_s": round(tokens / seconds, 1), "tokens_per_s_per_gpu": round(tokens / seconds / par.world, 1),
        "step_s": round(seconds / args.steps, 3), "peak_gib_per_gpu": peaks,
        "params": info.total_params, "trainable": info.trainable_params, "build_s": round(build_s, 1),
        "gpu": torch.cuda.get_device_name() if cuda else platform.processor(),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__, "date": time.strftime("%Y-%m-%d"),
    }
    if par.is_main:
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    par.close()


if __name__ == "__main__":
    main()
