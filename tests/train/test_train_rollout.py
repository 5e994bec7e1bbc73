"""Rollouts: log-probs against full-vocabulary logits, sampling reproducible from its generator, completions parsed
on the tokenizer's control ids."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from magistune.model_files.tiny import tiny_special_ids
from magistune.train.rollout import (
    RolloutBatch, Rollouts, chunked_token_logps, completion_logps, generate_rollouts, split_completion,
)

PROMPTS = [[1, 5, 6, 7], [1, 8, 9]]
COMPLETIONS = [[10, 11, 12], [13, 14]]


def test_completion_logps_equal_the_full_logits(lm):
    batch = RolloutBatch.collate(PROMPTS, COMPLETIONS, pad=0)
    got = completion_logps(lm, batch, temperature=0.5)
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        logits = lm(input_ids=torch.tensor([p + c])).logits[0].float() / 0.5
        want = F.log_softmax(logits, -1)[len(p) - 1:len(p) + len(c) - 1].gather(1, torch.tensor(c)[:, None])[:, 0]
        assert torch.allclose(got[i, :len(c)], want, atol=1e-5)
        assert (got[i, len(c):] == 0).all()


def test_chunks_give_the_same_values_and_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    h = torch.randn(37, 8, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    whole = chunked_token_logps(head, h, y, 0.7, chunk=1000)
    (gw,) = torch.autograd.grad(whole.sum(), h)
    parts = chunked_token_logps(head, h, y, 0.7, chunk=5)
    (gp,) = torch.autograd.grad(parts.sum(), h)
    assert torch.allclose(whole, parts, atol=1e-6) and torch.allclose(gw, gp, atol=1e-6)


def test_sampling_repeats_with_the_same_generator(lm):
    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return generate_rollouts(lm, PROMPTS * 2, eos=2, pad=0, max_new_tokens=6, temperature=1.0, top_p=0.9,
                                 generator=g)

    a, b, c = sample(1), sample(1), sample(2)
    assert a == b and a != c
    assert all(len(x) == 6 or x[-1] == 2 for x in a)
    assert lm.training  # back in training mode


def test_completions_split_on_control_ids():
    s = tiny_special_ids()
    ids = [s.begin_think, 100, 101, s.end_think, 200, 201, s.eos]
    assert split_completion(ids, s) == ([100, 101], [200, 201], True)
    assert split_completion([300, s.eos, 400], s) == ([], [300], False)
    assert split_completion([s.begin_think, 100, 101], s) == ([100, 101], [], True)  # unclosed: all thinking


def test_truncated_completions_are_masked_only_when_asked():
    ro = Rollouts([0, 0], [[1], [1]], [[5, 6, 2], [5, 6, 7]], [True, False], [1.0, 0.0], {}, [[{}], [{}]])
    assert ro.train_masks() == [[1, 1, 1], [1, 1, 1]]
    ro.mask_truncated = True
    assert ro.train_masks() == [[1, 1, 1], [0, 0, 0]]
    assert Rollouts.from_dict(ro.to_dict()) == ro
