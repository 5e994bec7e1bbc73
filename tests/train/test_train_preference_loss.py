"""Preference losses against direct float64 implementations of the published formulas (TRL's forms), gradient
accumulation over micro-batches, and per-sequence log-probs against full-vocab log_softmax."""

import math

import pytest
import torch

from magistune.data.sample import IGNORE_INDEX
from magistune.train.preference_loss import (
    dpo_loss, ipo_loss, kto_kl_estimate, kto_loss, orpo_loss, sequence_logps, simpo_loss,
)

B = 16


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return 1 / (1 + math.exp(-x))


@pytest.fixture
def lp():
    """Random summed log-probs (policy and reference, float64) and token counts."""
    g = torch.Generator().manual_seed(0)
    tokens_c, tokens_r = torch.randint(1, 60, (B,), generator=g), torch.randint(1, 60, (B,), generator=g)
    per_token = lambda n: -torch.rand(B, generator=g, dtype=torch.float64) * 3 * n  # noqa: E731
    return {"pc": per_token(tokens_c), "pr": per_token(tokens_r), "rc": per_token(tokens_c), "rr": per_token(tokens_r),
            "nc": tokens_c, "nr": tokens_r}


def rows(t, *keys):
    return list(zip(*[t[k].tolist() for k in keys]))


def check(out, want_losses, want_cr, want_rr):
    assert out.losses.tolist() == pytest.approx(want_losses, abs=1e-6, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx(want_cr, abs=1e-6, rel=1e-6)
    assert out.rejected_rewards.tolist() == pytest.approx(want_rr, abs=1e-6, rel=1e-6)
    correct = [float(c > r) for c, r in zip(want_cr, want_rr)]
    assert out.correct.tolist() == correct
    s = out.stats()
    assert s["reward_accuracy"] == pytest.approx(sum(correct) / len(correct))
    assert s["reward_margin"] == pytest.approx(sum(want_cr) / B - sum(want_rr) / B, abs=1e-6)


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_dpo(lp, beta, eps):
    out = dpo_loss(lp["pc"], lp["pr"], lp["rc"], lp["rr"], beta, eps)
    want = []
    for pc, pr, rc, rr in rows(lp, "pc", "pr", "rc", "rr"):
        z = beta * ((pc - rc) - (pr - rr))  # β·(log π_c/ref_c − log π_r/ref_r)
        want.append(-(1 - eps) * logsig(z) - eps * logsig(-z))
    check(out, want, [beta * (a - b) for a, b in rows(lp, "pc", "rc")], [beta * (a - b) for a, b in rows(lp, "pr", "rr")])


def test_ipo_averages_over_tokens(lp):
    beta = 0.3
    out = ipo_loss(lp["pc"], lp["pr"], lp["rc"], lp["rr"], lp["nc"], lp["nr"], beta)
    want, wc, wr = [], [], []
    for pc, pr, rc, rr, nc, nr in rows(lp, "pc", "pr", "rc", "rr", "nc", "nr"):
        h = (pc / nc - rc / nc) - (pr / nr - rr / nr)
        want.append((h - 1 / (2 * beta)) ** 2)
        wc.append(beta * (pc - rc) / nc)
        wr.append(beta * (pr - rr) / nr)
    check(out, want, wc, wr)


@pytest.mark.parametrize("nll_weight", [1.0, 0.0])
def test_orpo(lp, nll_weight):
    beta = 0.2
    out = orpo_loss(lp["pc"], lp["pr"], lp["nc"], lp["nr"], beta, nll_weight)
    want = []
    for pc, pr, nc, nr in rows(lp, "pc", "pr", "nc", "nr"):
        a, b = pc / nc, pr / nr
        odds = lambda p: p / (1 - p)  # noqa: E731
        log_or = math.log(odds(math.exp(a)) / odds(math.exp(b)))  # the paper's log odds ratio
        want.append(nll_weight * -a - beta * logsig(log_or))
    check(out, want, [beta * c / n for c, n in rows(lp, "pc", "nc")], [beta * r / n for r, n in rows(lp, "pr", "nr")])


@pytest.mark.parametrize("gamma,eps,alpha", [(0.5, 0.0, 1.0), (1.0, 0.1, 0.0)])
def test_simpo(lp, gamma, eps, alpha):
    beta = 2.0
    out = simpo_loss(lp["pc"], lp["pr"], lp["nc"], lp["nr"], beta, gamma, eps, alpha)
    want = []
    for pc, pr, nc, nr in rows(lp, "pc", "pr", "nc", "nr"):
        z = beta * pc / nc - beta * pr / nr - gamma  # the paper's β/|y|·log π margin minus γ
        want.append(-(1 - eps) * logsig(z) - eps * logsig(-z) + alpha * -pc / nc)
    check(out, want, [beta * c / n for c, n in rows(lp, "pc", "nc")], [beta * r / n for r, n in rows(lp, "pr", "nr")])


@pytest.mark.parametrize("shift", [0.0, 5.0])
def test_kto(lp, shift):
    beta, wd, wu = 0.1, 1.0, 1.5
    desirable = torch.arange(B) % 3 != 0
    policy_kl, ref_kl = lp["pc"] + shift, lp["rc"]  # shift makes z₀ positive; 0 lets the clamp act
    kl = kto_kl_estimate(policy_kl, ref_kl)
    z0 = max(0.0, sum(a - b for a, b in rows({"a": policy_kl, "b": ref_kl}, "a", "b")) / B)
    assert kl.item() == pytest.approx(z0, abs=1e-9) and not kl.requires_grad
    out = kto_loss(lp["pc"], lp["rc"], desirable, kl, beta, wd, wu)
    want, wc, wr, correct = [], [], [], []
    for (p, r), d in zip(rows(lp, "pc", "rc"), desirable.tolist()):
        reward = beta * (p - r)
        want.append(wd * (1 - sig(beta * (p - r - z0))) if d else wu * (1 - sig(beta * (z0 - (p - r)))))
        (wc if d else wr).append(reward)
        correct.append(float((reward > 0) == d))
    assert out.losses.tolist() == pytest.approx(want, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx(wc) and out.rejected_rewards.tolist() == pytest.approx(wr)
    assert out.correct.tolist() == correct


# --- per-sequence log-probs and gradient accumulation -----------------------------------------------------------

def _batch(seed=0, n=6, t=12, h=8, v=50):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, h, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n, t), generator=g)
    for i in range(n):  # a prompt of random length, then the answer; padding at the end of some rows
        start, end = int(torch.randint(1, t - 2, (1,), generator=g)), t - (i % 3)
        labels[i, :start] = IGNORE_INDEX
        labels[i, end:] = IGNORE_INDEX
    head = torch.nn.Linear(h, v, bias=False).double()
    torch.nn.init.normal_(head.weight, generator=g)
    return head, hidden, labels


@pytest.mark.parametrize("chunk", [1024, 3])
def test_sequence_logps_equal_full_log_softmax(chunk):
    head, hidden, labels = _batch()
    hidden.requires_grad_(True)
    logps, n = sequence_logps(head, hidden, labels, chunk=chunk)
    full = torch.log_softmax(head(hidden[:, :-1]), dim=-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    want = (full.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask).sum(1)
    assert torch.allclose(logps.double(), want, atol=1e-5)
    assert n.tolist() == mask.sum(1).tolist()
    g1 = torch.autograd.grad(logps.sum(), [hidden, head.weight])
    g2 = torch.autograd.grad(want.sum(), [hidden, head.weight])
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5)


def _pair_loss(name, head, hidden, labels, ref, desirable, kl):
    """Rows are chosen/rejected interleaved (pairs); for KTO one row per example."""
    logps, n = sequence_logps(head, hidden, labels)
    logps, n = logps.double(), n.double()
    if name == "kto":
        return kto_loss(logps, ref, desirable, kl).losses
    pc, pr, nc, nr = logps[0::2], logps[1::2], n[0::2], n[1::2]
    rc, rr = ref[0::2], ref[1::2]
    return {"dpo": lambda: dpo_loss(pc, pr, rc, rr, 0.1, 0.1), "ipo": lambda: ipo_loss(pc, pr, rc, rr, nc, nr),
            "orpo": lambda: orpo_loss(pc, pr, nc, nr), "simpo": lambda: simpo_loss(pc, pr, nc, nr)}[name]().losses


@pytest.mark.parametrize("name", ["dpo", "ipo", "orpo", "simpo", "kto"])
def test_gradient_accumulation_equals_one_batch(name):
    """Σ over micro-batches of ∇(Σ losses / pairs of the step) = ∇(mean loss of the one batch)."""
    head, hidden, labels = _batch(seed=1, n=8)
    hidden = hidden * 0.1  # log-probs away from 0: ORPO's log(1 − p) stays finite
    ref = -torch.rand(8, dtype=torch.float64) * 20
    desirable = torch.tensor([True, False, True, True, False, False, True, False])
    kl = kto_kl_estimate(-torch.rand(8, dtype=torch.float64) * 20, ref)  # once per step
    _pair_loss(name, head, hidden, labels, ref, desirable, kl).mean().backward()
    whole = head.weight.grad.clone()
    head.weight.grad = None
    rows_per_micro, total = 4, (8 if name == "kto" else 4)
    for i in range(0, 8, rows_per_micro):
        s = slice(i, i + rows_per_micro)
        losses = _pair_loss(name, head, hidden[s], labels[s], ref[s], desirable[s], kl)
        (losses.sum() / total).backward()
    assert torch.allclose(head.weight.grad, whole, atol=1e-6, rtol=1e-6)
    assert whole.abs().sum() > 0
