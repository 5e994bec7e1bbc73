"""The loss watchdog (Axolotl's loss_watchdog_threshold / loss_watchdog_patience)."""

import pytest

from magistune.config import parse_config
from magistune.train.stopping import TrainingStopped
from magistune.train.watchdog import LossWatchdog


def run(watchdog: LossWatchdog, losses) -> int | None:
    """The step (1-based) at which the watchdog stops the run, or None."""
    for step, loss in enumerate(losses, start=1):
        try:
            watchdog.check(step, loss)
        except TrainingStopped:
            return step
    return None


def test_stops_after_patience_steps_in_a_row_above():
    assert run(LossWatchdog(5.0, 3), [1.0, 6.0, 7.0, 8.0, 1.0]) == 4


def test_a_step_at_or_below_resets_the_count():
    assert run(LossWatchdog(5.0, 3), [6.0, 6.0, 5.0, 6.0, 6.0, 1.0, 6.0]) is None
    assert run(LossWatchdog(5.0, 2), [6.0, 5.0, 6.0, 6.0]) == 4


def test_a_step_without_trained_tokens_neither_counts_nor_resets():
    assert run(LossWatchdog(5.0, 2), [6.0, None, 6.0]) == 3


def test_off_without_threshold():
    assert run(LossWatchdog(None, 1), [1e9] * 5) is None


def test_the_message_names_the_key_and_the_steps():
    watchdog = LossWatchdog(5.0, 2)
    watchdog.check(1, 1.0)
    watchdog.check(2, 6.0)
    with pytest.raises(TrainingStopped, match=r"loss_watchdog_threshold 5 for 2 step\(s\) in a row \(step: loss "
                                              r"2: 6\.0000, 3: 7\.0000\)"):
        watchdog.check(3, 7.0)


def test_from_config_reads_axolotls_keys():
    cfg, _ = parse_config({"base_model": "tiny-random", "datasets": [{"path": "d.jsonl"}],
                           "loss_watchdog_threshold": 5.0, "loss_watchdog_patience": 3})
    w = LossWatchdog.from_config(cfg)
    assert (w.threshold, w.patience) == (5.0, 3)
    assert LossWatchdog.from_config(parse_config({"base_model": "tiny-random",
                                                  "datasets": [{"path": "d.jsonl"}]})[0]).threshold is None
