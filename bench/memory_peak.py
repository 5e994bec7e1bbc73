"""What holds the GPU memory at the peak of a training step, from torch's allocator history.

    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    ... one step ...
    text = peak_report(torch.cuda.memory._snapshot(), baseline=bytes allocated before the step)

The trace lists every allocation and free with the Python stack that made it. We replay it, find the moment
the live total is highest, and group the blocks alive at that moment by the first frame of our code or of the
libraries (magistune, transformers, peft, bitsandbytes, liger, cut_cross_entropy, torch.utils.checkpoint), so
the table reads "the RMSNorm's fp32 copy of the hidden states: 1.25 GiB" rather than "aten::empty".
"""

from __future__ import annotations

from collections import defaultdict

KEEP = ("magistune", "transformers", "peft", "bitsandbytes", "liger_kernel", "cut_cross_entropy",
        "torch/utils/checkpoint", "bench/")


def _where(frames: list[dict]) -> str:
    for f in frames:
        name = f.get("filename", "")
        if any(k in name for k in KEEP):
            short = name.split("site-packages/")[-1].split("/src/")[-1]
            return f"{short}:{f.get('line')} {f.get('name')}"
    return "(no library frame)"


def peak_report(snapshot: dict, baseline: int = 0, top: int = 25, device: int = 0) -> str:
    """A text table of the live allocations at the step's peak, largest groups first."""
    events = snapshot["device_traces"][device]
    live: dict[int, dict] = {}
    now = peak = peak_at = 0
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            now += e["size"]
        elif e["action"] == "free_completed" and e["addr"] in live:
            now -= live.pop(e["addr"])["size"]
        if now > peak:
            peak, peak_at = now, i
    live = {}
    for e in events[:peak_at + 1]:  # replay up to the peak to know who is alive there
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    groups: dict[str, list[int]] = defaultdict(list)
    for e in live.values():
        groups[_where(e.get("frames", []))].append(e["size"])
    gib = 2**30
    lines = [f"before the step (weights, LoRA, optimizer, …): {baseline / gib:.2f} GiB",
             f"step's own peak above that: {peak / gib:.2f} GiB  (total {(baseline + peak) / gib:.2f} GiB)",
             f"{'GiB':>7} {'blocks':>6}  first library frame of the allocation"]
    for where, sizes in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"{sum(sizes) / gib:7.3f} {len(sizes):6d}  {where}")
    return "\n".join(lines)
