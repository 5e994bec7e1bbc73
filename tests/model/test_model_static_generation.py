"""The static-cache sampler (model/static_generation.py) gives generation.generate_ids's ids: same seed, same ids
in float32 on the CPU (the decode step eagerly; the CUDA graph is compared on the GPU in tests/gpu)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import make_lm  # noqa: E402

from magistune.model.generation import SamplingOptions, generate_ids  # noqa: E402
from magistune.model.static_generation import generate_ids_static, prefill_mask, static_unsupported  # noqa: E402
from magistune.train.rollout import generate_rollouts  # noqa: E402

PROMPTS = [[1, 5, 6, 7, 8], [1, 8, 9], [1, 40], [1, 5, 6, 7, 8]]


def sdpa_lm(seed: int = 0):
    lm = make_lm(seed).eval()
    lm.config._attn_implementation = "sdpa"
    return lm


@pytest.mark.parametrize("temperature, top_p, eos", [(0.0, 1.0, 2), (1.0, 0.9, 2), (0.7, 0.95, -1)])
def test_same_ids_as_the_plain_loop(temperature, top_p, eos):
    lm = sdpa_lm()
    opts = SamplingOptions(temperature, top_p, max_tokens=12)
    plain = generate_ids(lm, PROMPTS, eos, 0, opts, generator=torch.Generator().manual_seed(3))
    static = generate_ids_static(lm, PROMPTS, eos, 0, opts, generator=torch.Generator().manual_seed(3))
    assert static == plain
    assert eos != -1 or all(len(x) == 12 for x in static)


def test_rows_stop_on_eos_on_their_own():
    lm = sdpa_lm(1)
    opts = SamplingOptions(1.5, 1.0, max_tokens=40)
    for seed in range(4):  # a high temperature over 97 ids: some rows sample eos = 3 early, others do not
        plain = generate_ids(lm, PROMPTS, 3, 0, opts, generator=torch.Generator().manual_seed(seed))
        static = generate_ids_static(lm, PROMPTS, 3, 0, opts, generator=torch.Generator().manual_seed(seed))
        assert static == plain


def test_the_rollout_seam_picks_it_with_fast():
    lm = sdpa_lm()
    args = dict(eos=2, pad=0, max_new_tokens=8, temperature=1.0, top_p=0.9)
    a = generate_rollouts(lm, PROMPTS, generator=torch.Generator().manual_seed(5), fast=True, **args)
    b = generate_rollouts(lm, PROMPTS, generator=torch.Generator().manual_seed(5), fast=False, **args)
    assert a == b


def test_unsupported_models_are_named():
    assert static_unsupported(sdpa_lm()) is None and static_unsupported(make_lm()) is None  # eager: SDPA here
    lm = sdpa_lm()
    lm.config.sliding_window = 16
    assert "sliding window" in static_unsupported(lm)


def test_a_padding_query_sees_only_itself():
    m = prefill_mask(torch.tensor([[0, 0, 1, 1]]), 6)[0, 0]
    assert m.tolist() == [[True, False, False, False, False, False], [False, True, False, False, False, False],
                          [False, False, True, False, False, False], [False, False, True, True, False, False]]
