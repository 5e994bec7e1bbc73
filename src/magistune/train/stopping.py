"""How a run stops early: a stop signal (Ctrl-C / SIGTERM) at a step boundary, or a step that cannot go on.

    stop = StopFlag(say); stop.install()
    … at the end of each step: if stop.signum is not None: raise Interrupted   (a checkpoint of this step is saved)

A second signal raises KeyboardInterrupt wherever the run is (even inside optimizer.step()): nothing is saved.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Callable


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite loss or gradient); the message says why and what to try."""


class Interrupted(Exception):
    """A stop signal arrived; raised at a step boundary, where a checkpoint is consistent."""


@dataclass
class StopFlag:
    """SIGINT/SIGTERM set it; the loop stops at the next step boundary. A second signal quits at once."""

    say: Callable[[str], None] = print
    signum: int | None = None
    old: dict = field(default_factory=dict)

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # anywhere, even inside optimizer.step(): no checkpoint is saved
        self.signum = signum
        self.say(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                 "(send it again to quit without saving)")

    def restore(self) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def oom_summary(e: BaseException) -> str:
    """'CUDA out of memory. Tried to allocate 2.00 GiB' without the allocator's paragraph that follows."""
    return str(e).splitlines()[0].split(". GPU ")[0] if str(e) else type(e).__name__


__all__ = ["Interrupted", "StopFlag", "TrainingStopped", "oom_summary"]
