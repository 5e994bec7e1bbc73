"""GRPO's advantages and losses against the published formulas written out directly (loops, float64)."""

from __future__ import annotations

import math

import pytest
import torch

from magistune.train.grpo_loss import (
    advantages, clipped_token_loss, grpo_loss, kl_penalty, sequence_weights, weighted_loss, zero_variance_groups,
)

G = 4


def _batch(seed: int = 0, n_groups: int = 3, width: int = 6):
    g = torch.Generator().manual_seed(seed)
    n = n_groups * G
    lengths = torch.randint(1, width + 1, (n,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).double()
    logp = -torch.rand((n, width), generator=g, dtype=torch.float64) * 3
    old = logp + (torch.rand((n, width), generator=g, dtype=torch.float64) - 0.5) * 0.8  # ratios ≈ 0.67 … 1.5
    rewards = torch.randint(0, 3, (n,), generator=g).double()
    rewards[:G] = 1.0  # the first group scored all the same
    return logp, old, mask, rewards


def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs):  # Bessel-corrected, like torch.std
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_zero_variance_groups_are_found():
    r = torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 0, 2, 2, 2, 2])
    assert zero_variance_groups(r, G).tolist() == [True, False, True]


def test_magistral_advantages_follow_the_paper():
    """A = r − group mean; equal-reward groups dropped; then (A − mean) / std over the kept completions."""
    _, _, _, r = _batch(1)
    adv, kept = advantages(r, G, "minibatch")
    groups = [r[i:i + G].tolist() for i in range(0, len(r), G)]
    centred, keep = [], []
    for grp in groups:
        same = max(grp) == min(grp)
        centred += [x - _mean(grp) for x in grp]
        keep += [not same] * G
    a = [c for c, k in zip(centred, keep) if k]
    want = [(c - _mean(a)) / _std(a) if k else 0.0 for c, k in zip(centred, keep)]
    assert kept.tolist() == keep and keep[:G] == [False] * G
    assert torch.allclose(adv, torch.tensor(want, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("scaling", ["group", "batch", "none"])
def test_trl_advantages(scaling):
    _, _, _, r = _batch(2)
    adv, kept = advantages(r, G, scaling)
    want = []
    for i in range(0, len(r), G):
        grp = r[i:i + G].tolist()
        for x in grp:
            d = x - _mean(grp)
            want.append(d / (_std(grp) + 1e-4) if scaling == "group" else
                        d / (_std(r.tolist()) + 1e-4) if scaling == "batch" else d)
    assert kept.all()
    assert torch.allclose(adv, torch.tensor(want, dtype=torch.float64), atol=1e-6)


def test_clip_higher_clips_asymmetrically():
    ratio = torch.tensor([[0.5, 0.9, 1.1, 1.25, 1.5]], dtype=torch.float64)
    logp, old = torch.log(ratio), torch.zeros_like(ratio)
    for a in (1.0, -1.0):
        loss, active = clipped_token_loss(logp, old, torch.tensor([a], dtype=torch.float64), 0.2, 0.28)
        want = [-min(x * a, min(max(x, 0.8), 1.28) * a) for x in ratio[0].tolist()]
        assert torch.allclose(loss[0], torch.tensor(want, dtype=torch.float64), atol=1e-12)
        # A > 0: 1.5 is above 1.28 (1.25 is not: clip-higher lets it rise); A < 0: 0.5 is below 0.8
        assert active[0].tolist() == ([False, False, False, False, True] if a > 0 else [True, False, False, False, False])


def _direct_token_loss(logp, old, adv, eps, eps_high, i, t):
    ratio = math.exp(logp[i][t] - old[i][t])
    return -min(ratio * adv[i], min(max(ratio, 1 - eps), 1 + eps_high) * adv[i])


@pytest.mark.parametrize("loss_type", ["magistral", "grpo", "dr_grpo", "dapo"])
def test_every_normalisation_equals_its_formula(loss_type):
    logp, old, mask, r = _batch(3)
    scaling = "minibatch" if loss_type == "magistral" else "group"
    L = mask.shape[1] + 2  # max_completion_length
    got = grpo_loss(logp, old, mask, r, G, loss_type, scaling, 0.2, 0.28, L)
    adv = advantages(r, G, scaling)[0].tolist()
    lp, od, n = logp.tolist(), old.tolist(), len(r)
    lens = [int(m) for m in mask.sum(1).tolist()]
    seq = [sum(_direct_token_loss(lp, od, adv, 0.2, 0.28, i, t) for t in range(lens[i])) for i in range(n)]
    if loss_type == "grpo":  # mean over completions of each one's token mean
        want = _mean([seq[i] / lens[i] for i in range(n)])
    elif loss_type == "dr_grpo":  # Σ / (N · L)
        want = sum(seq) / (n * L)
    elif loss_type == "dapo":  # Σ / all tokens
        want = sum(seq) / sum(lens)
    else:  # mean over kept groups of Σ_group / tokens of the group
        kept = [g for g in range(n // G) if len(set(r[g * G:(g + 1) * G].tolist())) > 1]
        want = _mean([sum(seq[g * G:(g + 1) * G]) / sum(lens[g * G:(g + 1) * G]) for g in kept])
    assert abs(float(got) - want) < 1e-6


def test_micro_batches_sum_to_the_whole_batch():
    logp, old, mask, r = _batch(4, n_groups=4)
    for loss_type, scaling in (("magistral", "minibatch"), ("grpo", "group"), ("dapo", "none"), ("dr_grpo", "batch")):
        whole = grpo_loss(logp, old, mask, r, G, loss_type, scaling, 0.2, 0.28, 9)
        adv, kept = advantages(r, G, scaling)
        w = sequence_weights(mask.sum(1), G, loss_type, kept, 9)
        parts = 0.0
        for s in range(0, len(r), 3):  # micro-batches of 3 cut across groups
            tl, _ = clipped_token_loss(logp[s:s + 3], old[s:s + 3], adv[s:s + 3], 0.2, 0.28)
            parts += float(weighted_loss(tl, mask[s:s + 3], w[s:s + 3]))
        assert abs(parts - float(whole)) < 1e-9


def test_kl_term_is_k3_and_added_with_beta():
    logp, old, mask, r = _batch(5)
    ref = logp + 0.3
    kl = kl_penalty(logp, ref)
    assert torch.allclose(kl, torch.exp(ref - logp) - (ref - logp) - 1) and (kl >= 0).all()
    base = grpo_loss(logp, old, mask, r, G, "dapo", "group", 0.2, 0.28, 9)
    with_kl = grpo_loss(logp, old, mask, r, G, "dapo", "group", 0.2, 0.28, 9, beta=0.1, ref_logp=ref)
    assert abs(float(with_kl - base) - 0.1 * float((kl * mask).sum() / mask.sum())) < 1e-9


def test_magistral_drops_equal_groups_and_all_equal_gives_no_weight():
    r = torch.ones(2 * G, dtype=torch.float64)
    adv, kept = advantages(r, G, "minibatch")
    assert not kept.any() and (adv == 0).all()
    assert float(sequence_weights(torch.full((2 * G,), 5.0), G, "magistral", kept, 10).sum()) == 0


def test_ratio_is_exactly_one_at_the_first_update(lm):
    """num_iterations 1: old log-probs are the policy's own, detached: ratio = 1 exactly, and the gradient is the
    policy gradient −Σ w A ∇logp."""
    from magistune.train.rollout import RolloutBatch, completion_logps

    batch = RolloutBatch.collate([[5, 6, 7], [8, 9]] * 2, [[10, 11, 12], [13], [14, 15], [16, 17, 18, 19]], pad=0)
    logp = completion_logps(lm, batch, temperature=0.7)
    ratio = torch.exp(logp - logp.detach())
    assert torch.equal(ratio, torch.ones_like(ratio))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    loss, active = clipped_token_loss(logp, logp.detach(), adv, 0.2, 0.28)
    assert not active.any()
    weighted_loss(loss, batch.completion_mask, w).backward()
    got = [p.grad.clone() for p in lm.parameters()]
    lm.zero_grad()
    logp = completion_logps(lm, batch, temperature=0.7)
    (-(logp * batch.completion_mask * (adv * w)[:, None]).sum()).backward()
    for a, p in zip(got, lm.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)
