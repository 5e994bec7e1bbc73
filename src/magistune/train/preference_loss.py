"""Preference losses (DPO, IPO, ORPO, SimPO/CPO, KTO) as pure functions of per-sequence log-probs, with TRL's
formulas and defaults, and the per-sequence log-probs themselves from hidden states.

Inputs. `*_logps` are Σ log p(token) over a sequence's labelled tokens (the answer: thinking, text, tool calls,
`</s>`), shape (B,), as `sequence_logps` returns them; `*_tokens` are those tokens' counts, for the losses that
average. `ref_*` come from the frozen reference model (no gradient).

Output. Every loss returns per-pair losses (KTO: per example), not their mean, so that gradient accumulation
is exact: a step of several micro-batches backpropagates Σ losses / (pairs of the whole step) for each one,
which is the gradient of one big batch's mean (tests/train/test_train_preference_loss.py). Rewards are detached.

Choices where TRL's code is not per pair:
- IPO averages log-probs over the answer's tokens, as TRL does (`concatenated_forward` divides `all_logps` by
  `loss_mask.sum(-1)` when loss_type == "ipo", for the policy and the reference alike); the rewards too.
- ORPO and SimPO/CPO add the chosen answer's NLL. TRL takes the token mean over the whole batch's chosen tokens;
  here it is each pair's own token mean (−chosen_logps / chosen_tokens), so a pair's loss does not depend on the
  other pairs of its micro-batch. The two agree for one pair per micro-batch.
- KTO's KL estimate (mean over mismatched prompt/completion pairs of policy − reference log-probs, clamped at 0,
  detached) is a separate input: `kto_kl_estimate` computes it once per step (TRL: per batch), so micro-batches
  of one step share it and accumulate exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from magistune.data.sample import IGNORE_INDEX
from magistune.train.loss import CHUNK_TOKENS, cce_sum, cce_unusable, chunked_ce_sum, note_once, fallback_note


@dataclass
class PreferenceLossOutput:
    losses: torch.Tensor  # (B,) per pair (KTO: per example), differentiable; the step loss is Σ / pairs of the step
    chosen_rewards: torch.Tensor  # (B,) detached; KTO: the desirable examples' only
    rejected_rewards: torch.Tensor  # (B,) detached; KTO: the undesirable examples' only
    correct: torch.Tensor  # (B,) 1.0 where the rewards rank the pair right (KTO: reward > 0 iff desirable)

    def stats(self) -> dict[str, float]:
        """reward_chosen, reward_rejected (means), reward_margin (their difference), reward_accuracy."""
        chosen = self.chosen_rewards.float().mean().item() if self.chosen_rewards.numel() else float("nan")
        rejected = self.rejected_rewards.float().mean().item() if self.rejected_rewards.numel() else float("nan")
        return {"reward_chosen": chosen, "reward_rejected": rejected, "reward_margin": chosen - rejected,
                "reward_accuracy": self.correct.float().mean().item() if self.correct.numel() else float("nan")}


def _pair_output(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> PreferenceLossOutput:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return PreferenceLossOutput(losses, chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).float())


def _sigmoid_loss(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    # −(1−ε)·log σ(β·z) − ε·log σ(−β·z): the conservative DPO of Mitchell (2023); ε = 0 is the original DPO.
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0) -> PreferenceLossOutput:
    """Sigmoid DPO (Rafailov et al. 2023) on summed log-probs: z = (π_c − π_r) − (ref_c − ref_r);
    reward = β·(π − ref)."""
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    return _pair_output(_sigmoid_loss(logits, beta, label_smoothing),
                        beta * (policy_chosen_logps - ref_chosen_logps), beta * (policy_rejected_logps - ref_rejected_logps))


def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, beta: float = 0.1) -> PreferenceLossOutput:
    """IPO (Azar et al. 2023), TRL's way: log-probs averaged over each answer's tokens (policy and reference),
    z = (π̄_c − π̄_r) − (ref̄_c − ref̄_r), loss = (z − 1/(2β))²; reward = β·(π̄ − ref̄)."""
    pc, pr = policy_chosen_logps / chosen_tokens, policy_rejected_logps / rejected_tokens
    rc, rr = ref_chosen_logps / chosen_tokens, ref_rejected_logps / rejected_tokens
    logits = (pc - pr) - (rc - rr)
    return _pair_output((logits - 1 / (2 * beta)) ** 2, beta * (pc - rc), beta * (pr - rr))


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, stably (TRL writes torch.log1p(−torch.exp(x)), which is −inf sooner near 0)."""
    return torch.log(-torch.expm1(x))


def orpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
              beta: float = 0.1, nll_weight: float = 1.0) -> PreferenceLossOutput:
    """ORPO (Hong et al. 2024), as TRL's ORPOTrainer: on average log-probs p̄,
    log-odds = (p̄_c − p̄_r) − (log(1 − e^p̄_c) − log(1 − e^p̄_r)), loss = nll_weight·NLL_c − β·log σ(log-odds),
    NLL_c = −p̄_c (the chosen answer's token-mean NLL; TRL's weight is 1, `cpo_alpha` here); reward = β·p̄."""
    pc, pr = policy_chosen_logps / chosen_tokens, policy_rejected_logps / rejected_tokens
    log_odds = (pc - pr) - (_log1m_exp(pc) - _log1m_exp(pr))
    losses = nll_weight * -pc - beta * F.logsigmoid(log_odds)
    return _pair_output(losses, beta * pc, beta * pr)


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, beta: float = 0.1, gamma: float = 0.5,
               label_smoothing: float = 0.0, cpo_alpha: float = 1.0) -> PreferenceLossOutput:
    """SimPO (Meng et al. 2024) as TRL's CPOTrainer(loss_type="simpo"): on average log-probs p̄,
    z = p̄_c − p̄_r − γ/β, loss = −(1−ε)·log σ(β·z) − ε·log σ(−β·z) + cpo_alpha·NLL_c (NLL_c = −p̄_c; cpo_alpha 0 is
    pure SimPO, 1 is CPO-SimPO, TRL's default); reward = β·p̄."""
    pc, pr = policy_chosen_logps / chosen_tokens, policy_rejected_logps / rejected_tokens
    losses = _sigmoid_loss(pc - pr - gamma / beta, beta, label_smoothing)
    if cpo_alpha:
        losses = losses + cpo_alpha * -pc
    return _pair_output(losses, beta * pc, beta * pr)


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z₀: mean over mismatched (prompt_i, completion_j) pairs of policy − reference summed
    log-probs, clamped at 0 and detached (no gradient flows through it, as in TRL and the paper)."""
    return (policy_kl_logps - ref_kl_logps).detach().mean().clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> PreferenceLossOutput:
    """KTO (Ethayarajh et al. 2024) as TRL's KTOTrainer, on summed log-probs, r = π − ref:
    desirable: λ_D·(1 − σ(β·(r − z₀))); undesirable: λ_U·(1 − σ(β·(z₀ − r))); reward = β·r.
    `desirable` is a bool tensor (the records' labels), `kl` is kto_kl_estimate's z₀."""
    logratios = policy_logps - ref_logps
    desirable = desirable.to(torch.bool)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios))))
    rewards = (beta * logratios).detach()
    return PreferenceLossOutput(losses, rewards[desirable], rewards[~desirable], ((rewards > 0) == desirable).float())


def sequence_logps(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = CHUNK_TOKENS,
                   cce: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ log p(labels[b, t+1] | position t) over each row's labelled tokens, and their count: ((B,) fp32, (B,) long).

    hidden: the decoder's last hidden states (B, T, H); labels (B, T) aligned with the input ids (shifted here),
    IGNORE_INDEX where not trained. One sequence per row (no packing). Only labelled positions reach lm_head, a
    row at a time, through train/loss.py's chunked cross-entropy (≤ `chunk` positions of logits alive, recomputed
    in backward) or Cut Cross Entropy (`cce`, where it can run), so full-vocab logits of a whole sequence never
    exist. log p = −cross-entropy.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    sums = []
    for b in range(hidden.shape[0]):
        h, y = hidden[b, :-1][keep[b]], targets[b][keep[b]]
        why = cce_unusable(head, h) if cce and h.shape[0] else "no token"
        if cce and why is None:
            sums.append(-cce_sum(head, h, y))
            continue
        if cce and h.shape[0]:
            note_once(fallback_note(why))
        sums.append(-chunked_ce_sum(head, h, y, chunk))
    return torch.stack(sums).float(), keep.sum(dim=1)
