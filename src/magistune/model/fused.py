"""Decoder parts swapped in for speed and memory: same function, same parameter names.

    tiled_mlp: true             the MLP runs over the sequence in `tiled_mlp_num_shards` pieces, each one
                                checkpointed on its own (ALST's TiledMLP, Axolotl's key)
    liger_glu_activation: true  SiLU(gate) · up in one Triton kernel (liger-kernel) that saves only gate and up
    liger_rms_norm: true        RMSNorm in one Triton kernel (liger-kernel), "llama" casting like MistralRMSNorm
    lora_qkv_kernel / lora_o_kernel / lora_mlp_kernel: true
                                the LoRA linears sharing an input run as one autograd Function (lora_kernels.py);
                                swapped in after PEFT wraps the linears (apply_lora_kernels)

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
from magistune.model import lora_kernels
from magistune.model.lora_kernels import LoRAFusedAttention, lora_group


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
        self.fuse_gate_up = self.fuse_down = self.keep_weights = False  # LoRA kernels (apply_lora_kernels sets them)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse_gate_up:
            gate, up = lora_group(x, (self.gate_proj, self.up_proj), self.keep_weights)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.liger and x.is_cuda:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            h = LigerSiLUMulFunction.apply(gate, up)
        else:
            h = self.act_fn(gate) * up
        return lora_group(h, (self.down_proj,), self.keep_weights)[0] if self.fuse_down else self.down_proj(h)

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


def _lora_group_ready(names: list[str], modules: list[nn.Module]) -> str | None:
    """None when these LoRA linears can run as one fused group; else why they stay on PEFT's layers.
    Raises ModelError for LoRA the kernel does not compute (DoRA, LoRA bias, a base bias, 8-bit bases)."""
    from peft.tuners.lora import LoraLayer

    bare = [n for n, m in zip(names, modules) if not isinstance(m, LoraLayer)]
    if bare:
        return f"{', '.join(bare)} without LoRA"
    for name, m in zip(names, modules):
        base = m.get_base_layer()
        if any(m.use_dora.values()):
            raise ModelError(f"lora_*_kernel: {name} uses DoRA; the fused kernels compute plain LoRA only "
                             "(set the kernel keys to false, or peft_use_dora: false)")
        if any(getattr(m, "lora_bias", {}).values()) or getattr(base, "bias", None) is not None:
            raise ModelError(f"lora_*_kernel: {name} has a bias; the fused kernels compute bias-free linears only")
        if type(base) is not nn.Linear and getattr(base.weight, "quant_state", None) is None:
            raise ModelError(f"lora_*_kernel: {name}'s base layer is {type(base).__name__}; the fused kernels take "
                             "nn.Linear and bitsandbytes 4-bit (NF4/FP4) bases")
        if len(m.lora_A) != 1:
            return f"{name} has {len(m.lora_A)} adapters"
    rates = {float(getattr(d, "p", 0.0)) for m in modules for d in m.lora_dropout.values()}
    return None if len(rates) == 1 else f"lora_dropout differs within the group ({sorted(rates)})"


def apply_lora_kernels(model: nn.Module, cfg) -> list[str]:
    """After PEFT wrapped the linears: q,k,v / o / gate,up and down of each MistralDecoderLayer run through the
    fused LoRA Function (lora_kernels.py) as the kernel keys ask. Module swaps that keep PEFT's module tree and
    parameter names. A group that cannot fuse (some projections without LoRA, ...) keeps PEFT's layers, with a
    note. Returns notes for the run log."""
    if not (cfg.lora_qkv_kernel or cfg.lora_o_kernel or cfg.lora_mlp_kernel):
        return []
    from peft.tuners.lora import LoraLayer
    from transformers.models.mistral.modeling_mistral import MistralAttention, MistralDecoderLayer, MistralMLP

    keep = lora_kernels.KEEP_DEQUANTISED_WEIGHTS and cfg.gradient_checkpointing  # see there: checkpointing only
    fused: dict[str, int] = {"q,k,v": 0, "o": 0, "gate,up": 0, "down": 0}
    left: dict[str, str] = {}  # group -> why some layers keep PEFT's layers
    layers, in_groups = 0, set()

    def group(key: str, owner: nn.Module, names: tuple[str, ...]) -> bool:
        modules = [getattr(owner, n) for n in names]
        why = _lora_group_ready(list(names), modules)
        if why:
            left.setdefault(key, why)
            return False
        fused[key] += 1
        in_groups.update(id(m) for m in modules)
        return True

    for layer in list(model.modules()):
        if not isinstance(layer, MistralDecoderLayer):
            continue
        layers += 1
        attn = layer.self_attn
        if (cfg.lora_qkv_kernel or cfg.lora_o_kernel) and type(attn) is MistralAttention:
            qkv = cfg.lora_qkv_kernel and group("q,k,v", attn, ("q_proj", "k_proj", "v_proj"))
            o = cfg.lora_o_kernel and group("o", attn, ("o_proj",))
            if qkv or o:
                layer.self_attn = LoRAFusedAttention(attn, qkv, o, keep)
        if cfg.lora_mlp_kernel and isinstance(layer.mlp, (MistralMLP, SwiGLUMLP)):
            mlp = layer.mlp
            gate_up = group("gate,up", mlp, ("gate_proj", "up_proj"))
            down = group("down", mlp, ("down_proj",))
            if (gate_up or down) and isinstance(mlp, MistralMLP):
                mlp = layer.mlp = SwiGLUMLP(mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn)
            mlp.fuse_gate_up, mlp.fuse_down, mlp.keep_weights = gate_up, down, keep
    wanted = [k for k, on in (("q,k,v", cfg.lora_qkv_kernel), ("o", cfg.lora_o_kernel),
                              ("gate,up", cfg.lora_mlp_kernel), ("down", cfg.lora_mlp_kernel)) if on]
    notes = [f"LoRA kernels: fused {', '.join(f'{k} in {fused[k]}/{layers}' for k in wanted)} decoder layers"]
    notes += [f"LoRA kernels: {k} of {layers - fused[k]} layers keep PEFT's layers ({why})" for k, why in left.items()]
    outside = sum(1 for m in model.modules() if isinstance(m, LoraLayer) and id(m) not in in_groups)
    if outside:
        notes.append(f"LoRA kernels: {outside} other LoRA modules (vision tower, projector, lm_head, unfused groups) "
                     "run PEFT's layers")
    return notes
