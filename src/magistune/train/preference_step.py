"""The forward of a micro-batch of preference pairs (DPO, IPO, ORPO, SimPO) or KTO examples: summed log-probs
of each answer, for the policy and for the reference, and the loss the config asks for.

One row per pair, the prompt encoded once. A pair whose prompt has P tokens, chosen answer C and rejected answer R
(PreferenceSample: chosen ids = prompt + C tokens, rejected ids = prompt + R tokens) is the row

    tokens     p0 … p(P−1) | c0 … c(C−1)     | r0 … r(R−1)
    positions  0  … P−1    | P  … P+C−1      | P  … P+R−1       (the rejected answer restarts where the prompt ends)
    attention  causal, except that rejected tokens do not see chosen tokens

so every rejected token sees exactly prompt + rejected tokens before it at the same positions as in the plain
sequence prompt + rejected, and its hidden state is the same (tests/train/test_train_preference_step.py checks
both answers' log-probs against two plain forwards, to 1e-5 in float32). A pair costs P + C + R tokens instead
of 2P + C + R: a 1,500-token prompt with two 300-token answers is 2,100 tokens instead of 3,600.

The shift. Token t is predicted from position t−1. c0 is predicted from p(P−1), as in the plain sequence; so is r0,
whose left neighbour in the row is c(C−1), not the prompt. The scoring therefore gathers, per answer, the hidden
states that predict it: chosen from row positions P−1 … P+C−1, rejected from P−1 and P+C … P+C+R−1, with the
sequence's own labels from P−1 on; preference_loss.sequence_logps then shifts and scores them as it would the
plain sequences, a chunk of logits at a time (no full-vocab logits of a row).

The mask is a 4D (B, 1, T, T) mask that transformers passes to the attention unchanged: boolean (True = attend)
for sdpa, additive (0 or the dtype's minimum) for eager. Flash and flex attention take no such mask: the recipe
says so before training (shared_row_unsupported).

Reference log-probs. With an adapter, the same model with its adapters switched off (PeftModel.disable_adapter())
under no_grad: no second copy of the weights. A full fine-tune reads them from a table precomputed before step 1
(preference_ref.py; train/dpo.py looks them up by sample index).

KTO rows are prompt + completion, one per example (no sharing), padded as SFT's batches.collate pads them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch

from magistune.data.sample import IGNORE_INDEX, KTOSample, PreferenceSample, Sample
from magistune.train.batches import collate, collate_images
from magistune.train.loss import decoder_and_head
from magistune.train.preference_loss import (PreferenceLossOutput, dpo_loss, ipo_loss, kto_kl_estimate, kto_loss,
                                             orpo_loss, sequence_logps, simpo_loss)

PROMPT, CHOSEN, REJECTED, PAD_SEGMENT = 0, 1, 2, 3  # what each row position holds
SHARED_ROW_ATTENTION = ("sdpa", "eager")


@dataclass
class PairBatch:
    """A micro-batch of pairs as shared-prompt rows, right-padded to the longest row (T tokens)."""

    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T): prompt 0…P−1, chosen P…P+C−1, rejected P…P+R−1, padding 0…
    segments: torch.Tensor  # (B, T): PROMPT, CHOSEN, REJECTED or PAD_SEGMENT
    chosen_index: torch.Tensor  # (B, Lc): the row positions whose hidden states score the chosen answer
    chosen_labels: torch.Tensor  # (B, Lc): its labels, aligned with chosen_index (shifted by sequence_logps)
    rejected_index: torch.Tensor  # (B, Lr)
    rejected_labels: torch.Tensor  # (B, Lr)
    sources: list[str]
    pixel_values: torch.Tensor | None = None  # the prompts' images, once per pair
    image_sizes: torch.Tensor | None = None

    @property
    def n_pairs(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_tokens(self) -> int:
        """Real tokens processed: P + C + R per pair."""
        return int((self.segments != PAD_SEGMENT).sum())

    def to(self, device: torch.device | str) -> "PairBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, **{k: move(getattr(self, k)) for k in (
            "input_ids", "position_ids", "segments", "chosen_index", "chosen_labels", "rejected_index",
            "rejected_labels", "pixel_values", "image_sizes")})

    def attention_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, 1, T, T): causal, padding keys hidden, rejected queries blind to chosen keys. Boolean (True =
        attend) when dtype is None, else additive in that dtype (0 = attend, the dtype's minimum = not)."""
        seg = self.segments
        t = seg.shape[1]
        causal = torch.ones((t, t), dtype=torch.bool, device=seg.device).tril()
        q, k = seg[:, :, None], seg[:, None, :]
        allowed = causal[None] & ~((q == REJECTED) & (k == CHOSEN)) & ((k != PAD_SEGMENT) | (q == PAD_SEGMENT))
        allowed = allowed[:, None]
        if dtype is None:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _check_pair(s: PreferenceSample) -> int:
    p = s.prompt_len
    if len(s.chosen_labels) != len(s.chosen_input_ids) or len(s.rejected_labels) != len(s.rejected_input_ids):
        raise ValueError(f"{s.source}: input ids and labels differ in length")
    if p == 0 or p != _first_label(s.rejected_labels) or s.chosen_input_ids[:p] != s.rejected_input_ids[:p]:
        raise ValueError(f"{s.source}: chosen and rejected do not share a prompt of {p} tokens")
    if p >= len(s.chosen_input_ids) or p >= len(s.rejected_input_ids):
        raise ValueError(f"{s.source}: an answer has no labelled token")
    return p


def _first_label(labels: list[int]) -> int:
    return next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate_pairs(samples: list[PreferenceSample], pad_id: int, image_encoder=None) -> PairBatch:
    """Shared-prompt rows of a micro-batch of pairs (see the module docstring for the layout)."""
    if not samples:
        raise ValueError("collate_pairs: empty micro-batch")
    ids, positions, segments, c_idx, c_lab, r_idx, r_lab = [], [], [], [], [], [], []
    for s in samples:
        p = _check_pair(s)
        chosen, rejected = s.chosen_input_ids[p:], s.rejected_input_ids[p:]
        c, r = len(chosen), len(rejected)
        ids.append(s.chosen_input_ids[:p] + chosen + rejected)
        positions.append(list(range(p + c)) + list(range(p, p + r)))
        segments.append([PROMPT] * p + [CHOSEN] * c + [REJECTED] * r)
        c_idx.append(list(range(p - 1, p + c)))
        c_lab.append(s.chosen_labels[p - 1:])
        r_idx.append([p - 1] + list(range(p + c, p + c + r)))
        r_lab.append(s.rejected_labels[p - 1:])
    width = max(len(row) for row in ids)
    for row in positions:  # the padding tail counts from 0, a sequence of its own (as packing.py's)
        row += range(width - len(row))
    pixels, sizes = collate_images(samples, image_encoder)
    return PairBatch(_pad(ids, pad_id), _pad(positions, 0), _pad(segments, PAD_SEGMENT), _pad(c_idx, 0),
                     _pad(c_lab, IGNORE_INDEX), _pad(r_idx, 0), _pad(r_lab, IGNORE_INDEX),
                     [s.source for s in samples], pixels, sizes)


@dataclass
class PairLogps:
    """Summed log-probs of each pair's answers, (B,) fp32, and their trained-token counts (B,)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def detach(self) -> "PairLogps":
        return PairLogps(self.chosen.detach(), self.rejected.detach(), self.chosen_tokens, self.rejected_tokens)


def attention_of(model: torch.nn.Module) -> str:
    body, _ = decoder_and_head(model)
    return body.config.get_text_config()._attn_implementation or "eager"


def shared_row_unsupported(model: torch.nn.Module) -> str | None:
    """Why this model cannot run shared-prompt rows (its attention takes no custom mask), or None."""
    impl = attention_of(model)
    if impl in SHARED_ROW_ATTENTION:
        return None
    return (f"attn_implementation {impl} takes no custom attention mask, which the shared-prompt pair rows need; "
            "use attn_implementation: sdpa with rl")


def _hidden(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    body, _ = decoder_and_head(model)
    if inputs.get("pixel_values") is not None:  # the vision tower's dtype, as in loss.token_loss_sum
        inputs["pixel_values"] = inputs["pixel_values"].to(body.get_input_embeddings().weight.dtype)
    else:
        inputs.pop("pixel_values", None), inputs.pop("image_sizes", None)
    return body(**inputs, use_cache=False).last_hidden_state


def _gather(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(hidden, 1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))


def pair_logps(model: torch.nn.Module, batch: PairBatch, cce: bool = False) -> PairLogps:
    """One forward of the shared-prompt rows → each answer's summed log-probs (differentiable)."""
    impl = attention_of(model)
    if impl not in SHARED_ROW_ATTENTION:
        raise ValueError(shared_row_unsupported(model))
    body, head = decoder_and_head(model)
    mask = batch.attention_mask(None if impl == "sdpa" else body.get_input_embeddings().weight.dtype)
    hidden = _hidden(model, {"input_ids": batch.input_ids, "position_ids": batch.position_ids,
                             "attention_mask": mask, "pixel_values": batch.pixel_values,
                             "image_sizes": batch.image_sizes})
    chosen, n_chosen = sequence_logps(head, _gather(hidden, batch.chosen_index), batch.chosen_labels, cce=cce)
    rejected, n_rejected = sequence_logps(head, _gather(hidden, batch.rejected_index), batch.rejected_labels, cce=cce)
    return PairLogps(chosen, rejected, n_chosen, n_rejected)


def disabled_adapters(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The reference model of an adapter run: the same weights with the adapters off (PEFT's disable_adapter)."""
    if not hasattr(model, "disable_adapter"):
        raise ValueError("the reference log-probs of a full fine-tune come from a precomputed table, not the model")
    return model.disable_adapter()


@torch.no_grad()
def reference_pair_logps(model: torch.nn.Module, batch: PairBatch, cce: bool = False) -> PairLogps:
    """The reference model's log-probs of the same rows: adapters off, no gradient."""
    with disabled_adapters(model):
        return pair_logps(model, batch, cce).detach()


def collate_kto(samples: list[Sample], pad_id: int, image_encoder=None):
    """KTO rows: prompt + completion, one per example, as batches.collate pads them."""
    return collate(samples, pad_id, image_encoder)


def sample_logps(model: torch.nn.Module, batch, cce: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's labelled tokens (a batches.Batch of KTO rows), and their counts."""
    _, head = decoder_and_head(model)
    hidden = _hidden(model, batch.model_inputs())
    return sequence_logps(head, hidden, batch.labels, cce=cce)


def kto_kl_rows(samples: list[KTOSample]) -> list[Sample]:
    """The mismatched (prompt_i, completion_{i−1}) rows of KTO's KL estimate (data.preference.kto_mismatched),
    with example i's images."""
    from magistune.data.preference import kto_mismatched

    return [Sample(ids, labels, f"{s.source} (KL)", s.images) for s, (ids, labels) in zip(samples, kto_mismatched(samples))]


@torch.no_grad()
def kto_rows_kl(model: torch.nn.Module, rows: list[Sample], pad_id: int, micro_batch_size: int, image_encoder=None,
                ref_logps: torch.Tensor | None = None, cce: bool = False, autocast=contextlib.nullcontext) -> torch.Tensor:
    """KTO's z₀ over KL rows (kto_kl_rows): policy − reference summed log-probs, averaged, clamped at 0, detached.
    `ref_logps` (one per row) from a precomputed table; without it the reference is the model with adapters off."""
    device = _device(model)
    policy, ref = [], []
    for i in range(0, len(rows), micro_batch_size):
        batch = collate_kto(rows[i:i + micro_batch_size], pad_id, image_encoder).to(device)
        with autocast():
            policy.append(sample_logps(model, batch, cce)[0])
            if ref_logps is None:
                with disabled_adapters(model):
                    ref.append(sample_logps(model, batch, cce)[0])
    ref_all = torch.cat(ref) if ref_logps is None else ref_logps.to(device)
    return kto_kl_estimate(torch.cat(policy), ref_all)


def kto_step_kl(model: torch.nn.Module, samples: list[KTOSample], pad_id: int, micro_batch_size: int,
                image_encoder=None, cce: bool = False) -> torch.Tensor:
    """KTO's z₀ for a list of examples: their mismatched rows (kto_kl_rows), the reference with adapters off."""
    return kto_rows_kl(model, kto_kl_rows(samples), pad_id, micro_batch_size, image_encoder, cce=cce)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def pair_loss(cfg, policy: PairLogps, ref: PairLogps | None) -> PreferenceLossOutput:
    """The per-pair losses of `cfg.rl` (dpo, ipo, orpo, simpo) with the config's coefficients."""
    beta = cfg.rl_beta
    if cfg.rl == "dpo":
        return dpo_loss(policy.chosen, policy.rejected, ref.chosen, ref.rejected, beta, cfg.dpo_label_smoothing)
    if cfg.rl == "ipo":
        return ipo_loss(policy.chosen, policy.rejected, ref.chosen, ref.rejected, policy.chosen_tokens,
                        policy.rejected_tokens, beta)
    if cfg.rl == "orpo":
        return orpo_loss(policy.chosen, policy.rejected, policy.chosen_tokens, policy.rejected_tokens, beta,
                         cfg.cpo_alpha)
    if cfg.rl == "simpo":
        return simpo_loss(policy.chosen, policy.rejected, policy.chosen_tokens, policy.rejected_tokens, beta,
                          cfg.simpo_gamma, cfg.dpo_label_smoothing, cfg.cpo_alpha)
    raise ValueError(f"pair_loss: rl {cfg.rl!r} is not a pairwise loss")


def example_loss(cfg, policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
                 kl: torch.Tensor) -> PreferenceLossOutput:
    """KTO's per-example losses with the config's coefficients."""
    return kto_loss(policy_logps, ref_logps, desirable, kl, cfg.rl_beta, cfg.kto_desirable_weight,
                    cfg.kto_undesirable_weight)


@dataclass
class PreferenceTotals:
    """Sums over the pairs (KTO: examples) of a step, a logging window or an eval: the loss and the rewards."""

    loss_sum: float = 0.0
    n_items: int = 0  # pairs (KTO: examples): the loss divisor
    n_tokens: int = 0  # real tokens processed (tokens/s)
    seconds: float = 0.0
    chosen_sum: float = 0.0  # Σ chosen rewards (KTO: desirable examples')
    n_chosen: int = 0
    rejected_sum: float = 0.0
    n_rejected: int = 0
    correct: float = 0.0  # Σ correctly ranked
    n_ranked: int = 0

    def add(self, out: PreferenceLossOutput, n_tokens: int) -> None:
        self.loss_sum += float(out.losses.detach().double().sum())
        self.n_items += out.losses.shape[0]
        self.n_tokens += n_tokens
        self.chosen_sum += float(out.chosen_rewards.double().sum())
        self.n_chosen += out.chosen_rewards.numel()
        self.rejected_sum += float(out.rejected_rewards.double().sum())
        self.n_rejected += out.rejected_rewards.numel()
        self.correct += float(out.correct.double().sum())
        self.n_ranked += out.correct.numel()

    def merge(self, other: "PreferenceTotals") -> None:
        for k, v in other.__dict__.items():
            setattr(self, k, getattr(self, k) + v)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.n_items if self.n_items else float("nan")

    def stats(self) -> dict[str, float]:
        """loss, reward_chosen, reward_rejected, reward_margin, reward_accuracy (means; NaN where none)."""
        mean = lambda s, n: s / n if n else float("nan")  # noqa: E731
        chosen, rejected = mean(self.chosen_sum, self.n_chosen), mean(self.rejected_sum, self.n_rejected)
        return {"loss": self.loss, "reward_chosen": chosen, "reward_rejected": rejected,
                "reward_margin": chosen - rejected, "reward_accuracy": mean(self.correct, self.n_ranked)}

    def to_dict(self) -> dict:
        return dict(self.__dict__)


__all__ = ["PairBatch", "PairLogps", "PreferenceTotals", "collate_kto", "collate_pairs", "disabled_adapters", "example_loss",
           "kto_kl_rows", "kto_rows_kl", "kto_step_kl", "pair_logps", "pair_loss", "reference_pair_logps", "sample_logps",
           "shared_row_unsupported"]
