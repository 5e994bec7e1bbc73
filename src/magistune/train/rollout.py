"""GRPO's rollouts: sampling completions from the policy, parsing them, and the per-token log-probs of the trained
tokens.

`generate_rollouts(model, prompts_ids, ...)` is the one seam for sampling (left-padded batch, temperature + top-p,
stop on `</s>`), with the adapters active, in eval mode (no dropout). On CUDA it runs model/static_generation.py's
sampler (a static KV cache, the decode step replayed from a CUDA graph) where that supports the model, elsewhere
the plain KV-cache loop of model/generation.py; both give the same ids for the same generator (tests/model).

Log-probs. The loss needs log π_θ(token) for every completion token under the policy being trained. They are
computed by a training forward over prompt + completion (right-padded), from the hidden states of the positions
that predict completion tokens only, `CHUNK_TOKENS` rows of logits at a time (or Cut Cross Entropy's kernel on
CUDA with reduction="none"): never the full vocabulary for the whole sequence. Like TRL, the logits are divided
by the sampling temperature first, so π_θ is the distribution that was sampled from, before top-p truncation.

Old-policy log-probs (the ratio's denominator). With num_iterations 1 the rollouts were sampled by the very
weights being updated, so π_θ_old = π_θ and the recipe uses the policy's own log-probs, detached: ratio =
exp(logp − logp.detach()) = 1 exactly at the first (only) update, with the gradient of logp. We do not use the
sampler's own probabilities: top-p renormalises them over the nucleus, which is not the policy's distribution,
so the ratio would not be 1. With num_iterations > 1 they are computed once per rollout batch by a forward
without gradient (eval mode) before the first update, and kept for the next ones.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from torch.utils.checkpoint import checkpoint

from magistune.model.generation import SamplingOptions, generate_ids
from magistune.model.static_generation import generate_ids_static, static_unsupported
from magistune.tokenizer import SpecialIds
from magistune.train.loss import CHUNK_TOKENS, cce_unusable, decoder_and_head, fallback_note, note_once


@torch.no_grad()
def generate_rollouts(model: nn.Module, prompts_ids: list[list[int]], eos: int, pad: int, max_new_tokens: int,
                      temperature: float, top_p: float, generator: torch.Generator,
                      autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                      fast: bool | None = None) -> list[list[int]]:
    """One completion per prompt (repeat a prompt G times for G completions), each ending with `eos` when the
    model stopped, else `max_new_tokens` long. Sampling draws from `generator` only (a resumed run that seeds
    it the same way samples the same completions). `fast`: the static-cache sampler (None: on CUDA when it
    supports the model; True: wherever it does, eagerly off CUDA; False: the plain loop)."""
    opts = SamplingOptions(temperature, top_p, max_new_tokens)
    if fast is None:
        fast = next(model.parameters()).device.type == "cuda"
    if fast and static_unsupported(model) is not None:
        fast = False
    was_training = model.training
    model.eval()
    try:
        with autocast():
            if fast:
                return generate_ids_static(model, prompts_ids, eos, pad, opts, generator=generator)
            return generate_ids(model, prompts_ids, eos, pad, opts, generator=generator)
    finally:
        model.train(was_training)


# --- completions as the reward functions see them ---------------------------------------------------------

def split_completion(ids: list[int], special: SpecialIds) -> tuple[list[int], list[int], bool]:
    """(thinking ids, answer ids, had [THINK]) of generated ids: the ids inside [THINK]…[/THINK] are thinking (an
    unclosed block runs to the end), the others answer; delimiters and everything from `</s>` on are neither."""
    thinking: list[int] = []
    answer: list[int] = []
    inside = had = False
    for t in ids:
        if t == special.eos:
            break
        if special.has_think and t == special.begin_think:
            inside = had = True
        elif special.has_think and t == special.end_think:
            inside = False
        else:
            (thinking if inside else answer).append(t)
    return thinking, answer, had


def completion_message(tokenizer, ids: list[int], special: SpecialIds) -> list[dict]:
    """TRL's conversational completion: [{"role": "assistant", "content": answer, "reasoning_content": …}]."""
    raw = tokenizer.instruct_tokenizer.tokenizer
    thinking, answer, had = split_completion(ids, special)

    def text(x: list[int]) -> str:
        return raw.decode(x, special_token_policy=SpecialTokenPolicy.KEEP)

    return [{"role": "assistant", "content": text(answer), "reasoning_content": text(thinking) if had else None}]


# --- log-probs of the completion tokens ---------------------------------------------------------------------

@dataclass
class RolloutBatch:
    """Prompt + completion rows, right-padded: (B, T) ids and mask; (B, C) completion mask, C = longest completion."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    predicts: torch.Tensor  # (B, T − 1) True where hidden[:, t] predicts a completion token (input_ids[:, t + 1])
    completion_mask: torch.Tensor  # (B, C) 1 on each completion's tokens, left-aligned

    @classmethod
    def collate(cls, prompts: list[list[int]], completions: list[list[int]], pad: int) -> "RolloutBatch":
        rows = [p + c for p, c in zip(prompts, completions)]
        width, c_width = max(len(r) for r in rows), max(max(len(c) for c in completions), 1)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        predicts = torch.zeros((len(rows), width - 1), dtype=torch.bool)
        cmask = torch.zeros((len(rows), c_width), dtype=torch.float32)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
            mask[i, :len(p) + len(c)] = 1
            predicts[i, len(p) - 1:len(p) + len(c) - 1] = True  # position t predicts token t + 1
            cmask[i, :len(c)] = 1
        return cls(ids, mask, predicts, cmask)

    def to(self, device: torch.device) -> "RolloutBatch":
        return RolloutBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.predicts,
                                                       self.completion_mask)))


def _logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(hidden).float() / temperature
    return -F.cross_entropy(logits, targets, reduction="none")


def chunked_token_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                        chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """log softmax(head(hidden[i]) / T)[targets[i]] for N rows, `chunk` rows of logits at a time (recomputed in
    backward inside a checkpoint, as loss.chunked_ce_sum does)."""
    if hidden.shape[0] <= chunk:
        return _logps(head, hidden, targets, temperature)
    out = []
    for i in range(0, hidden.shape[0], chunk):
        h, y = hidden[i:i + chunk], targets[i:i + chunk]
        if torch.is_grad_enabled():
            out.append(checkpoint(_logps, head, h, y, temperature, use_reentrant=False))
        else:
            out.append(_logps(head, h, y, temperature))
    return torch.cat(out)


def cce_token_logps(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """The same by Cut Cross Entropy (CUDA): logits / T = (hidden / T) · Wᵀ, so the hidden states are scaled."""
    from cut_cross_entropy import linear_cross_entropy

    w = head.weight
    return -linear_cross_entropy((hidden / temperature).to(w.dtype), w, targets, reduction="none").float()


def completion_logps(model: nn.Module, batch: RolloutBatch, temperature: float, cce: bool = False) -> torch.Tensor:
    """(B, C) log π_θ of each completion token (0 on padding), with gradient when grad is enabled."""
    body, head = decoder_and_head(model)
    hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    h, y = hidden[:, :-1][batch.predicts], batch.input_ids[:, 1:][batch.predicts]
    flat = None
    if cce and h.shape[0]:
        why = cce_unusable(head, h)
        if why is None:
            flat = cce_token_logps(head, h, y, temperature)
        else:
            note_once(fallback_note(why))
    if flat is None:
        flat = chunked_token_logps(head, h, y, temperature)
    out = torch.zeros(batch.completion_mask.shape, dtype=flat.dtype, device=flat.device)
    out[batch.completion_mask.bool()] = flat  # row-major order on both sides: row i's tokens in order
    return out


@torch.no_grad()
def rollout_logps(model: nn.Module, prompts: list[list[int]], completions: list[list[int]], pad: int,
                  micro_batch_size: int, temperature: float, device: torch.device,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                  ) -> list[list[float]]:
    """Each completion's token log-probs without gradient, in eval mode (old-policy log-probs for num_iterations
    > 1; the reference's under `model.disable_adapter()`)."""
    was_training = model.training
    model.eval()
    out: list[list[float]] = []
    try:
        for s in range(0, len(prompts), micro_batch_size):
            batch = RolloutBatch.collate(prompts[s:s + micro_batch_size], completions[s:s + micro_batch_size], pad)
            with autocast():
                logp = completion_logps(model, batch.to(device), temperature).float().cpu()
            out += [row[:len(c)].tolist() for row, c in zip(logp, completions[s:s + micro_batch_size])]
    finally:
        model.train(was_training)
    return out


# --- one rollout batch, as the recipe keeps (and checkpoints) it -----------------------------------------------

@dataclass
class Rollouts:
    """N = prompts × G completions with their rewards; the log-probs that num_iterations > 1 and β > 0 need."""

    prompt_index: list[int]  # into the prompt list, per completion
    prompt_ids: list[list[int]]
    completions: list[list[int]]  # generated ids, </s> last when the model stopped
    stopped: list[bool]
    rewards: list[float]  # total
    per_func: dict[str, list[float]]  # NaN where a function returned None
    texts: list[list[dict]]  # the completions as the reward functions saw them
    mask_truncated: bool = False
    old_logps: list[list[float]] | None = None
    ref_logps: list[list[float]] | None = None

    def train_masks(self) -> list[list[int]]:
        """1 per trained completion token: every generated token (</s> when produced); a truncated completion is
        not trained at all with mask_truncated_completions."""
        return [[0 if self.mask_truncated and not s else 1] * len(c) for c, s in zip(self.completions, self.stopped)]

    def padded(self, name: str, idx: list[int], like: torch.Tensor) -> torch.Tensor:
        values = getattr(self, name)
        out = torch.zeros_like(like, dtype=torch.float32)
        for row, i in enumerate(idx):
            out[row, :len(values[i])] = torch.tensor(values[i], dtype=torch.float32)
        return out.to(like.dtype)

    def metrics(self, loss: float, clipped: int, kl: float, tokens: int, group_size: int, dropped: bool) -> dict:
        rewards = torch.tensor(self.rewards, dtype=torch.float64)
        groups = rewards.view(-1, group_size)
        row = {"loss": loss, "reward": float(rewards.mean()), "reward_std": float(groups.std(dim=1).mean())}
        for name, values in self.per_func.items():
            v = torch.tensor(values, dtype=torch.float64)
            row[f"rewards/{name}"] = float(v.nanmean()) if not v.isnan().all() else None
        row["completion_length"] = sum(len(c) for c in self.completions) / len(self.completions)
        row["truncated_ratio"] = 1 - sum(self.stopped) / len(self.stopped)
        row["filtered_groups"] = int((groups.max(dim=1).values == groups.min(dim=1).values).sum())
        row |= {"clipped": clipped, "tokens": tokens} | ({"kl": kl} if self.ref_logps is not None else {})
        return row

    def samples(self, n: int, prompts: list) -> list[dict]:
        """The first n completions (the first prompt's group) for samples.jsonl."""
        out = []
        for i in range(min(n, len(self.completions))):
            p = prompts[self.prompt_index[i]]
            out.append({"source": p.source, "prompt": p.prompt, "completion": self.texts[i][0],
                        "reward": self.rewards[i], "rewards": {k: v[i] for k, v in self.per_func.items()},
                        "tokens": len(self.completions[i]), "stopped": self.stopped[i]})
        return out

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "Rollouts":
        return cls(**d)
