"""Variable-length attention for packed rows on the GPU: torch.nn.attention.varlen, no mask tensor.

With `sample_packing` every row holds several samples. transformers' sdpa path keeps them apart with a dense
block-diagonal mask (B × 1 × T × T booleans, 64 MiB per 8,192-token row) and, given a mask, cannot use the flash
kernel. PyTorch's own `varlen_attn` (flash attention over the flattened B × T tokens) takes the sample boundaries
as cumulative lengths instead, the same `cu_seq_lens` that flash-attn 2 takes (batches.cu_seq_lens_varlen).

Without that kernel (the CPU) the same boundaries drive a loop over the samples, each one causal attention of its
own through F.scaled_dot_product_attention: memory grows with the longest sample's attention, never with the
row's T × T (a 131,072-token packed row's dense mask alone would be 16 GiB of booleans).

It is registered with transformers' AttentionInterface as "magistune_varlen". transformers builds no mask for an
attention function it does not know, so:
    packed rows (cu_seq_lens_q in the kwargs)  → varlen_attn, causal, one sequence per sample
    anything else                               → transformers' own sdpa function: right-padded rows are exact
                                                  under the causal rule (no real token sees a later pad), and
                                                  Pixtral's attention brings its own block mask between images.
Generation (left padding needs the mask) never uses it: only training picks it (resolve_attn(training=True)), on
CUDA and on the CPU.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.mistral.modeling_mistral import MistralAttention

NAME = "magistune_varlen"


@functools.cache
def varlen_kernel():
    """torch.nn.attention.varlen.varlen_attn and the keyword names this torch gives it, or None without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def available(device: torch.device) -> bool:
    """Whether torch's varlen kernel runs here (else varlen_attention loops over the samples)."""
    return device.type == "cuda" and varlen_kernel() is not None


def per_sample_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                         scaling: float | None) -> torch.Tensor:
    """(N, H, D) flattened tokens, samples at cu[i]:cu[i+1] → (N, H, D): causal attention inside each sample."""
    groups = q.shape[1] // k.shape[1]
    lengths = cu.diff().tolist()  # split, not one slice each: its backward is one concatenation, where slices'
    out = []                      # would each fill a zero tensor of all N tokens (quadratic in the sample count)
    for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
        qs, ks, vs = (x.transpose(0, 1)[None] for x in (qs, ks, vs))  # (1, H, n, D): 4-D, which the CPU's flash
        if groups > 1:                                                   # kernel needs (3-D: the math one, 20×
            ks, vs = ks.repeat_interleave(groups, dim=1), vs.repeat_interleave(groups, dim=1)  # slower)
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling)[0].transpose(0, 1))
    return torch.cat(out)


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (B, H, T, D), key/value (B, H_kv, T, D) → (B, T, H, D)."""
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is None or not isinstance(module, MistralAttention):  # Pixtral's patches: never the text's boundaries
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise ValueError(f"{NAME}: attention dropout {dropout} is not supported (Mistral's is 0)")
    b, h, t, d = query.shape  # cu_q must end at b × t (batches.cu_seq_lens_varlen); not checked here: a host sync
    q = query.transpose(1, 2).reshape(b * t, h, d)  # the flattened B × T tokens, as cu_seq_lens counts them
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], d)
    if not available(query.device):
        return per_sample_attention(q, k, v, cu_q, scaling).view(b, t, h, d), None
    kernel, params = varlen_kernel()
    extra = {}
    if "enable_gqa" in params:  # 32 query heads share 8 key/value heads
        extra["enable_gqa"] = k.shape[1] != h
    elif k.shape[1] != h:
        k, v = (x.repeat_interleave(h // x.shape[1], dim=1) for x in (k, v))
    if "window_size" in params:  # torch ≥ 2.12 spells causal as a window
        extra["window_size"] = (-1, 0)
    else:
        extra["is_causal"] = True
    if "scale" in params and scaling is not None:
        extra["scale"] = scaling
    out = kernel(q, k, v, cu_q, kwargs["cu_seq_lens_k"], kwargs["max_length_q"], kwargs["max_length_k"], **extra)
    return out.view(b, t, h, d), None


@functools.cache
def register() -> str:
    """Make NAME a valid attn_implementation (once per process)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention)
    return NAME
