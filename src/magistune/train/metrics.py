"""What a run reports: metrics.jsonl, TensorBoard events, loss.png, and a progress bar.

metrics.jsonl has one JSON object a line, flushed as it is written:
    {"step": 12, "epoch": 0.48, "loss": 2.31, "lr": 0.0002, "grad_norm": 0.87, "tokens_per_s": 5120.4,
     "trained_tokens": 3012, "peak_mem_gb": 17.2}
    {"step": 20, "eval_loss": 2.05, "eval_ppl": 7.77, "eval_tokens": 4096}
`loss` is the token mean over the logging window (logging_steps steps); `trained_tokens` counts the window's
trained tokens. Preference runs (train/dpo.py) write `loss` (the mean over pairs), `reward_chosen`,
`reward_rejected`, `reward_margin`, `reward_accuracy` and `pairs` instead, and eval rows `eval_loss`, `eval_reward_*`
(log_eval_values). peak_mem_gb is the CUDA allocator's peak, or on the CPU the process's peak resident memory.

Messages go to stderr through a `Printer`: one process prints everything; of torchrun's N, rank 0 prints
everything and the others only their errors, prefixed with their rank (their metrics logger is a QuietLogger).

A resumed run first cuts the file (and the TensorBoard events, with purge_step) back to the checkpoint's
step, so the steps that the killed run logged after its last checkpoint are not there twice.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from dataclasses import dataclass

import torch

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class Printer:
    """`say = Printer(rank)`; `say(msg)` prints msg to stderr on rank 0, and only errors elsewhere ("[rank 1] error: …")."""

    rank: int = 0

    def shown(self, msg: str) -> str | None:
        if self.rank == 0:
            return msg
        return f"[rank {self.rank}] {msg}" if msg.lstrip().startswith("error") else None

    def __call__(self, msg: str) -> None:
        msg = self.shown(msg)
        if msg is not None:
            print(msg, file=sys.stderr, flush=True)


@dataclass
class Window:
    """The steps since the last metrics row."""

    loss_sum: float = 0.0
    n_trained: int = 0
    n_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    except ImportError:  # not on Linux/macOS
        return float("nan")


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl, skipping a torn last line (a run killed while writing it)."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None  # JSON has no NaN: null


class MetricsLogger:
    def __init__(self, out_dir: Path, start_step: int, total_steps: int, show_progress: bool = True):
        self.out_dir = out_dir
        self.path = out_dir / METRICS_FILE
        # Keep only rows up to the step we restart from (all rows when starting fresh: start_step 0 → none).
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step] if start_step else []
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        except ImportError:
            pass  # tensorboard not installed: metrics.jsonl only
        self.bar = None
        if show_progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def _write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def log_train(self, step: int, **values) -> dict:
        row = {"step": step, **{k: _finite(v) if isinstance(v, float) else v for k, v in values.items()}}
        self._write(row)
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}",
                                 tok_s=f"{values.get('tokens_per_s', 0):.0f}", refresh=False)
        return row

    def log_eval(self, step: int, eval_loss: float, eval_tokens: int) -> dict:
        ppl = math.exp(eval_loss) if eval_loss < 50 else float("inf")  # perplexity = e^(mean token loss)
        row = {"step": step, "eval_loss": _finite(eval_loss), "eval_ppl": _finite(ppl), "eval_tokens": eval_tokens}
        self._write(row)
        if self.tb is not None:
            self.tb.add_scalar("eval/loss", eval_loss, step)
            self.tb.add_scalar("eval/ppl", ppl, step)
        self.message(f"step {step}: eval_loss {eval_loss:.4f}, eval_ppl {ppl:.2f} ({eval_tokens} tokens)")
        return row

    def log_eval_values(self, step: int, **values: float) -> dict:
        """An eval row of named values (preference tuning: loss and rewards), each as eval_<name>."""
        row = {"step": step, **{f"eval_{k}": _finite(v) for k, v in values.items()}}
        self._write(row)
        if self.tb is not None:
            for k, v in values.items():
                if v is not None and math.isfinite(v):
                    self.tb.add_scalar(f"eval/{k}", v, step)
        self.message(f"step {step}: " + ", ".join(f"eval_{k} {v:.4f}" for k, v in values.items()))
        return row

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def message(self, text: str) -> None:
        """Print above the progress bar."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if not self._file.closed:
            self._file.close()


class QuietLogger:
    """The metrics logger of ranks other than 0: rank 0 writes metrics.jsonl and TensorBoard; the others keep
    only their error messages."""

    bar = None
    path = None

    def __init__(self, say: Printer):
        self.say = say

    def log_train(self, step: int, **values) -> dict:
        return {"step": step, **values}

    def log_eval(self, step: int, eval_loss: float, eval_tokens: int) -> dict:
        return {"step": step, "eval_loss": eval_loss, "eval_tokens": eval_tokens}

    def log_eval_values(self, step: int, **values: float) -> dict:
        return {"step": step, **{f"eval_{k}": v for k, v in values.items()}}

    def advance(self, n: int = 1) -> None:
        pass

    def message(self, text: str) -> None:
        self.say(text)

    def close(self) -> None:
        pass


def plot_losses(metrics_path: Path, png_path: Path) -> Path | None:
    """loss.png: training loss per logged step, and eval loss where measured. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
