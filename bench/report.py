"""bench/results/*.jsonl (from bench/train_step.py and bench/unsloth_step.py) → a markdown table per file, printed and
written beside it, with each side's versions and, per shape, magistune's tok/s and peak over the stock stack's and
Unsloth's (means where a configuration was measured more than once)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def longest_under(rows: list[dict], limit_gib: float = 24.0) -> str:
    """Per side (stock or magistune, whatever the options), the longest measured sequence whose peak < limit."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["peak_gib"] is not None and r["peak_gib"] < limit_gib and r["mbs"] == 1 and not r.get("image_px"):
            side = r["side"].split("-")[0] if r["side"].startswith("reference") else r["side"]
            if r["seq"] > best.get(side, {"seq": 0})["seq"]:
                best[side] = r
    parts = [f"{side}: {r['seq']:,} tokens at {r['peak_gib']:.1f} GiB ({tags(r) or 'defaults'})" for side, r in best.items()]
    return f"\nLongest sequence measured under {limit_gib:.0f} GiB, micro-batch 1: " + "; ".join(parts) + ".\n"


def tags(r: dict) -> str:
    out = "".join(f" +{k}" for k in ("cce", "offload", "liger", "compile") if r.get(k))
    out += f" +tiled-mlp×{r['tiled_mlp']}" if r.get("tiled_mlp") else ""
    out += f" +fp8 (dy {r['fp8']})" if r.get("fp8") else ""
    out += " +lora-kernels" if r.get("kernels") else ""
    out += " +keep-weights" if r.get("keep_weights") else ""
    out += f" dropout {r['dropout']}" if r.get("dropout", 0.05) != 0.05 else ""
    out += f" ({r['no_ckpt']} layers not checkpointed)" if r.get("no_ckpt") else ""
    out += f" [{r['attn']}]" if r.get("attn") not in (None, "sdpa") else ""
    return out.strip()


def label(r: dict) -> str:
    return r["side"] + (" " + tags(r) if tags(r) else "")


def versions_line(rows: list[dict]) -> str:
    """Each side's own packages (the newest row of each side that names it), e.g. 'unsloth: unsloth 2026.10.9, unsloth_zoo ...'."""
    keys = {"magistune": ("magistune", "torch", "transformers", "peft", "bitsandbytes"),
            "reference": ("transformers", "peft", "bitsandbytes"),
            "unsloth": ("unsloth", "unsloth_zoo", "transformers", "peft", "bitsandbytes", "trl", "datasets")}
    parts = []
    for side, names in keys.items():
        mine = [r for r in rows if r["side"].split("-")[0] == side]
        if mine:
            newest = {n: r[n] for r in mine for n in names if r.get(n)}  # a later row wins; older rows lack keys
            got = ", ".join(f"{n} {newest[n]}" for n in names if n in newest)
            parts.append(f"{'stock' if side == 'reference' else side}: {got}")
    return "Versions: " + "; ".join(parts) + ".\n\n" if parts else ""


def ratio(mine: list[dict], theirs: list[dict]) -> tuple[float, float, float, float | None]:
    """(my mean tok/s, their mean tok/s, mine / theirs, my mean peak / their mean peak or None on the CPU)."""
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    a, b = mean(mine, "tokens_per_s"), mean(theirs, "tokens_per_s")
    has_peak = all(r["peak_gib"] is not None for r in mine + theirs)
    return a, b, a / b, (mean(mine, "peak_gib") / mean(theirs, "peak_gib")) if has_peak else None


def ratio_lines(rows: list[dict]) -> str:
    """Per shape (seq, micro-batch × accum, layers; fixed-length text rows only): each magistune configuration over
    the plain stock stack and over each Unsloth configuration."""
    shapes: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        if not (r.get("packing") or r.get("random_lengths") or r.get("image_px") or r.get("profiled")):
            shapes.setdefault((r["seq"], r["mbs"], r["accum"], r["layers"]), {}).setdefault(label(r), []).append(r)
    lines = []
    for (seq, mbs, accum, layers), by in shapes.items():
        others = [k for k in by if k == "reference" or k.startswith("unsloth")]
        for mine in (k for k in by if k.startswith("magistune")):
            for other in others:
                a, b, x, m = ratio(by[mine], by[other])
                name = "stock" if other == "reference" else other
                peak = f", peak {m:.2f}×" if m is not None else ""
                lines.append(f"- seq {seq}, {mbs} × {accum}, {layers} layers: {mine} / {name} = {x:.2f}× tok/s "
                             f"({a:,.0f} / {b:,.0f}){peak}")
    return "\nRatios (magistune / stock, magistune / Unsloth; means of repeated rows):\n" + "\n".join(lines) + "\n" if lines else ""


def table(rows: list[dict]) -> str:
    rows = [r for r in rows if not r.get("profiled")]  # the profiler's overhead makes their tok/s meaningless
    r0 = rows[0]
    steps = sorted({r["steps"] for r in rows})
    head = (f"{r0['date']}, {r0['gpu']}, torch {r0['torch']}, transformers {r0['transformers']}, peft {r0['peft']}, "
            f"bitsandbytes {r0['bitsandbytes']}. Magistral Small architecture ({r0['layers']} layers), random weights, "
            "QLoRA NF4 + double quant, r=32 alpha=16 dropout 0.05 on all 7 projections, gradient checkpointing, "
            "bf16 autocast, 8-bit AdamW, every token trained; tok/s over "
            f"{' or '.join(map(str, steps))} steps after 1 warm-up step (2 with torch.compile); "
            "peak = torch.cuda.max_memory_allocated.\n\n") + versions_line(rows)
    lines = ["| side | seq | micro-batch × accum | tok/s | peak GiB |", "|---|---|---|---|---|"]
    for r in rows:
        side = r["side"] + (f" ({r['image_px']}² image)" if r.get("image_px") else "")
        if r.get("packing"):
            side += f" packed ({r['packing_efficiency']:.1%} full)"
        elif r.get("random_lengths"):
            side += f" random lengths ({r['padding_share']:.0%} padding)"
        side += (" " + tags(r)) if tags(r) else ""
        peak = "–" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"  # None: a CPU smoke run
        lines.append(f"| {side} | {r['seq']} | {r['mbs']} × {r['accum']} | {r['tokens_per_s']:,.0f} | {peak} |")
    notes = ("\n*-vision*: Magistral Small 2509 shapes (Mistral3: 24-layer Pixtral tower, hidden 1024, kept in bf16 and "
             "frozen; projector; the 40-layer decoder in NF4), one image conversation through magistune's data pipeline "
             "(the image's 1,369 [IMG] tokens + 37 row ends, the rest answer text); only the answer is trained.\n")
    lengths = ("\n*packed* / *random lengths*: samples of seq/16 … seq/2 tokens (uniform), packed into rows of seq tokens "
               "(first-fit decreasing, block-diagonal attention) or one per row padded to the longest of the micro-batch; "
               "tok/s counts real tokens only. *+cce*: Cut Cross Entropy loss; *+offload*: activation offloading; "
               "*+liger*: liger_rms_norm + liger_glu_activation; *+tiled-mlp×N*: tiled_mlp in N shards; *+lora-kernels*: lora_qkv_kernel + lora_o_kernel + lora_mlp_kernel (model/lora_kernels.py); *+keep-weights*: their dequantised weights kept from recompute to backward; *+fp8*: base_fp8; "
               "*+compile*: torch.compile of each decoder layer.\n")
    unsloth = ("\n*unsloth*: Unsloth's FastLanguageModel on the same model saved as a bnb-4bit folder "
               "(bench/unsloth_step.py): its fused LoRA kernels (the dropout fused in), \"unsloth\" gradient checkpointing "
               "and its own patches; the same batches, 8-bit AdamW and bf16 autocast.\n")
    return (head + "\n".join(lines) + "\n" + ratio_lines(rows) + longest_under(rows)
            + (unsloth if any(r["side"] == "unsloth" for r in rows) else "") + (notes if any(r.get("image_px") for r in rows) else "")
            + (lengths if any(r.get("random_lengths") or tags(r) for r in rows) else ""))


if __name__ == "__main__":
    for path in map(Path, sys.argv[1:]):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        md = table(rows)
        path.with_suffix(".md").write_text(f"# Training step: {path.stem}\n\n{md}")
        print(md)
