"""sequence_parallel.py's pieces that need no second process (tests/distributed/test_sequence_parallel.py runs
two): the config keys, the head and process checks, the padding to a multiple of the degree."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from magistune import cli
from magistune.config import ConfigError, parse_config
from magistune.data.sample import IGNORE_INDEX
from magistune.train.batches import Batch
from magistune.train.sequence_parallel import check_degree, padded_to_multiple

BASE = {"base_model": "tiny-random", "datasets": [{"path": "data.jsonl"}]}
MAGISTRAL = SimpleNamespace(num_attention_heads=32, num_key_value_heads=8, sliding_window=None)


def test_axolotl_names_of_the_degree():
    assert parse_config({**BASE, "sequence_parallel_degree": 4})[0].sequence_parallel_degree == 4
    assert parse_config({**BASE, "context_parallel_size": 2})[0].sequence_parallel_degree == 2
    assert parse_config(BASE)[0].sequence_parallel_degree == 1
    with pytest.raises(ConfigError, match="same setting"):
        parse_config({**BASE, "context_parallel_size": 2, "sequence_parallel_degree": 4})


def test_preference_training_refuses_sequence_parallelism():
    with pytest.raises(ConfigError, match="sequence_parallel_degree: not implemented with rl: dpo"):
        parse_config({**BASE, "rl": "dpo", "sequence_parallel_degree": 2})


@pytest.mark.parametrize("degree,world", [(2, 2), (4, 8), (8, 8)])
def test_degrees_that_divide_the_heads_and_processes(degree, world):
    check_degree(degree, world, MAGISTRAL)


@pytest.mark.parametrize("degree,world,needle", [
    (3, 6, r"must divide the model's 32 attention heads and 8 key/value heads .*\[2, 4, 8\]"),
    (16, 16, "must divide the model's 32 attention heads and 8 key/value heads"),
    (2, 3, "does not divide the 3 processes"),
])
def test_degrees_that_cannot_split_are_config_errors(degree, world, needle):
    with pytest.raises(ConfigError, match=needle):
        check_degree(degree, world, MAGISTRAL)


def test_a_sliding_window_is_refused():
    with pytest.raises(ConfigError, match="sliding attention window"):
        check_degree(2, 2, SimpleNamespace(num_attention_heads=32, num_key_value_heads=8, sliding_window=4096))


def test_padding_to_a_multiple_of_the_degree():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    b = Batch(ids, ids.clone(), torch.ones_like(ids), ["s"], position_ids=torch.tensor([[0, 1, 2, 0, 1]]))
    p = padded_to_multiple(b, 4, pad_id=11)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 11, 11, 11]]
    assert p.labels.tolist() == [[5, 6, 7, 8, 9] + [IGNORE_INDEX] * 3]
    assert p.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]  # the last sample goes on: no new sample starts
    assert p.n_trained == b.n_trained
    assert padded_to_multiple(b, 5, pad_id=11) is b


def test_one_process_refuses_a_degree_above_1(write_config, write_jsonl, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("magistune.train.preflight.pick_device", lambda: torch.device("cpu"))
    write_jsonl(tmp_path / "data.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "yo"}]}])
    cfg = write_config(sequence_parallel_degree=2)
    assert cli.main(["train", str(cfg)]) == 2
    assert "use `magistune train CONFIG --nproc N`" in capsys.readouterr().err
