"""bench/results/*.jsonl (from bench/train_step.py) → a markdown table per file, printed and written beside it."""

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
    out += f" dropout {r['dropout']}" if r.get("dropout", 0.05) != 0.05 else ""
    out += f" ({r['no_ckpt']} layers not checkpointed)" if r.get("no_ckpt") else ""
    out += f" [{r['attn']}]" if r.get("attn") not in (None, "sdpa") else ""
    return out.strip()


def table(rows: list[dict]) -> str:
    rows = [r for r in rows if not r.get("profiled")]  # the profiler's overhead makes their tok/s meaningless
    r0 = rows[0]
    steps = sorted({r["steps"] for r in rows})
    head = (f"{r0['date']}, {r0['gpu']}, torch {r0['torch']}, transformers {r0['transformers']}, peft {r0['peft']}, "
            f"bitsandbytes {r0['bitsandbytes']}. Magistral Small architecture ({r0['layers']} layers), random weights, "
            "QLoRA NF4 + double quant, r=32 alpha=16 dropout 0.05 on all 7 projections, gradient checkpointing, "
            "bf16 autocast, 8-bit AdamW, every token trained; tok/s over "
            f"{' or '.join(map(str, steps))} steps after 1 warm-up step (2 with torch.compile); "
            "peak = torch.cuda.max_memory_allocated.\n\n")
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
               "*+liger*: liger_rms_norm + liger_glu_activation; *+tiled-mlp×N*: tiled_mlp in N shards; "
               "*+compile*: torch.compile of each decoder layer.\n")
    return (head + "\n".join(lines) + "\n" + longest_under(rows) + (notes if any(r.get("image_px") for r in rows) else "")
            + (lengths if any(r.get("random_lengths") or tags(r) for r in rows) else ""))


if __name__ == "__main__":
    for path in map(Path, sys.argv[1:]):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        md = table(rows)
        path.with_suffix(".md").write_text(f"# Training step: {path.stem}\n\n{md}")
        print(md)
