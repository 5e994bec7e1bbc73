"""One training configuration on real Magistral Small shapes with random weights: tok/s and peak GPU memory.

    python bench/train_step.py --side magistune --seq 2048 --mbs 2 --accum 4 [--layers 40] [--steps 3]
        [--random-lengths | --packing] [--cce] [--offload] [--attn sdpa|flex_attention|flash_attention_2]

Sides (same random NF4 model from bench/random_model.py, same LoRA r/alpha/dropout/targets, same
8-bit AdamW, bf16 autocast, non-reentrant gradient checkpointing; every token trained):
    magistune      our loop: apply_lora, token-normalised forward_backward, chunked loss on trained positions
    reference      the stock stack Axolotl runs on: PEFT get_peft_model on bnb Linear4bit, HF loss
                   (model(input_ids, labels=...).loss / accum)
    reference-cce  the same with Cut Cross Entropy's linear_cross_entropy on the last hidden states
Options of the magistune side (the issue "Throughput and memory"):
    --random-lengths  samples of random length (seq/16 … seq/2 tokens), one per row, right-padded: what
                      unpacked training of chat data looks like; tok/s counts real tokens only
    --packing         the same kind of samples packed into rows of --seq tokens (first-fit decreasing), with
                      per-sample positions and block-diagonal attention (packing.py); the row records the
                      packing efficiency
    --cce             Cut Cross Entropy for the loss (fails if it cannot run, rather than falling back)
    --offload         activation offloading: the checkpointed layer inputs wait in pinned CPU memory
    --kernels         lora_qkv_kernel + lora_o_kernel + lora_mlp_kernel: the fused LoRA Function (lora_kernels.py)
    --keep-weights    with --kernels: keep each layer's dequantised weights from its recompute to its backward
                      (lora_kernels.KEEP_DEQUANTISED_WEIGHTS; +1.1 GB peak on Magistral Small)
    --fp8             base_fp8: the frozen NF4 base's products in FP8 (e4m3, rowwise scales; model/fp8.py),
                      --fp8-grad e5m2 for dy in e5m2; accuracy: bench/fp8_accuracy.py
One JSON line per run goes to --out (appended). Run each configuration in its own process so that peak
memory is its own: bench/run_gpu.sh does that, then bench/report.py writes the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def magistune_version() -> str:
    """magistune's version, with the commit when the benchmark runs from a git checkout ("0.1.0+1a2b3c4", and
    "-dirty" when the tree differs from it: the device tool copies the working tree over the session's first commit)."""
    import subprocess

    import magistune

    try:
        sha = subprocess.run(["git", "describe", "--always", "--dirty"], check=False, capture_output=True, text=True,
                             timeout=10, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return magistune.__version__ + (f"+{sha}" if sha else "")


def config_for(args) -> "object":
    from magistune.config import parse_config

    raw = {
        "base_model": "bench", "datasets": [{"path": "bench.jsonl"}], "sequence_len": args.seq,
        "adapter": "qlora", "load_in_4bit": True, "lora_r": 32, "lora_alpha": 16, "lora_dropout": args.dropout,
        "lora_target_linear": True, "micro_batch_size": args.mbs, "gradient_accumulation_steps": args.accum,
        "optimizer": "adamw_bnb_8bit", "learning_rate": 2e-4, "bf16": True, "gradient_checkpointing": True,
        "attn_implementation": args.attn, "sample_packing": args.packing, "cut_cross_entropy": args.cce,
        "activation_offloading": args.offload, "liger_rms_norm": args.liger, "liger_glu_activation": args.liger,
        "tiled_mlp": args.tiled_mlp > 0, "tiled_mlp_num_shards": args.tiled_mlp or None, "base_fp8": args.fp8,
        "lora_qkv_kernel": args.kernels, "lora_o_kernel": args.kernels, "lora_mlp_kernel": args.kernels,
    }
    return parse_config(raw)[0]


def model_config(args):
    from magistune.model_files.tiny import tiny_text_config, tiny_vision_config
    from random_model import magistral_small_config, magistral_small_vision_config

    if args.vision:
        if args.tiny:
            return tiny_vision_config()
        config = magistral_small_vision_config()
        config.text_config.num_hidden_layers = args.layers
        return config
    if args.tiny:
        return tiny_text_config()
    config = magistral_small_config()
    config.num_hidden_layers = args.layers
    return config


def vision_batch(args):
    """One image conversation through the real data pipeline: a random args.image_px² image in the user turn,
    an assistant answer that fills the sequence; only the answer is trained (image and prompt masked)."""
    import io

    import numpy as np
    from PIL import Image

    from magistune.data.encode import ConversationEncoder
    from magistune.data.records import RecordOptions
    from magistune.data.sample import Sample
    from magistune.tokenizer import SpecialIds, load_tokenizer, tiny_tokenizer_path
    from magistune.train.batches import collate

    tok = load_tokenizer(tiny_tokenizer_path())  # v13 Tekken with 2509's image settings (patch 14, merge 2)
    buf = io.BytesIO()
    px = np.random.default_rng(0).integers(0, 255, (args.image_px, args.image_px, 3), dtype=np.uint8)
    Image.fromarray(px).save(buf, format="PNG")
    image = Path(tempfile.mkdtemp()) / "img.png"
    image.write_bytes(buf.getvalue())
    enc = ConversationEncoder(tok)
    answer = "word " * args.seq
    record = {"messages": [{"role": "user", "content": [{"type": "image", "path": str(image)},
                                                        {"type": "text", "text": "Describe the image."}]},
                           {"role": "assistant", "content": answer}]}
    from magistune.data.images import ImageOptions
    from magistune.data.records import parse_record

    ids, labels, images = enc.encode(parse_record(record, RecordOptions(supports_images=True, images=ImageOptions())))
    sample = Sample(ids[:args.seq], labels[:args.seq], "bench", images)
    return collate([sample] * args.mbs, SpecialIds.of(tok).pad, tok.instruct_tokenizer.image_encoder)


BATCH_STATS: dict[str, float] = {}


def variable_length_batches(args, vocab: int, n_micro: int, gen: torch.Generator):
    """n_micro micro-batches of random-length samples (uniform in seq/16 … seq/2 tokens, every token but the
    first trained): --packing packs them into rows of args.seq (args.mbs rows per micro-batch), --random-lengths
    pads args.mbs samples per micro-batch. BATCH_STATS gets the packing efficiency or the padding share."""
    from magistune.data.sample import IGNORE_INDEX, Sample
    from magistune.train.batches import collate, collate_packed
    from magistune.train.packing import pack_samples

    def sample(i: int) -> Sample:
        n = int(torch.randint(max(2, args.seq // 16), args.seq // 2 + 1, (1,), generator=gen))
        ids = torch.randint(1000, vocab, (n,), generator=gen).tolist()
        return Sample(ids, [IGNORE_INDEX] + ids[1:], f"random:{i}")

    if not args.packing:
        batches = [collate([sample(i * args.mbs + j) for j in range(args.mbs)], 11) for i in range(n_micro)]
        slots = sum(b.input_ids.numel() for b in batches)
        BATCH_STATS["padding"] = 1 - sum(b.n_tokens for b in batches) / slots
        return batches
    rows_needed, samples = n_micro * args.mbs, []
    while True:  # ~10% more tokens than the rows hold, so that the rows used are full ones
        samples += [sample(len(samples) + k) for k in range(64)]
        packing = pack_samples(samples, args.seq, seed=0)
        if len(packing.packs) > rows_needed * 1.1:
            break
    rows = sorted(packing.packs, key=lambda p: -sum(len(samples[i]) for i in p))[:rows_needed]  # the first-fit rows
    used = sum(len(samples[i]) for p in rows for i in p)
    BATCH_STATS["efficiency"] = used / (rows_needed * args.seq)
    return [collate_packed([[samples[i] for i in p] for p in rows[k * args.mbs:(k + 1) * args.mbs]], 11)
            for k in range(n_micro)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=["magistune", "reference", "reference-cce"], required=True)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--tiny", action="store_true", help="the tiny model on CPU: a smoke test of this script")
    p.add_argument("--vision", action="store_true", help="Magistral Small 2509 (Mistral3) on image conversations")
    p.add_argument("--image-px", type=int, default=1024, help="--vision: the image's side in pixels")
    p.add_argument("--random-lengths", action="store_true", help="random-length samples, padded per micro-batch")
    p.add_argument("--packing", action="store_true", help="random-length samples packed into rows of --seq")
    p.add_argument("--cce", action="store_true", help="Cut Cross Entropy (magistune side)")
    p.add_argument("--offload", action="store_true", help="activation offloading (magistune side)")
    p.add_argument("--attn", default=None, help="attn_implementation: sdpa, flex_attention, flash_attention_2, eager; "
                   "unset: magistune's choice (torch's varlen kernel for packed rows on CUDA, else sdpa)")
    p.add_argument("--dropout", type=float, default=0.05, help="lora_dropout (both sides)")
    p.add_argument("--liger", action="store_true", help="liger_rms_norm + liger_glu_activation (magistune side)")
    p.add_argument("--tiled-mlp", type=int, default=0, help="tiled_mlp with this many shards (magistune side)")
    p.add_argument("--kernels", action="store_true", help="the fused LoRA kernels, Axolotl's three keys (magistune side)")
    p.add_argument("--keep-weights", action="store_true", help="--kernels: dequantised weights kept for backward")
    p.add_argument("--fp8", action="store_true", help="base_fp8: the frozen base's products in FP8 (magistune side)")
    p.add_argument("--fp8-grad", choices=["e4m3", "e5m2"], default="e4m3", help="--fp8: dy's format in backward")
    p.add_argument("--compile", action="store_true", help="experiment: torch.compile each decoder layer")
    p.add_argument("--no-ckpt", type=int, default=0, help="experiment: this many layers run without checkpointing")
    p.add_argument("--profile", default=None, help="write torch.profiler's top CUDA ops of the timed steps here")
    p.add_argument("--memory-profile", default=None, help="write what holds the peak memory of the timed steps "
                   "here (bench/memory_peak.py, from torch's allocator history)")
    p.add_argument("--out", default="bench_train_step.jsonl")
    args = p.parse_args()
    if (args.packing or args.random_lengths or args.cce or args.offload or args.liger or args.tiled_mlp
            or args.kernels or args.fp8) and args.side != "magistune":
        p.error("--packing, --random-lengths, --cce, --offload, --liger, --tiled-mlp, --kernels and --fp8 are options "
                "of --side magistune")
    if args.keep_weights and not args.kernels:
        p.error("--keep-weights is an option of --kernels")
    if args.vision and (args.packing or args.random_lengths):
        p.error("--vision uses one fixed image conversation; it does not combine with --packing/--random-lengths")

    from magistune.model.adapt import apply_lora, enable_checkpointing
    from random_model import random_model
    from magistune.train.batches import Batch
    from magistune.train.loss import cce_unusable, decoder_and_head, forward_backward, loss_fn_for
    from magistune.train.optim import build_optimizer

    device = torch.device("cpu" if args.tiny else "cuda")
    cfg = config_for(args)
    if args.tiny:
        cfg.bf16 = False
    t0 = time.perf_counter()
    model, info = random_model(model_config(args), cfg, device)
    build_s = time.perf_counter() - t0
    vocab = model.config.get_text_config().vocab_size
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None

    if args.side == "magistune":
        from magistune.model.fused import apply_fused_parts

        import magistune.model.fp8 as fp8

        fp8.GRAD_DTYPE = fp8.E5M2 if args.fp8_grad == "e5m2" else fp8.E4M3
        for note in apply_fused_parts(model, cfg, device) + fp8.apply_base_fp8(model, cfg, device):
            print("note:", note)
        model = apply_lora(model, cfg)
        enable_checkpointing(model)
        from magistune.model import lora_kernels
        from magistune.model.fused import apply_lora_kernels

        lora_kernels.KEEP_DEQUANTISED_WEIGHTS = args.keep_weights
        for note in apply_lora_kernels(model, cfg):
            print("note:", note)
    else:
        from peft import LoraConfig, get_peft_model

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=32, lora_alpha=16, lora_dropout=args.dropout, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers[:args.no_ckpt]:
        layer.gradient_checkpointing = False
    if args.compile:
        for layer in layers:
            layer.compile()
    optimizer = build_optimizer(model, cfg, device)
    gen = torch.Generator().manual_seed(0)

    fixed = vision_batch(args) if args.vision else None
    loss_fn = loss_fn_for(cfg)
    if args.cce:  # measure CCE or nothing: no silent fallback to the chunked loss
        why = cce_unusable(decoder_and_head(model)[1], torch.zeros(1, 8, device=device))
        if why and not args.tiny:  # --tiny (CPU smoke test) runs the chunked fallback after a note
            raise SystemExit(f"--cce: {why}")
    n_micro = (args.warmup + args.steps) * args.accum
    pool = iter(variable_length_batches(args, vocab, n_micro, gen)) if args.packing or args.random_lengths else None

    def micro_batch() -> Batch:
        if fixed is not None:
            return fixed
        if pool is not None:
            return next(pool)
        ids = torch.randint(1000, vocab, (args.mbs, args.seq), generator=gen)
        return Batch(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids), sources=["random"] * args.mbs)

    def reference_step(micro: list[Batch]) -> None:
        for b in micro:
            b = b.to(device)
            with autocast() if autocast else torch.enable_grad():
                if args.side == "reference":
                    loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
                else:
                    from cut_cross_entropy import linear_cross_entropy

                    base = model.get_base_model()
                    hidden = base.model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
                    loss = linear_cross_entropy(hidden, base.lm_head.weight, b.labels, shift=1)
            (loss / args.accum).backward()

    def step() -> None:
        micro = [micro_batch() for _ in range(args.accum)]
        if args.side == "magistune":
            counted.append(forward_backward(model, micro, loss_fn, autocast or __import__("contextlib").nullcontext,
                                            device).n_tokens)
        else:
            reference_step(micro)
        torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    counted: list[int] = []  # real tokens of each magistune step (padding excluded)
    for _ in range(args.warmup):
        step()
    counted.clear()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    prof = None
    if args.profile:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
        prof.__enter__()
    baseline = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if args.memory_profile:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if args.memory_profile:
        from memory_peak import peak_report

        Path(args.memory_profile).write_text(peak_report(torch.cuda.memory._snapshot(), baseline) + "\n")
        torch.cuda.memory._record_memory_history(enabled=None)
    if prof is not None:
        prof.__exit__(None, None, None)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        Path(args.profile).write_text(f"wall {seconds:.3f}s over {args.steps} steps\n"
                                      + prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=70))
    tokens = args.steps * args.accum * (fixed.n_tokens if fixed is not None else args.mbs * args.seq)
    if counted:
        tokens = sum(counted)
    row = {
        "side": args.side + ("-vision" if args.vision else ""), "image_px": args.image_px if args.vision else None, "seq": args.seq, "mbs": args.mbs, "accum": args.accum, "layers": args.layers,
        "attn": model.config.get_text_config()._attn_implementation, "packing": args.packing, "random_lengths": args.random_lengths or args.packing,
        "packing_efficiency": round(BATCH_STATS["efficiency"], 4) if args.packing else None,
        "padding_share": round(BATCH_STATS["padding"], 4) if args.random_lengths and not args.packing else None,
        "cce": args.cce, "offload": args.offload, "dropout": args.dropout, "liger": args.liger,
        "compile": args.compile, "tiled_mlp": args.tiled_mlp,
        "kernels": args.kernels, "keep_weights": args.keep_weights, "no_ckpt": args.no_ckpt, "profiled": bool(args.profile),
        "fp8": args.fp8_grad if args.fp8 else None,
        "steps": args.steps, "tokens_per_s": round(tokens / seconds, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "weights_gib": round(info.weight_bytes / 2**30, 2), "build_s": round(build_s, 1),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__, "bitsandbytes": __import__("bitsandbytes").__version__,
        "magistune": magistune_version(), "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
