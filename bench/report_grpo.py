"""bench/grpo_step.py's JSON lines → a markdown table of both sides, written beside the file as .md and printed.

    python bench/report_grpo.py OUT/grpo_step.jsonl   → OUT/grpo_step.md

The ratio line compares magistune's fastest rollout row with the last trl row of the same shapes against the
issue's goal: rollout tok/s ≥ 10× TRL's, and the whole step under 24 GiB.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GOAL_SPEEDUP, GOAL_GIB = 10.0, 24.0


def shape(r: dict) -> tuple:
    return r["prompt"], r["new"], r["generations"], r["layers"], r["tiny"], r.get("nf4")


def ratio_line(rows: list[dict]) -> str:
    trl = [r for r in rows if r["side"] == "trl"]
    ours = [r for r in rows if r["side"] == "magistune"]
    if not trl or not ours:
        return "\nOnly one side was measured: no ratio.\n"
    trl = trl[-1]
    ours = [r for r in ours if shape(r) == shape(trl)]
    if not ours:
        return "\nThe magistune and trl rows have different shapes: no ratio.\n"
    best = max(ours, key=lambda r: r["rollout_tokens_per_s"])
    speed = best["rollout_tokens_per_s"] / trl["rollout_tokens_per_s"]
    step = trl["step_s"] / best["step_s"]
    line = (f"\nmagistune ({best['rollout']}) / TRL: {speed:.1f}× the rollout tok/s, "
            f"{best['train_tokens_per_s'] / trl['train_tokens_per_s']:.2f}× the training tok/s, {step:.1f}× the step")
    if best["peak_gib"] is None or trl["peak_gib"] is None:
        return line + " (CPU smoke run: no peak memory, no goal).\n"
    goal = speed >= GOAL_SPEEDUP and best["peak_gib"] < GOAL_GIB
    return (line + f"; peak {best['peak_gib']:.1f} GiB (TRL {trl['peak_gib']:.1f} GiB). Goal (rollouts ≥ "
            f"{GOAL_SPEEDUP:.0f}× TRL's tok/s, step < {GOAL_GIB:.0f} GiB): {'met' if goal else 'not met'}.\n")


def table(rows: list[dict]) -> str:
    r0 = rows[0]
    head = (f"{r0['date']}, {r0['gpu']}, torch {r0['torch']}, transformers {r0['transformers']}, peft {r0['peft']}, "
            f"bitsandbytes {r0['bitsandbytes']}, trl {r0['trl']}. "
            + ("The tiny model on the CPU, fp32, AdamW (a smoke run of the script), " if r0["tiny"] else
               f"Magistral Small architecture ({r0['layers']} layers), random weights, QLoRA NF4 + double quant "
               f"({r0['weights_gib']} GiB of weights), bf16, 8-bit AdamW, ")
            + f"LoRA r=32 alpha=16 dropout {r0['lora_dropout_run']} on all 7 projections, gradient checkpointing. "
            f"One GRPO step = 1 prompt of {r0['prompt']} tokens × G = {r0['generations']} completions of exactly "
            f"{r0['new']} new tokens (eos never sampled; checked), temperature 0.7, top-p 0.95, a trivial reward. "
            "Rollout tok/s = G × new / rollout seconds (prefill included); training tok/s = G × (prompt + new) / "
            "seconds of forward + backward + optimizer step. One timed step after "
            f"{r0['warmup']} warm-up step(s); peak = torch.cuda.max_memory_allocated over the timed step.\n\n")
    lines = ["| side | rollout | rollout tok/s | ms / decode step | rollout s | training tok/s | training s | "
             "step s | peak GiB | rollout peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "–" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        rpeak = "–" if r["peak_rollout_gib"] is None else f"{r['peak_rollout_gib']:.1f}"
        lines.append(f"| {r['side']} | {r['rollout']} | {r['rollout_tokens_per_s']:,.0f} | {r['decode_ms']:.1f} | "
                     f"{r['rollout_s']:.2f} | {r['train_tokens_per_s']:,.0f} | {r['train_s']:.2f} | "
                     f"{r['step_s']:.2f} | {peak} | {rpeak} |")
    return head + "\n".join(lines) + "\n" + ratio_line(rows) + where(rows)


def where(rows: list[dict]) -> str:
    """Where the time of each step goes."""
    out = ["\nWhere the time goes:"]
    for r in rows:
        if r["side"] == "trl":
            out.append(f"- trl: generate {r['generate_s']:.2f} s ({r['generate_s'] / r['step_s']:.0%} of the step, "
                       f"{r['decode_ms']:.1f} ms a token for {r['generations']} rows, prefill included), the rest of "
                       f"the rollout (tokenise, rewards, advantages) {r['rollout_s'] - r['generate_s']:.2f} s, "
                       f"training (forward, backward, optimizer) {r['train_s']:.2f} s.")
        else:
            out.append(f"- magistune ({r['rollout']}): prefill {r['prefill_s']:.2f} s + {r['new'] - 1} decode steps of "
                       f"{r['decode_ms']:.1f} ms = rollout {r['rollout_s']:.2f} s "
                       f"({r['rollout_s'] / r['step_s']:.0%} of the step); rewards and advantages {r['score_s']:.3f} s; "
                       f"forward + backward {r['forward_backward_s']:.2f} s, clip + optimizer {r['optimizer_s']:.2f} s.")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    for path in map(Path, sys.argv[1:]):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        md = table(rows)
        path.with_suffix(".md").write_text(f"# GRPO step: {path.stem}\n\n{md}")
        print(md)
