"""bench/dpo_step.py's JSON lines → a markdown table of both sides, written beside the file as .md and printed.

    python bench/report_dpo.py OUT/dpo_step.jsonl   → OUT/dpo_step.md

The ratio line compares the last magistune row with the last trl row of the same shapes: tok/s (both sides count
2 × (prompt + answer) tokens per pair) and peak memory, against the issue's goal (≥ 1.5× TRL's tok/s at ≤ its
memory).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def shape(r: dict) -> tuple:
    return r["prompt"], r["answer"], r["layers"], r["tiny"], r.get("nf4")


def ratio_line(rows: list[dict]) -> str:
    last = {r["side"]: r for r in rows}  # the last row of each side
    if not {"magistune", "trl"} <= last.keys():
        return "\nOnly one side was measured: no ratio.\n"
    ours, trl = last["magistune"], last["trl"]
    if shape(ours) != shape(trl):
        return "\nThe last magistune and trl rows have different shapes: no ratio.\n"
    speed = ours["tokens_per_s"] / trl["tokens_per_s"]
    line = f"\nmagistune / TRL: {speed:.2f}× the tok/s"
    if ours["peak_gib"] is None or trl["peak_gib"] is None:
        return line + " (CPU smoke run: no peak memory, no goal).\n"
    goal = speed >= 1.5 and ours["peak_gib"] <= trl["peak_gib"]
    return (line + f", {ours['peak_gib']:.1f} GiB against {trl['peak_gib']:.1f} GiB peak "
            f"({ours['peak_gib'] - trl['peak_gib']:+.1f} GiB). Goal (≥ 1.5× the tok/s at ≤ TRL's memory): "
            f"{'met' if goal else 'not met'}.\n")


def table(rows: list[dict]) -> str:
    r0 = rows[0]
    head = (f"{r0['date']}, {r0['gpu']}, torch {r0['torch']}, transformers {r0['transformers']}, peft {r0['peft']}, "
            f"bitsandbytes {r0['bitsandbytes']}, trl {r0['trl']}. "
            + ("The tiny model on the CPU, fp32, AdamW (a smoke run of the script), " if r0["tiny"] else
               f"Magistral Small architecture ({r0['layers']} layers), random weights, QLoRA NF4 + double quant, "
               "bf16, 8-bit AdamW, ")
            + f"LoRA r=32 alpha=16 dropout {r0['lora_dropout_run']} on all 7 projections, gradient checkpointing; "
            "sigmoid DPO β=0.1, one pair per step, the reference = the model with its adapter "
            f"disabled. tok/s counts 2 × (prompt + answer) tokens per pair on both sides, over {r0['steps']} steps "
            f"after {r0['warmup']} warm-up; peak = torch.cuda.max_memory_allocated after the warm-up.\n\n")
    lines = ["| side | prompt + answer | tokens run per step (policy) | tok/s | s/step | peak GiB | adapters |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        run = r["prompt"] + 2 * r["answer"] if r["side"] == "magistune" else 2 * (r["prompt"] + r["answer"])
        peak = "–" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['side']} | {r['prompt']} + {r['answer']} | {run:,} | {r['tokens_per_s']:,.0f} | "
                     f"{r['s_per_step']:.2f} | {peak} | {r['adapter_dtype']} |")
    notes = ("\n*tokens run per step*: magistune encodes the prompt once for both answers (one row: prompt, chosen, "
             "rejected; the rejected answer does not attend to the chosen one); TRL runs prompt + chosen and prompt + "
             "rejected as two rows. Both then run the same tokens again without gradient for the reference.\n")
    return head + "\n".join(lines) + "\n" + ratio_line(rows) + notes


if __name__ == "__main__":
    for path in map(Path, sys.argv[1:]):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        md = table(rows)
        path.with_suffix(".md").write_text(f"# DPO step: {path.stem}\n\n{md}")
        print(md)
