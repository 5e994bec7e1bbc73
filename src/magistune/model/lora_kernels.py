"""Fused LoRA projections (Axolotl's lora_qkv_kernel, lora_o_kernel, lora_mlp_kernel), our own autograd Function.

PEFT computes each LoRA linear on its own: base(x), dropout(x), A, B, ·scale, + — for q, k and v that is three
dropouts of the same x, three scale passes and three adds over the outputs, all elementwise (27% of a QLoRA step
at seq 2048 on Magistral Small, bench/results/profile_seq2048_2026-11-29.txt). Here the projections that share
one input (q,k,v; gate,up; o and down alone) run as one Function:

    forward   y_i = x·W_iᵀ + s_i·(d·A_iᵀ)·B_iᵀ     d = x⊙m/(1-p), m: ONE dropout mask for the group (one kernel)
              the d·A_iᵀ of the group are one matmul (A's stacked), the LoRA term is added by addmm into x·W_iᵀ
    backward  g_i = s_i·dy_i·B_i                        (tokens × r: small)
              dx  = Σ_i dy_i·W_i + (Σ_i g_i·A_i) ⊙ m/(1-p)   (one addmm chain; with dropout one addcmul)
              dA_i = g_iᵀ·d    dB_i = s_i·dy_iᵀ·(d·A_iᵀ)    (the A's in one matmul)
    saved     d (x itself without dropout), m as bool, the small d·A_iᵀ; W_i is dequantised again in backward (NF4
              bases: bitsandbytes' dequantize_4bit), or kept from the recompute when KEEP_DEQUANTISED_WEIGHTS is set.

Dropout: PEFT draws one mask per projection; here q, k and v (and gate, up) share one mask. Each projection's
LoRA input is still x with each feature zeroed independently with probability p and the rest scaled by 1/(1-p),
so every projection's update has the same distribution; only the masks of the group are now the same draw
(correlated across q/k/v rather than independent).

Precision: under autocast everything runs in the autocast dtype (bf16 on the GPU), as PEFT's layers do under
autocast; without autocast in x's dtype. LoRA gradients are returned in the LoRA weights' dtype (fp32).
"""

from __future__ import annotations

import torch
import torch.nn as nn

# Keep the dequantised base weights of a layer from its checkpoint recompute to its backward (no third
# dequantisation). apply_lora_kernels honours it only with gradient checkpointing: the first forward's saved
# tensors are dropped by the checkpoint, so only the layer being recomputed holds its weights, one layer at a time:
# Magistral Small 555.7M params × 2 B = 1.1 GB more peak memory. (Without checkpointing every layer would keep its
# weights: the whole model in bf16.) Off by default; measure-ready: bench/train_step.py --keep-weights.
KEEP_DEQUANTISED_WEIGHTS = False


def base_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's (out, in) weight in `dtype`: NF4/FP4 bitsandbytes weights dequantised, others as they are.
    Under FSDP2 `linear.weight` is the all-gathered packed tensor, a plain Parameter without the quant_state:
    bitsandbytes keeps it on the Linear4bit as well (its own forward recovers it from there the same way)."""
    w = linear.weight
    state = getattr(w, "quant_state", None)
    if state is None:
        state = getattr(linear, "quant_state", None)
    if state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, state).to(dtype)
    return w.to(dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def dropout(x2d: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x⊙m/(1-p), m): the group's one dropout mask m (bool, kept with probability 1-p), one kernel."""
    return torch.native_dropout(x2d, p, True)


class LoRAGroupFunction(torch.autograd.Function):
    """y_i = x·W_iᵀ + s_i·(drop(x)·A_iᵀ)·B_iᵀ for the base layers `bases` sharing input x (see the module)."""

    @staticmethod
    def forward(ctx, x, bases, scales, p, keep, *lora):
        dtype = compute_dtype(x)
        lead, d_in = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, d_in).to(dtype)
        a_list, b_list = [t.to(dtype) for t in lora[0::2]], [t.to(dtype) for t in lora[1::2]]
        ranks = [a.shape[0] for a in a_list]
        xd, mask = dropout(x2, p) if p > 0 else (x2, None)
        a_cat = torch.cat(a_list) if len(a_list) > 1 else a_list[0]  # (Σ r_i, in)
        with torch.autocast(x.device.type, enabled=False):
            xa = xd @ a_cat.t()  # (tokens, Σ r_i): one matmul for the group
            outs, kept = [], []
            for i, (xa_i, b) in enumerate(zip(xa.split(ranks, dim=1), b_list)):
                w = base_weight(bases[i], dtype)
                y = x2 @ w.t()
                y.addmm_(xa_i, b.t(), alpha=scales[i])  # the LoRA term lands in the base output: no extra pass
                outs.append(y.view(*lead, y.shape[-1]))
                if keep:
                    kept.append(w)
        ctx.save_for_backward(xd, mask, xa, *b_list, a_cat, *kept)
        ctx.bases, ctx.scales, ctx.p, ctx.ranks, ctx.dtype, ctx.kept = bases, scales, p, ranks, dtype, bool(kept)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.lora_dtypes = [t.dtype for t in lora]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        n = len(ctx.bases)
        xd, mask, xa, *rest = ctx.saved_tensors
        b_list, a_cat, kept = rest[:n], rest[n], rest[n + 1:]
        dtype = ctx.dtype
        with torch.autocast(xd.device.type, enabled=False):
            dy = [(d if d is not None else torch.zeros(xd.shape[0], b.shape[0], device=xd.device))
                  .reshape(-1, b.shape[0]).to(dtype) for d, b in zip(dys, b_list)]
            g = torch.cat([d @ (b * s) for d, b, s in zip(dy, b_list, ctx.scales)], dim=1)  # (tokens, Σ r_i)
            grads = []
            d_a_cat = g.t() @ xd  # (Σ r_i, in): one matmul for the group's A gradients
            for i, (d_a, xa_i) in enumerate(zip(d_a_cat.split(ctx.ranks), xa.split(ctx.ranks, dim=1))):
                d_b = dy[i].t() @ (xa_i * ctx.scales[i])  # (out, r)
                grads += [d_a.to(ctx.lora_dtypes[2 * i]), d_b.to(ctx.lora_dtypes[2 * i + 1])]
            dx = None
            if ctx.needs_input_grad[0]:
                for i, base in enumerate(ctx.bases):
                    w = kept[i] if ctx.kept else base_weight(base, dtype)
                    dx = dy[i] @ w if dx is None else dx.addmm_(dy[i], w)
                if mask is None:
                    dx.addmm_(g, a_cat)
                else:
                    dx.addcmul_(g @ a_cat, mask, value=1.0 / (1.0 - ctx.p))  # through the shared mask
                dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        return (dx, None, None, None, None, *grads)


def lora_parts(module: nn.Module):
    """(base layer, adapter name) of a PEFT LoRA linear that the Function can compute now, else None:
    adapters disabled (DPO's reference pass), merged, or not exactly one plain-LoRA adapter active."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer) or module.disable_adapters or module.merged:
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1 or active[0] in module.lora_variant:
        return None
    return module.get_base_layer(), active[0]


def lora_dropout_p(module: nn.Module, adapter: str) -> float:
    drop = module.lora_dropout[adapter]
    return float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0


def lora_group(x: torch.Tensor, modules: tuple[nn.Module, ...], keep_weights: bool = False) -> list[torch.Tensor]:
    """[m(x) for m in modules] for PEFT LoRA linears sharing the input x: one fused Function when all of them
    can run it with one dropout rate, else each module's own forward (same result, PEFT's way).
    `keep_weights`: save the dequantised base weights for backward (see KEEP_DEQUANTISED_WEIGHTS)."""
    parts = [lora_parts(m) for m in modules]
    rates = {lora_dropout_p(m, part[1]) for m, part in zip(modules, parts) if part is not None}
    if any(part is None for part in parts) or len(rates) != 1:
        return [m(x) for m in modules]
    lora = []
    for m, (_, adapter) in zip(modules, parts):
        lora += [m.lora_A[adapter].weight, m.lora_B[adapter].weight]
    bases = tuple(base for base, _ in parts)
    scales = tuple(float(m.scaling[adapter]) for m, (_, adapter) in zip(modules, parts))
    return list(LoRAGroupFunction.apply(x, bases, scales, rates.pop(), keep_weights, *lora))


def _mistral_attention_class():
    from transformers.models.mistral.modeling_mistral import MistralAttention

    return MistralAttention


class LoRAFusedAttention(_mistral_attention_class()):
    """MistralAttention whose q,k,v (`fuse_qkv`) and/or o (`fuse_o`) run through lora_group.

    Built from a MistralAttention after PEFT wrapped its linears: the same child modules under the same names
    (q_proj, k_proj, v_proj, o_proj), so parameter names, saved adapters, merge and resume do not change.
    The rest of forward is MistralAttention's (transformers 5.x): rotary, cache, the configured attention
    function (sdpa, flash, flex, magistune's varlen for packed rows; all token-wise around the projections).
    """

    def __init__(self, attn: nn.Module, fuse_qkv: bool, fuse_o: bool, keep_weights: bool = False):
        nn.Module.__init__(self)  # not MistralAttention.__init__: that would build new linears
        for name in ("config", "layer_idx", "head_dim", "num_key_value_groups", "scaling", "attention_dropout",
                     "is_causal"):
            setattr(self, name, getattr(attn, name))
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.fuse_qkv, self.fuse_o, self.keep_weights = fuse_qkv, fuse_o, keep_weights
        self.train(attn.training)

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        from transformers.models.mistral.modeling_mistral import (
            ALL_ATTENTION_FUNCTIONS, apply_rotary_pos_emb, eager_attention_forward,
        )

        cache = kwargs.pop("past_key_values", cache)  # the name before transformers' rename to `cache`
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if self.fuse_qkv:
            q, k, v = lora_group(hidden_states, projections, self.keep_weights)
        else:
            q, k, v = (proj(hidden_states) for proj in projections)
        query_states = q.view(hidden_shape).transpose(1, 2)
        key_states = k.view(hidden_shape).transpose(1, 2)
        value_states = v.view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                    eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self, query_states, key_states, value_states, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
            sliding_window=getattr(self.config, "sliding_window", None), **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        if self.fuse_o:
            return lora_group(attn_output, (self.o_proj,), self.keep_weights)[0], attn_weights
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights
