"""The generation loop: left-padded batches, a KV cache, temperature + top-p sampling, a stop on `</s>`.

A small loop rather than `model.generate`, so that what it does is all here: every row stops on its own
`</s>`, each step's ids are handed to a callback (the chat streams them), and the seed drives one
`torch.Generator`. tests/infer/test_infer_sampling.py checks it against transformers' greedy `generate`.

Left padding. Prompts of 5 and 3 tokens become

    ids   [a a a a a]      mask [1 1 1 1 1]     positions [0 1 2 3 4]
          [P P b b b]           [0 0 1 1 1]               [1 1 0 1 2]

so every row's last prompt token sits in the last column and the next token of every row is predicted by the
same position of the output. Positions count real tokens only (cumsum of the mask − 1), so row 2 sees exactly
the positions it would see alone; padded slots get position 1 (any value: the mask hides them) as HF does.
Each step appends one column: a 1 to the mask and last position + 1.

Memory. The cache holds 2 (k, v) × layers × kv_heads × head_dim × bf16 per token per row: Magistral Small
is 2 × 40 × 8 × 128 × 2 B = 160 KiB per token, so 40,960 tokens = 6.25 GiB per row. The prefill computes
logits for the last position only (logits_to_keep=1): 131,072 × 4 B per row instead of × prompt length.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.95
    max_tokens: int = 40960
    seed: int | None = None  # None: torch's global RNG (unseeded unless the caller seeded it)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


def sample_next(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits → (B,) ids. Top-p keeps the most likely tokens whose mass before them is ≤ top_p: with
    probabilities 0.5, 0.3, 0.15, 0.05 and top_p 0.7 the masses before them are 0, 0.5, 0.8, 0.95, so the
    first two stay (0.5 + 0.3 = 0.8 ≥ 0.7 covers the nucleus) and are renormalised to 0.625, 0.375."""
    logits = logits.float()
    if opts.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / opts.temperature, dim=-1)
    if opts.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before > opts.top_p, 0.0)  # the first token always stays (0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # multinomial renormalises


def make_generator(opts: SamplingOptions, device: torch.device) -> torch.Generator | None:
    """One seeded generator for a whole session or file, so consecutive calls continue one random stream."""
    if opts.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(opts.seed)


def cache_name(model: nn.Module) -> str:
    """The KV cache's keyword: `cache` in transformers ≥ 5.2x (`past_key_values` is deprecated there), else
    `past_key_values`. Asked of the forward signature, since an unknown keyword would be swallowed by
    **kwargs and silently run without a cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def max_positions(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.max_position_embeddings)


@torch.no_grad()
def generate_ids(model: nn.Module, prompts: list[list[int]], eos: int, pad: int, opts: SamplingOptions,
                 on_step: Callable[[list[int | None]], None] | None = None,
                 generator: torch.Generator | None = None, images: dict | None = None) -> list[list[int]]:
    """Generate for every prompt at once. Returns each row's new ids, ending with `eos` when it stopped.

    A row stops at `eos`, after `opts.max_tokens` ids, or when it reaches the model's max_position_embeddings.
    `on_step` receives, after each step, every row's new id (None for rows already done). `generator` (from
    make_generator) continues a seeded stream; without one, a fresh one is seeded from opts.seed. `images`:
    pixel_values / image_sizes of every prompt's images in token order (prompts.image_inputs), for the prefill.
    Raises ValueError if a prompt is empty or already fills the context.
    """
    device = next(model.parameters()).device
    limit = max_positions(model)
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if len(p) >= limit:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the model's context is {limit}")
    budget = [min(opts.max_tokens, limit - len(p)) for p in prompts]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    generator = generator if generator is not None else make_generator(opts, device)

    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    kv = cache_name(model)
    result = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                   **(images or {}))
    cache = result[kv]
    while True:
        next_ids = sample_next(result.logits[:, -1, :], opts, generator).tolist()
        step: list[int | None] = []
        for i, t in enumerate(next_ids):
            if done[i]:
                step.append(None)
                continue
            out[i].append(t)
            step.append(t)
            done[i] = t == eos or len(out[i]) >= budget[i]
        if on_step is not None:
            on_step(step)
        if all(done):
            return out
        # Finished rows keep receiving a pad id; their outputs are never read again.
        feed = torch.tensor([[pad if s is None else s] for s in step], dtype=torch.long, device=device)
        mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
        positions = positions[:, -1:] + 1
        result = model(input_ids=feed, attention_mask=mask, position_ids=positions, use_cache=True, **{kv: cache})
        cache = result[kv]
