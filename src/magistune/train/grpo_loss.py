"""GRPO's advantages and losses as pure functions of small tensors (tests/train/test_train_grpo_loss.py checks each
against the published formula written out directly).

N completions come in groups of G (completion i answers prompt i // G). Per token t of completion i:

    ratio_i,t  = exp(logp_i,t − old_logp_i,t)                    π_θ / π_θ_old of the sampled token
    loss_i,t   = −min(ratio · A_i, clip(ratio, 1 − ε, 1 + ε_high) · A_i)  (+ β · KL_i,t when β > 0)
    KL_i,t     = exp(ref − logp) − (ref − logp) − 1                 (k3 estimator, as TRL)

ε_high > ε is DAPO's and Magistral's *clip-higher*: a token whose probability rises (A > 0) may rise further
before it is clipped (1.28 instead of 1.2), which keeps exploration alive.

Advantages (`advantages`):
    magistral  A_i = r_i − mean(r of its group); groups whose G rewards are all equal are dropped (their
               completions get no weight); then A is normalised over the kept completions of the minibatch:
               (A − mean A) / std A (sequence-wise, Bessel-corrected like torch.std).
    TRL        A_i = r_i − mean(r of its group), divided by (std of its group + 1e-4) with scale_rewards group,
               by (std of all N rewards + 1e-4) with batch, not at all with none.

Normalisations: each loss is Σ_i w_i Σ_t mask_i,t · loss_i,t with a per-completion weight w_i (`sequence_weights`),
so summing it micro-batch by micro-batch gives exactly the loss of the whole batch (|o_i| = completion tokens
in the mask, N completions, L = max_completion_length):
    grpo       w_i = 1 / (N · |o_i|)                  mean over completions of each completion's token mean
    dr_grpo    w_i = 1 / (N · L)                      Dr. GRPO: a constant, no length bias
    dapo       w_i = 1 / Σ_j |o_j|                    token mean over the whole batch
    magistral  w_i = 1 / (K · Σ_{j ∈ group(i)} |o_j|)  each kept group's token mean, averaged over its K kept groups
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("magistral", "grpo", "dr_grpo", "dapo")
TRL_STD_EPS = 1e-4  # TRL adds 1e-4 to the std it divides by


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(n_groups,) True where all G rewards of a group are equal (its advantages are all 0: nothing to learn)."""
    g = rewards.view(-1, group_size)
    return g.max(dim=1).values == g.min(dim=1).values


def advantages(rewards: torch.Tensor, group_size: int, scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) rewards → (N,) advantages and (N,) kept (False: a dropped completion). `scaling`: "minibatch"
    (Magistral), or TRL's scale_rewards "group", "batch" or "none"."""
    g = rewards.view(-1, group_size)
    centred = (g - g.mean(dim=1, keepdim=True)).reshape(-1)
    kept = torch.ones_like(rewards, dtype=torch.bool)
    if scaling == "minibatch":
        kept = (~zero_variance_groups(rewards, group_size)).repeat_interleave(group_size)
        adv = torch.zeros_like(rewards)
        if kept.any():
            a = centred[kept]
            adv[kept] = (a - a.mean()) / a.std()  # ≥ 2 distinct values per kept group: std > 0
        return adv, kept
    if scaling == "group":
        return centred / (g.std(dim=1).repeat_interleave(group_size) + TRL_STD_EPS), kept
    if scaling == "batch":
        return centred / (rewards.std() + TRL_STD_EPS), kept
    if scaling == "none":
        return centred, kept
    raise ValueError(f"unknown reward scaling {scaling!r}")


def sequence_weights(lengths: torch.Tensor, group_size: int, loss_type: str, kept: torch.Tensor,
                     max_completion_length: int) -> torch.Tensor:
    """(N,) w_i of the module docstring; `lengths` counts each completion's trained tokens (its mask)."""
    n = lengths.numel()
    lengths = lengths.to(torch.float64)
    if loss_type == "grpo":
        w = 1.0 / (n * lengths.clamp(min=1))
    elif loss_type == "dr_grpo":
        w = torch.full_like(lengths, 1.0 / (n * max_completion_length))
    elif loss_type == "dapo":
        w = torch.full_like(lengths, 1.0 / max(float(lengths.sum()), 1.0))
    elif loss_type == "magistral":
        group_tokens = lengths.view(-1, group_size).sum(dim=1).repeat_interleave(group_size)
        n_kept_groups = int(kept.view(-1, group_size)[:, 0].sum())
        w = torch.where(kept & (group_tokens > 0), 1.0 / (max(n_kept_groups, 1) * group_tokens.clamp(min=1)), 0.0)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r} (one of {', '.join(LOSS_TYPES)})")
    return w * kept


def clipped_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, epsilon: float,
                       epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) per-token loss −min(r·A, clip(r)·A), and (B, T) True where the clip was active (TRL's clip_ratio:
    r < 1 − ε with A < 0, or r > 1 + ε_high with A > 0)."""
    ratio = torch.exp(logp - old_logp)
    a = adv.unsqueeze(1).to(ratio.dtype)
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * a, clipped * a)
    active = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))
    return loss, active


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """(B, T) k3 estimate of KL(π_θ ‖ π_ref): exp(ref − logp) − (ref − logp) − 1 ≥ 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def weighted_loss(token_loss: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i Σ_t mask_i,t · loss_i,t (a micro-batch's share of the step's loss)."""
    per_seq = (token_loss * mask).sum(dim=1)
    return (per_seq * weights.to(per_seq.dtype)).sum()


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
              group_size: int, loss_type: str, scaling: str, epsilon: float, epsilon_high: float,
              max_completion_length: int, beta: float = 0.0, ref_logp: torch.Tensor | None = None) -> torch.Tensor:
    """The whole batch's loss in one call ((N, T) tensors): what the recipe computes micro-batch by micro-batch."""
    adv, kept = advantages(rewards, group_size, scaling)
    token_loss, _ = clipped_token_loss(logp, old_logp, adv, epsilon, epsilon_high)
    if beta > 0:
        token_loss = token_loss + beta * kl_penalty(logp, ref_logp)
    weights = sequence_weights(mask.sum(dim=1), group_size, loss_type, kept, max_completion_length)
    return weighted_loss(token_loss, mask, weights)
