"""FP8 matrix products for the frozen base weights of LoRA / QLoRA (`base_fp8: true`; off by default).

Forward y = x·Wᵀ and input gradient dx = dy·W run on FP8 tensor cores (H100/H200: about twice bf16's rate);
there is no weight gradient (the base is frozen), and the LoRA matrices stay in bf16 (PEFT adds them).
Each operand is quantised to float8_e4m3fn (max 448) with one scale per row of the product ("rowwise"):

    x  (M, K): one scale per token           s_x[m] = amax_k |x[m, k]| / 448,  x8 = x / s_x
    W  (N, K): one scale per output channel  s_w[n] = amax_k |W[n, k]| / 448           (forward)
    dy (M, N): one scale per token           s_d[m] = amax_n |dy[m, n]| / fmax          (backward)
    W  (N, K): one scale per input channel   t_w[k] = amax_n |W[n, k]| / 448           (backward)
    y  = (x8 · s_x) · (W8 · s_w)ᵀ            torch._scaled_mm(x8, W8ᵀ, s_x (M,1), s_wᵀ (1,N)), fp32 accumulate

torch._scaled_mm wants the first operand row-major, the second column-major, K and N multiples of 16, the scales
float32 of shapes (M, 1) and (1, N), and (on CUDA, rowwise) a bf16 output. A scale is a reciprocal of the usual
"fmax / amax" so that the product is dequantised by multiplying. The cast to FP8 rounds to nearest; values are
clamped to ±fmax first (on CUDA an out-of-range cast gives NaN).

API (also for fused LoRA functions that dequantise W themselves):
    fp8_forward(x, w)       y = x·wᵀ in FP8, no autograd          x (..., K) ; w (N, K) bf16 → (..., N) bf16
    fp8_input_grad(dy, w)   dx = dy·w in FP8, no autograd         dy (..., N); w (N, K)     → (..., K) bf16
    fp8_matmul(x, w)        y = x·wᵀ with autograd: dx through fp8_input_grad, no gradient for w (saves w)
    nf4_to_fp8(q, state, layout)  a bitsandbytes NF4 weight straight to the FP8 operand (and scales) that
                            fp8_forward ("rows") or fp8_input_grad ("cols") take in place of w

Where the base weight comes from: for bitsandbytes' Linear4bit (QLoRA), nf4_to_fp8 turns the packed NF4 weight
into the FP8 operand in one pass (code · block absmax / scale, no bf16 copy), in forward and again in backward
(nothing but the packed weight is kept between them, as bitsandbytes does); its scales come from the block absmax
(exact per row, an upper bound per column). A plain nn.Linear (LoRA) quantises its bf16 weight.

The swap (apply_base_fp8) changes the class of each decoder Linear4bit / nn.Linear to a subclass whose forward is
the FP8 one: same object, same parameters, same state dict and names, and isinstance(…, Linear4bit) still holds,
so PEFT wraps it as before. It runs before LoRA wraps the linears.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from magistune.model.load import ModelError
from magistune.model.parts import decoder_prefix, in_decoder

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
GRAD_DTYPE = E4M3  # dy's format; e5m2 (range 57344, 2 mantissa bits) is the other choice (bench/fp8_accuracy.py)


def _quantise_rows_eager(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    fmax = torch.finfo(dtype).max
    amax = torch.linalg.vector_norm(t, ord=float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    scale = amax.clamp(min=1e-12) / fmax  # an all-zero row: scale 1e-12/fmax, quantised values 0
    return (t.float() / scale).clamp(-fmax, fmax).to(dtype), scale


_compiled = None


def quantise_rows(t: torch.Tensor, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """(t8, scale): t ≈ t8.float() * scale, one fp32 scale per row (shape (rows, 1)); t is 2-D.

    On CUDA the few elementwise steps run as one compiled kernel (read 2 B, write 1 B per value); eagerly they
    would pass over fp32 copies four times, more than the FP8 product saves."""
    global _compiled
    if t.is_cuda:
        if _compiled is None:
            _compiled = torch.compile(_quantise_rows_eager, dynamic=True)
        with torch.autocast("cuda", enabled=False):  # one autocast state and (detach) one requires_grad:
            return _compiled(t.detach(), dtype)  # fewer compiled variants, as the compiled code guards on both
    return _quantise_rows_eager(t, dtype)


def _check_shape(k: int, n: int, what: str) -> None:
    if k % 16 or n % 16:
        raise ValueError(f"{what}: FP8 products need both weight dimensions divisible by 16, got {n} x {k}")


def fp8_forward(x: torch.Tensor, w, fast_accum: bool = False) -> torch.Tensor:
    """y = x·wᵀ with x quantised per token and w per output channel. Returns bf16 of shape (..., N).
    w: the bf16 (N, K) weight, or the pair (w8 (N, K), scale (N, 1)) that nf4_to_fp8(…, "rows") gives."""
    w8, sw = w if isinstance(w, tuple) else quantise_rows(w)  # (N, K) row-major: its .t() is column-major
    n, k = w8.shape
    _check_shape(k, n, "fp8_forward")
    x2 = x.reshape(-1, k)
    x8, sx = quantise_rows(x2)
    x8 = x8.contiguous()  # row-major (a no-op unless x was a permuted view)
    y = torch._scaled_mm(x8, w8.t(), sx, sw.t(), out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
    return y.reshape(*x.shape[:-1], n)


def fp8_input_grad(dy: torch.Tensor, w, grad_dtype: torch.dtype | None = None) -> torch.Tensor:
    """dx = dy·w with dy quantised per token (GRAD_DTYPE) and w per input channel. Returns bf16 (..., K).
    w: the bf16 (N, K) weight, or the pair (wᵀ8 (K, N), scale (K, 1)) that nf4_to_fp8(…, "cols") gives."""
    wt8, sw = w if isinstance(w, tuple) else quantise_rows(w.t())  # wᵀ (K, N): a row per input channel
    k, n = wt8.shape
    _check_shape(k, n, "fp8_input_grad")
    d8, sd = quantise_rows(dy.reshape(-1, n), grad_dtype or GRAD_DTYPE)
    d8 = d8.contiguous()
    dx = torch._scaled_mm(d8, wt8.contiguous().t(), sd, sw.t(), out_dtype=torch.bfloat16)  # (N, K) column-major
    return dx.reshape(*dy.shape[:-1], k)


class _FP8MatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        ctx.x_dtype = x.dtype
        return fp8_forward(x, w).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (w,) = ctx.saved_tensors
        return fp8_input_grad(dy, w).to(ctx.x_dtype), None


def fp8_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x·wᵀ in FP8 with a gradient for x only. w must be frozen (requires_grad False): it gets none."""
    if w.requires_grad:
        raise ModelError("base_fp8: the FP8 product gives no weight gradient; it is for frozen base weights only")
    return _FP8MatMul.apply(x, w)


class _FP8NF4Linear(torch.autograd.Function):
    """x·Wᵀ for a bitsandbytes 4-bit weight: W goes from NF4 to FP8 in forward, and again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, quant_state) -> torch.Tensor:
        ctx.weight, ctx.quant_state, ctx.x_dtype = weight, quant_state, x.dtype  # the packed NF4 weight only
        return fp8_forward(x, nf4_to_fp8(weight, quant_state, "rows")).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        w = nf4_to_fp8(ctx.weight, ctx.quant_state, "cols")
        return fp8_input_grad(dy, w).to(ctx.x_dtype), None, None


def _nf4_values(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """bitsandbytes' 4-bit layout in fp32 (N, K): byte j holds values 2j (high nibble) and 2j+1 (low), each
    code[nibble] · absmax of its block (blocks of K / absmax.numel() · N consecutive values, within a row)."""
    b = packed.reshape(-1)
    nibbles = torch.stack((b >> 4, b & 0xF), dim=-1).reshape(n, absmax.numel() // n, -1).long()
    return (code[nibbles] * absmax.reshape(n, -1, 1)).reshape(n, k)


def _nf4_to_fp8_eager(packed, absmax, code, n: int, k: int, cols: bool):
    # |code| ≤ 1 and the block's largest value has code ±1, so max(absmax) over a row's blocks is the row's amax;
    # over a column it bounds the column's amax from above. FP8 is floating point: a larger scale costs no
    # precision while the values stay above e4m3's smallest normal 2^-6 (448 / 2^-6 ≈ 2^15 of range).
    blocks = absmax.reshape(n, -1)
    if cols:
        amax = blocks.amax(dim=0)[:, None].expand(-1, k // blocks.shape[1]).reshape(k, 1)  # each block's columns
        w = _nf4_values(packed, absmax, code, n, k).t()
    else:
        amax = blocks.amax(dim=1, keepdim=True)
        w = _nf4_values(packed, absmax, code, n, k)
    scale = amax.clamp(min=1e-12) / 448.0
    return (w / scale).clamp(-448.0, 448.0).to(E4M3).contiguous(), scale


_compiled_nf4 = None


def nf4_to_fp8(weight: torch.Tensor, quant_state, layout: str):
    """A bitsandbytes NF4 weight straight to FP8 e4m3 (one compiled kernel on CUDA: reads 0.5 B, writes 1 B a
    value, no bf16 copy). layout "rows": (w8 (N, K), scale (N, 1)) for fp8_forward; "cols": (wᵀ8 (K, N),
    scale (K, 1)) for fp8_input_grad. Other layouts (FP4, blocks across rows, packed in another dtype): the
    bf16 weight from bitsandbytes' dequantize_4bit, which fp8_forward / fp8_input_grad quantise themselves."""
    global _compiled_nf4
    from bitsandbytes.functional import dequantize_4bit, dequantize_blockwise

    n, k = quant_state.shape
    if quant_state.quant_type != "nf4" or k % quant_state.blocksize or weight.dtype != torch.uint8:
        return dequantize_4bit(weight, quant_state).to(torch.bfloat16)
    absmax = quant_state.absmax
    if quant_state.nested:  # double quantisation: the absmax are 8-bit themselves (a small tensor, N·K/64)
        absmax = dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    fn = _nf4_to_fp8_eager
    if weight.is_cuda:
        if _compiled_nf4 is None:
            _compiled_nf4 = torch.compile(_nf4_to_fp8_eager, dynamic=True)
        fn = _compiled_nf4
    with torch.autocast(weight.device.type, enabled=False):
        return fn(weight, absmax.float(), quant_state.code.float(), n, k, layout == "cols")


class FP8Linear(nn.Linear):
    """nn.Linear with a frozen weight whose product runs in FP8 (LoRA on a bf16 base)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_matmul(x, self.weight.to(torch.bfloat16))
        return y if self.bias is None else y + self.bias.to(y.dtype)


def fp8_linear4bit_class() -> type[nn.Module]:
    """Linear4bit with the FP8 product (built on first use: bitsandbytes imports CUDA libraries)."""
    global _FP8Linear4bit
    if _FP8Linear4bit is None:
        import bitsandbytes as bnb
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        class FP8Linear4bit(bnb.nn.Linear4bit):
            """bitsandbytes' NF4 linear whose dequantised weight multiplies x in FP8 (QLoRA's frozen base)."""

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                fix_4bit_weight_quant_state_from_module(self)
                if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
                    raise ModelError("base_fp8: the FP8 product gives no weight gradient; the base must be frozen")
                y = _FP8NF4Linear.apply(x, self.weight, self.weight.quant_state)
                return y if self.bias is None else y + self.bias.to(y.dtype)

        _FP8Linear4bit = FP8Linear4bit
    return _FP8Linear4bit


_FP8Linear4bit: type[nn.Module] | None = None


def fp8_unusable(device: torch.device) -> str | None:
    """None when FP8 products run on `device` (CUDA compute capability ≥ 8.9, or the CPU), else why not."""
    if device.type == "cpu":
        return None  # torch's CPU kernel: same arithmetic, for tests; slower than bf16
    if device.type != "cuda":
        return f"FP8 products run on NVIDIA GPUs (the model is on {device.type})"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no FP8 tensor cores; "
                "they start at 8.9 (Ada, Hopper: H100/H200, Blackwell)")
    return None


def apply_base_fp8(model: nn.Module, cfg, device: torch.device) -> list[str]:
    """Give each decoder linear (bnb Linear4bit or nn.Linear) the FP8 forward, as cfg.base_fp8 asks.
    Returns notes for the run log. Run before LoRA wraps the linears (it keeps their class family)."""
    if not getattr(cfg, "base_fp8", False):
        return []
    device = torch.device(device)
    why = fp8_unusable(device)
    if why:
        raise ModelError(f"base_fp8: {why}; remove base_fp8")
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):  # its lora_A / lora_B are trained nn.Linear
        raise ModelError("base_fp8: apply it before LoRA wraps the linears (the adapters' own linears train)")
    prefix = decoder_prefix(model)
    swapped, kept = 0, []
    linear4bit = None
    if getattr(model, "is_loaded_in_4bit", False):
        import bitsandbytes as bnb

        linear4bit = bnb.nn.Linear4bit
    for name, module in model.named_modules():
        if not in_decoder(name, prefix) or type(module) not in (nn.Linear, linear4bit):
            continue
        if module.in_features % 16 or module.out_features % 16:
            kept.append(name)
            continue
        module.__class__ = FP8Linear if type(module) is nn.Linear else fp8_linear4bit_class()
        swapped += 1
    notes = [f"base_fp8: {swapped} decoder linears multiply their frozen weight in FP8 (e4m3, rowwise scales)"]
    if kept:
        notes.append(f"base_fp8: {len(kept)} linears keep bf16 (a dimension not divisible by 16), e.g. {kept[0]}")
    if device.type == "cpu":
        notes.append("base_fp8: on the CPU the FP8 products are computed by torch's reference kernel (slow; for tests)")
    return notes
