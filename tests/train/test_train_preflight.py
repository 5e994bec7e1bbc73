"""The out-of-memory advice (train/preflight.oom_advice): Ulysses sequence parallelism is named for long rows."""

from __future__ import annotations

import pytest

from magistune.config import parse_config
from magistune.train.memory_estimate import LONG_SEQUENCE
from magistune.train.preflight import oom_advice

BASE = {"base_model": "tiny-random", "datasets": [{"path": "d.jsonl"}], "adapter": "qlora", "load_in_4bit": True}


def cfg_of(**keys):
    return parse_config({**BASE, **keys})[0]


def test_long_rows_name_sequence_parallelism():
    advice = oom_advice(cfg_of(sequence_len=LONG_SEQUENCE), None)
    assert "sequence_parallel_degree: 2" in advice and "--nproc N" in advice and "Ulysses" in advice
    assert advice.index("sequence_parallel_degree") < advice.index("sequence_len: lower")  # no quality lost first
    assert "sequence_parallel" in oom_advice(cfg_of(sequence_len=2 * LONG_SEQUENCE), LONG_SEQUENCE)


@pytest.mark.parametrize("keys,longest", [({"sequence_len": LONG_SEQUENCE // 2}, None),
                                          ({"sequence_len": 4 * LONG_SEQUENCE}, 2000)])
def test_short_rows_do_not(keys, longest):
    assert "sequence_parallel" not in oom_advice(cfg_of(**keys), longest)


def test_preference_tuning_does_not():
    cfg = parse_config({**BASE, "rl": "dpo", "sequence_len": 2 * LONG_SEQUENCE,
                        "datasets": [{"path": "d.jsonl", "type": "chat_template"}]})[0]
    assert "sequence_parallel" not in oom_advice(cfg, None)


def test_a_run_already_split_is_told_to_split_more():
    advice = oom_advice(cfg_of(sequence_len=2 * LONG_SEQUENCE, sequence_parallel_degree=2), None)
    assert "a larger sequence_parallel_degree than 2" in advice
