"""base_fp8 against the bf16 path on a real-shape cut of Magistral Small: LoRA gradients, loss curves, product times.

    python bench/fp8_accuracy.py [--layers 4] [--seq 2048] [--steps 50] [--grad-dtypes e4m3,e5m2] [--out fp8_accuracy.json]

One model (bench/random_model.py: NF4 with double quantisation; QLoRA r=32, alpha 16, dropout 0.05 on all 7
projections; non-reentrant checkpointing, 8-bit AdamW at a constant --lr (1e-3), bf16 autocast, the chunked loss) trains
--steps steps from the same LoRA start on the same batches, once per path: "bf16" (bitsandbytes' product) and
"fp8-<grad dtype>" (model/fp8.py with dy in e4m3 or e5m2). The paths differ only in the class of the decoder's
Linear4bit modules (FP8Linear4bit or Linear4bit: same object, same weights); every path starts from the same
seed, so LoRA dropout draws the same masks. The data: --batches fixed rows of random tokens, cycled, so that the
loss falls as the adapters memorise them and the curves have a shape to compare.

JSON (--out, also printed):
    grad_cosine   the first step's LoRA gradients against bf16's: all tensors concatenated, and per tensor min / median
    loss          per step for each path; rel_diff_pct = |fp8 − bf16| / bf16 × 100: max, mean, last; within_0.5pct;
                  loss_drop: first − last loss of each path, and how far fp8's is from bf16's (%)
    matmul        per projection at M = seq × mbs tokens, ms (median of --reps): bf16 x·Wᵀ, fp8_forward (x and W
                  quantised in it), the FP8 product alone (and with use_fast_accum, its relative error), W's
                  quantisation alone, NF4 dequantisation; dy·W and fp8_input_grad likewise; nf4_to_fp8 alone; and
                  one linear's pass from its NF4 weight, bitsandbytes' (dequantise + bf16 product) against
                  base_fp8's (nf4_to_fp8 + FP8 product): base_fp8_over_bnb, forward and input gradient
"bf16-repeat" runs the bf16 path again: its differences are the run-to-run floor (nondeterministic kernels).
A path that cannot run (e.g. e5m2 refused by torch._scaled_mm's rowwise kernel) records its error. The paths'
seconds include the first compilation of the quantisation kernel: for throughput, bench/train_step.py --fp8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def config_for(args):
    from magistune.config import parse_config

    return parse_config({
        "base_model": "bench", "datasets": [{"path": "bench.jsonl"}], "sequence_len": args.seq, "adapter": "qlora",
        "load_in_4bit": True, "lora_r": 32, "lora_alpha": 16, "lora_dropout": 0.05, "lora_target_linear": True,
        "micro_batch_size": args.mbs, "optimizer": "adamw_torch" if args.tiny else "adamw_bnb_8bit",
        "learning_rate": args.lr, "bf16": not args.tiny, "gradient_checkpointing": True,
    })[0]


def set_base_fp8(model: torch.nn.Module, on: bool) -> int:
    """Turn the LoRA-wrapped Linear4bit base layers to FP8Linear4bit (on) or back; returns how many."""
    import bitsandbytes as bnb

    from magistune.model.fp8 import fp8_linear4bit_class

    fp8 = fp8_linear4bit_class()
    n = 0
    for m in model.modules():
        base = getattr(m, "base_layer", None)
        if isinstance(base, bnb.nn.Linear4bit):
            base.__class__ = fp8 if on else bnb.nn.Linear4bit
            n += 1
    return n


def run_path(model, start: dict, cfg, batches, args, device) -> dict:
    """--steps steps from the LoRA weights `start`: losses, the first step's gradients, seconds, peak memory."""
    from magistune.train.loss import forward_backward, loss_fn_for
    from magistune.train.optim import build_optimizer

    model.zero_grad(set_to_none=True)  # a path that failed mid-step leaves gradients behind
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in start:
                p.copy_(start[n])
    torch.manual_seed(args.seed)  # LoRA dropout's masks
    optimizer = build_optimizer(model, cfg, device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None
    import contextlib

    losses, first_grads = [], None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for step in range(args.steps):
        out = forward_backward(model, [batches[step % len(batches)]], loss_fn_for(cfg),
                               autocast or contextlib.nullcontext, device)
        losses.append(out.loss)
        if first_grads is None:
            first_grads = {n: p.grad.float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"losses": losses, "grads": first_grads, "seconds": time.perf_counter() - t0,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def compare(ref: dict, run: dict) -> dict:
    names = list(ref["grads"])
    per = [float(F.cosine_similarity(ref["grads"][n].flatten().double(), run["grads"][n].flatten().double(), dim=0))
           for n in names]
    cat = lambda r: torch.cat([r["grads"][n].flatten().double() for n in names])  # noqa: E731
    rel = [abs(b - a) / abs(a) * 100 for a, b in zip(ref["losses"], run["losses"])]
    drop_ref, drop = ref["losses"][0] - ref["losses"][-1], run["losses"][0] - run["losses"][-1]
    worst = min(range(len(per)), key=per.__getitem__)
    return {
        "grad_cosine": {"all": round(float(F.cosine_similarity(cat(ref), cat(run), dim=0)), 6),
                        "min": round(per[worst], 6), "min_tensor": names[worst], "median": round(statistics.median(per), 6),
                        "norm_ratio": round(float(cat(run).norm() / cat(ref).norm()), 5)},
        "loss_rel_diff_pct": {"max": round(max(rel), 4), "mean": round(statistics.mean(rel), 4), "last": round(rel[-1], 4)},
        "within_0.5pct": max(rel) <= 0.5,
        # the loss's fall over the run (what the training did), fp8's against bf16's: levels near log(vocab) hide it
        "loss_drop": {"bf16": round(drop_ref, 5), "fp8": round(drop, 5),
                      "rel_diff_pct": round(abs(drop - drop_ref) / abs(drop_ref) * 100, 3) if drop_ref else None},
    }


def timed(fn, reps: int, device) -> float:
    """Median milliseconds of fn() over reps calls (after two warm-up calls)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 4)


def matmul_times(model, args, device) -> list[dict]:
    """Per projection of layer 0: where an FP8 product's time goes, against bf16's."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    from magistune.model.fp8 import fp8_forward, fp8_input_grad, nf4_to_fp8, quantise_rows

    rows, m = [], args.seq * args.mbs
    layer = [mod for mod in model.modules() if type(mod).__name__ == "MistralDecoderLayer"][0]
    for name, mod in layer.named_modules():
        if not isinstance(mod, bnb.nn.Linear4bit):
            continue
        q = mod.weight
        w = dequantize_4bit(q, q.quant_state).to(torch.bfloat16)
        n, k = w.shape
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
        x8, sx = quantise_rows(x)
        w8, sw = quantise_rows(w)
        t = {
            "bf16_fwd": timed(lambda: x @ w.t(), args.reps, device),
            "fp8_fwd": timed(lambda: fp8_forward(x, w), args.reps, device),
            "fp8_gemm_only": timed(lambda: torch._scaled_mm(x8, w8.t(), sx, sw.t(), out_dtype=torch.bfloat16),
                                   args.reps, device),
            "fp8_gemm_fast_accum": timed(lambda: torch._scaled_mm(x8, w8.t(), sx, sw.t(), out_dtype=torch.bfloat16,
                                                                  use_fast_accum=True), args.reps, device),
            "quantise_w": timed(lambda: quantise_rows(w), args.reps, device),
            "dequantise_nf4": timed(lambda: dequantize_4bit(q, q.quant_state), args.reps, device),
            "bf16_dgrad": timed(lambda: dy @ w, args.reps, device),
            "fp8_dgrad": timed(lambda: fp8_input_grad(dy, w), args.reps, device),
            # what one linear costs per pass, from the NF4 weight: bitsandbytes' path against base_fp8's
            "nf4_to_fp8_rows": timed(lambda: nf4_to_fp8(q, q.quant_state, "rows"), args.reps, device),
            "nf4_to_fp8_cols": timed(lambda: nf4_to_fp8(q, q.quant_state, "cols"), args.reps, device),
            "bnb_fwd": timed(lambda: x @ dequantize_4bit(q, q.quant_state).to(x.dtype).t(), args.reps, device),
            "base_fp8_fwd": timed(lambda: fp8_forward(x, nf4_to_fp8(q, q.quant_state, "rows")), args.reps, device),
            "bnb_dgrad": timed(lambda: dy @ dequantize_4bit(q, q.quant_state).to(dy.dtype), args.reps, device),
            "base_fp8_dgrad": timed(lambda: fp8_input_grad(dy, nf4_to_fp8(q, q.quant_state, "cols")), args.reps, device),
        }
        t["base_fp8_over_bnb"] = {"fwd": round(t["base_fp8_fwd"] / t["bnb_fwd"], 3),
                                  "dgrad": round(t["base_fp8_dgrad"] / t["bnb_dgrad"], 3)}
        flop = 2 * m * n * k
        t["fp8_fwd_over_bf16"] = round(t["fp8_fwd"] / t["bf16_fwd"], 3)
        exact = torch._scaled_mm(x8, w8.t(), sx, sw.t(), out_dtype=torch.bfloat16).float()
        fast = torch._scaled_mm(x8, w8.t(), sx, sw.t(), out_dtype=torch.bfloat16, use_fast_accum=True).float()
        t["fast_accum_rel_err"] = round(float((fast - exact).norm() / exact.norm()), 6)  # both rounded to bf16
        t["gemm_tflops"] = {"bf16": round(flop / t["bf16_fwd"] / 1e9, 1), "fp8": round(flop / t["fp8_gemm_only"] / 1e9, 1)}
        rows.append({"proj": name.removesuffix(".base_layer").rsplit(".", 1)[-1], "m": m, "n": n, "k": k, "ms": t})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batches", type=int, default=2, help="fixed batches, cycled")
    p.add_argument("--lr", type=float, default=1e-3, help="constant; high enough that the loss falls in 50 steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grad-dtypes", default="e4m3,e5m2", help="dy's FP8 format(s) for the FP8 paths")
    p.add_argument("--reps", type=int, default=20, help="repetitions of each timed product")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--tiny", action="store_true", help="the tiny model on CPU: a smoke test of this script")
    p.add_argument("--out", default="fp8_accuracy.json")
    args = p.parse_args()

    import magistune.model.fp8 as fp8
    from magistune.model.adapt import apply_lora
    from magistune.model_files.tiny import tiny_text_config
    from magistune.train.batches import Batch
    from random_model import magistral_small_config, random_model

    device = torch.device("cpu" if args.tiny else "cuda")
    cfg = config_for(args)
    config = tiny_text_config() if args.tiny else magistral_small_config()
    config.num_hidden_layers = args.layers
    model, info = random_model(config, cfg, device)
    torch.manual_seed(args.seed)
    model = apply_lora(model, cfg)
    model.train()
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # B = 0 would make the first gradients of A zero and the step-0 comparison empty
        for n, q in model.named_parameters():
            if "lora_B" in n:
                q.copy_(torch.randn(q.shape, generator=g) * 1e-3)
    start = {n: q.detach().clone() for n, q in model.named_parameters() if q.requires_grad}
    vocab = config.vocab_size
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(1000, vocab, (args.mbs, args.seq), generator=g)
        batches.append(Batch(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids),
                             sources=["random"] * args.mbs).to(device))

    paths = {"bf16": None, "bf16-repeat": None} | {f"fp8-{d}": DTYPES[d] for d in args.grad_dtypes.split(",") if d}
    runs, result = {}, {"paths": {}}
    for name, grad_dtype in paths.items():
        n = set_base_fp8(model, grad_dtype is not None)
        fp8.GRAD_DTYPE = grad_dtype or fp8.E4M3
        try:
            runs[name] = run_path(model, start, cfg, batches, args, device)
        except RuntimeError as e:  # recorded, not hidden: the row says this path does not run here
            result["paths"][name] = {"error": str(e).splitlines()[0][:300]}
            continue
        r = runs[name]
        result["paths"][name] = {"fp8_linears": n if grad_dtype else 0, "losses": [round(v, 5) for v in r["losses"]],
                                 "seconds": round(r["seconds"], 2), "tokens_per_s": round(args.steps * args.seq * args.mbs / r["seconds"], 1),
                                 "peak_gib": round(r["peak_gib"], 2) if r["peak_gib"] else None}
        if name != "bf16" and "bf16" in runs:
            result["paths"][name] |= compare(runs["bf16"], r)
    set_base_fp8(model, False)
    fp8.GRAD_DTYPE = fp8.E4M3
    if not args.no_timing:
        result["matmul"] = matmul_times(model, args, device)
    result |= {
        "layers": args.layers, "seq": args.seq, "mbs": args.mbs, "steps": args.steps, "batches": args.batches,
        "lr": args.lr, "lora_r": 32, "weights_gib": round(info.weight_bytes / 2**30, 2),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "bitsandbytes": __import__("bitsandbytes").__version__, "date": time.strftime("%Y-%m-%d"),
    }
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
