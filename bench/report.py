"""bench/results/*.jsonl (from bench/train_step.py) → a markdown table per file, printed and written beside it."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(rows: list[dict]) -> str:
    r0 = rows[0]
    head = (f"{r0['date']}, {r0['gpu']}, torch {r0['torch']}, transformers {r0['transformers']}, peft {r0['peft']}, "
            f"bitsandbytes {r0['bitsandbytes']}. Magistral Small architecture ({r0['layers']} layers), random weights, "
            "QLoRA NF4 + double quant, r=32 alpha=16 dropout 0.05 on all 7 projections, gradient checkpointing, "
            "bf16 autocast, 8-bit AdamW, every token trained; tok/s over 3 steps after 1 warm-up step; "
            "peak = torch.cuda.max_memory_allocated.\n\n")
    lines = ["| side | seq | micro-batch × accum | tok/s | peak GiB |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['side']} | {r['seq']} | {r['mbs']} × {r['accum']} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    for path in map(Path, sys.argv[1:]):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        md = table(rows)
        path.with_suffix(".md").write_text(f"# Training step: {path.stem}\n\n{md}")
        print(md)
