"""Decoder parts swapped in for speed and memory: same function, same parameter names.

    tiled_mlp: true             the MLP runs over the sequence in `tiled_mlp_num_shards` pieces, each one
                                checkpointed on its own (ALST's TiledMLP, Axolotl's key)
    liger_glu_activation: true  SiLU(gate) · up in one Triton kernel (liger-kernel) that saves only gate and up
    liger_rms_norm: true        RMSNorm in one Triton kernel (liger-kernel), "llama" casting like MistralRMSNorm

Why tile the MLP: Magistral's MLP is 32,768 wide, 6.4× the hidden size. With gradient checkpointing the layer
being recomputed in backward holds gate, up, SiLU(gate), their product and their gradients at once: at 32,768
tokens each is 32,768 × 32,768 × 2 B = 2 GiB, so about 12 GiB for one layer's MLP. In 7 shards of 4,681 tokens the
MLP holds 1/7 of that (~1.7 GiB), for one more MLP forward per step (the shard's recompute: ~+28% FLOPs at 24B,
paid only when you turn it on for long sequences).

The swapped module keeps the children's names (`mlp.gate_proj`, `input_layernorm.weight`, …), so state dicts,
PEFT target names and saved adapters do not change. Swap before LoRA wraps the linears. The liger kernels need
CUDA + Triton + liger-kernel; without them the stock modules stay, with a note (tests compare both on a GPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from magistune.model.load import ModelError


def liger_ready(device: torch.device) -> str | None:
    """None when liger-kernel can run on `device`, else why not."""
    if device.type != "cuda":
        return f"liger kernels need a CUDA GPU (the model is on {device.type})"
    try:
        import liger_kernel.ops.rms_norm  # noqa: F401  (imports triton)
        import liger_kernel.ops.swiglu  # noqa: F401
    except ImportError as e:
        return f"liger-kernel is not installed ({e}); pip install 'magistune[gpu]'"
    return None


class SwiGLUMLP(nn.Module):
    """down(SiLU(gate(x)) · up(x)), optionally over `shards` checkpointed pieces of the sequence."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, act_fn: nn.Module,
                 shards: int = 1, liger: bool = False):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn
        self.shards, self.liger = shards, liger

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.liger and x.is_cuda:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            return self.down_proj(LigerSiLUMulFunction.apply(gate, up))
        return self.down_proj(self.act_fn(gate) * up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shards <= 1 or not torch.is_grad_enabled() or x.shape[-2] < 2 * self.shards:
            return self._mlp(x)
        # Each shard keeps only its input for backward; its gate/up/product exist while it runs, then again in
        # backward, one shard at a time. Tokens are independent in the MLP, so the pieces concatenate exactly.
        pieces = [checkpoint(self._mlp, piece, use_reentrant=False) for piece in x.chunk(self.shards, dim=-2)]
        return torch.cat(pieces, dim=-2)


class FusedRMSNorm(nn.Module):
    """MistralRMSNorm through liger's kernel: weight · (x / rms(x)), rms in fp32, the product in x's dtype."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight, self.variance_epsilon = weight, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:  # a model moved off the GPU: MistralRMSNorm's own forward (same attribute names)
            from transformers.models.mistral.modeling_mistral import MistralRMSNorm

            return MistralRMSNorm.forward(self, x)
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        return LigerRMSNormFunction.apply(x, self.weight, self.variance_epsilon, 0.0, "llama", False)


def tiled_shards(cfg, hidden_size: int) -> int:
    """tiled_mlp_num_shards, or ALST's rule ceil(sequence_len / hidden_size): 32,768 / 5,120 → 7 shards."""
    if cfg.tiled_mlp_num_shards:
        return cfg.tiled_mlp_num_shards
    return max(2, math.ceil(cfg.sequence_len / hidden_size))


def apply_fused_parts(model: nn.Module, cfg, device: torch.device) -> list[str]:
    """Swap the decoder's MLPs and RMSNorms as cfg asks. Returns notes for the run log (empty: nothing to say)."""
    if not (cfg.tiled_mlp or cfg.liger_glu_activation or cfg.liger_rms_norm):
        return []
    from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralMLP, MistralModel, MistralRMSNorm

    text = model.config.get_text_config()
    if cfg.liger_glu_activation and text.hidden_act != "silu":
        raise ModelError(f"liger_glu_activation: the model's hidden_act is {text.hidden_act!r}; the kernel is SiLU's")
    notes, glu, rms = [], cfg.liger_glu_activation, cfg.liger_rms_norm
    why = liger_ready(device) if glu or rms else None
    if why:
        notes.append(f"liger_glu_activation / liger_rms_norm: {why}; the stock modules stay (same arithmetic)")
        glu = rms = False
    shards = tiled_shards(cfg, text.hidden_size) if cfg.tiled_mlp else 1
    n_mlp = 0
    for module in list(model.modules()):
        if isinstance(module, MistralDecoderLayer):
            if (cfg.tiled_mlp or glu) and isinstance(module.mlp, MistralMLP):
                m = module.mlp
                module.mlp = SwiGLUMLP(m.gate_proj, m.up_proj, m.down_proj, m.act_fn, shards, glu)
                n_mlp += 1
            if rms:
                for name in ("input_layernorm", "post_attention_layernorm"):
                    norm = getattr(module, name)
                    if isinstance(norm, MistralRMSNorm):
                        setattr(module, name, FusedRMSNorm(norm.weight, norm.variance_epsilon))
        elif isinstance(module, MistralModel) and rms and isinstance(module.norm, MistralRMSNorm):
            module.norm = FusedRMSNorm(module.norm.weight, module.norm.variance_epsilon)
    if cfg.tiled_mlp:
        notes.append(f"tiled_mlp: {n_mlp} MLPs run in {shards} checkpointed shards "
                     f"({cfg.sequence_len:,} tokens → ~{math.ceil(cfg.sequence_len / shards):,} per shard)")
    return notes
