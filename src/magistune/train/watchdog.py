"""Axolotl's loss watchdog: stop a run whose loss has blown up, instead of training on for hours.

    watchdog = LossWatchdog.from_config(cfg)      # off (check does nothing) unless loss_watchdog_threshold is set
    … each optimizer step, before optimizer.step():
    watchdog.check(step, loss)                    # raises TrainingStopped after `patience` steps in a row above

`loss` is the step's token-mean loss (None for a step without trained tokens: it neither counts nor resets).
A step at or below the threshold resets the count. With several GPUs, pass the loss reduced over the ranks, so
that every rank stops at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from magistune.train.stopping import TrainingStopped


@dataclass
class LossWatchdog:
    threshold: float | None  # None: off
    patience: int = 3
    above: list[tuple[int, float]] = field(default_factory=list)  # the current run of (step, loss) above it

    @classmethod
    def from_config(cls, cfg) -> "LossWatchdog":
        return cls(cfg.loss_watchdog_threshold, cfg.loss_watchdog_patience)

    def check(self, step: int, loss: float | None) -> None:
        if self.threshold is None or loss is None:
            return
        if loss <= self.threshold:
            self.above.clear()
            return
        self.above.append((step, loss))
        if len(self.above) >= self.patience:
            losses = ", ".join(f"{s}: {v:.4f}" for s, v in self.above[-self.patience:])
            raise TrainingStopped(f"loss above loss_watchdog_threshold {self.threshold:g} for {self.patience} "
                                  f"step(s) in a row (step: loss {losses})")


__all__ = ["LossWatchdog"]
