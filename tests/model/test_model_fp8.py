"""model/fp8.py: rowwise FP8 products against their formulas (torch's CPU kernel), and the base_fp8 swap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from magistune.config import ConfigError, parse_config
from magistune.model import apply_lora, build_model, load_model
from magistune.model.fp8 import (
    E4M3, E5M2, FP8Linear, apply_base_fp8, fp8_forward, fp8_input_grad, fp8_matmul, fp8_unusable, quantise_rows,
)
from magistune.model.load import ModelError

CPU = torch.device("cpu")


def reference_quantise(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The formula: s = amax_row |t| / fmax, t8 = round_fp8(t / s); returns t8 · s in fp32 (what the product sees)."""
    fmax = {E4M3: 448.0, E5M2: 57344.0}[dtype]
    s = t.float().abs().amax(dim=1, keepdim=True) / fmax
    return (t.float() / s).to(dtype).float() * s


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


@pytest.mark.parametrize("dtype, fmax", [(E4M3, 448.0), (E5M2, 57344.0)])
def test_quantise_rows_scales_each_row_to_the_format_range(dtype, fmax):
    t = torch.randn(6, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 6)[:, None]
    t[2] = 0.0  # an all-zero row stays zero, no NaN
    t8, scale = quantise_rows(t, dtype)
    assert t8.dtype == dtype and scale.shape == (6, 1) and scale.dtype == torch.float32
    back = t8.float() * scale
    assert torch.all(back[2] == 0) and torch.isfinite(back).all()
    for row in (0, 1, 3, 4, 5):
        assert float(t8[row].float().abs().max()) == fmax  # the largest value of each row maps to fmax
        mant = {E4M3: 3, E5M2: 2}[dtype]  # round to nearest: relative error ≤ 2^-(mantissa bits + 1) when normal
        big = t[row].abs() > scale[row] * 2 ** -6 * 2  # normal values of e4m3/e5m2 start at 2^-6 / 2^-14
        rel = ((back[row] - t[row]).abs() / t[row].abs())[big]
        assert float(rel.max()) <= 2 ** -(mant + 1) + 1e-6


def test_forward_and_input_gradient_follow_the_formulas():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 24, 128, generator=g).to(torch.bfloat16)
    w = (torch.randn(96, 128, generator=g) * 0.02).to(torch.bfloat16)
    dy = torch.randn(2, 24, 96, generator=g).to(torch.bfloat16)
    y = fp8_forward(x, w)
    want = reference_quantise(x.reshape(-1, 128), E4M3) @ reference_quantise(w, E4M3).t()
    assert y.shape == (2, 24, 96) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.reshape(-1, 96).float(), want, rtol=2 ** -8, atol=1e-5)  # bf16 output rounding
    for dtype in (E4M3, E5M2):
        dx = fp8_input_grad(dy, w, dtype)
        want = reference_quantise(dy.reshape(-1, 96), dtype) @ reference_quantise(w.t(), E4M3).t()
        assert dx.shape == (2, 24, 128)
        torch.testing.assert_close(dx.reshape(-1, 128).float(), want, rtol=2 ** -8, atol=1e-5)


def test_fp8_products_are_close_to_exact_ones():
    g = torch.Generator().manual_seed(2)
    x, w, dy = torch.randn(256, 512, generator=g), torch.randn(384, 512, generator=g), torch.randn(256, 384, generator=g)
    assert cosine(fp8_forward(x, w), x @ w.t()) > 0.999
    assert cosine(fp8_input_grad(dy, w), dy @ w) > 0.999
    assert cosine(fp8_input_grad(dy, w, E5M2), dy @ w) > 0.998


def test_fp8_matmul_gives_x_its_fp8_gradient_and_refuses_a_trainable_weight():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 32, generator=g).to(torch.bfloat16).requires_grad_()
    w = torch.randn(48, 32, generator=g).to(torch.bfloat16)
    dy = torch.randn(4, 48, generator=g).to(torch.bfloat16)
    y = fp8_matmul(x, w)
    torch.testing.assert_close(y, fp8_forward(x.detach(), w))
    y.backward(dy)
    torch.testing.assert_close(x.grad, fp8_input_grad(dy, w))
    with pytest.raises(ModelError, match="frozen base weights only"):
        fp8_matmul(x, w.clone().requires_grad_())
    with pytest.raises(ValueError, match="divisible by 16"):
        fp8_forward(torch.randn(4, 40), torch.randn(48, 40))


def test_fp8_unusable_names_the_reason():
    assert fp8_unusable(CPU) is None
    assert "NVIDIA GPUs" in fp8_unusable(torch.device("mps"))


def lora_model(text_dir, tok, make_cfg, adapter: str, **keys):
    quant = {"load_in_4bit": True} if adapter == "qlora" else {}
    cfg = make_cfg("tiny-random", adapter=adapter, lora_target_linear=True, lora_r=4, lora_alpha=8, bf16=True,
                   sequence_len=64, **quant, **keys)
    model, _ = load_model(cfg, text_dir, CPU, tokenizer=tok)
    return model, cfg


def loss_and_lora_grads(model, ids):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids).logits.float().pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("adapter", ["qlora", "lora"])
def test_base_fp8_swaps_decoder_linears_keeping_names_and_state(text_dir, tok, make_cfg, adapter, input_ids):
    import bitsandbytes as bnb

    results = []
    for fp8 in (False, True):
        model, cfg = lora_model(text_dir, tok, make_cfg, adapter, base_fp8=fp8)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        notes = apply_base_fp8(model, cfg, CPU)
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        swapped = [n for n, m in model.named_modules() if type(m).__name__.startswith("FP8Linear")]
        if not fp8:
            assert notes == [] and swapped == []
        else:
            assert len(swapped) == 2 * 7 and all(".layers." in n for n in swapped)  # not lm_head
            assert "14 decoder linears" in notes[0]
            q = model.model.layers[0].self_attn.q_proj
            assert isinstance(q, bnb.nn.Linear4bit if adapter == "qlora" else FP8Linear)
        torch.manual_seed(0)  # PEFT draws lora_A from the global generator
        model = apply_lora(model, cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:  # B = 0 at the start would leave lora_A without gradient
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
        if fp8:
            with pytest.raises(ModelError, match="before LoRA wraps"):
                apply_base_fp8(model, cfg, CPU)
            base = model.get_base_model().model.layers[0].mlp.down_proj.base_layer
            assert type(base).__name__.startswith("FP8Linear")  # PEFT wrapped the swapped module as its base
        results.append(loss_and_lora_grads(model, input_ids))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 7 * 2
    assert float(loss_b) == pytest.approx(float(loss_a), rel=2e-3)  # measured: 6e-5 (lora), 1.4e-4 (qlora)
    for name in grads_a:  # FP8 differs from bf16 by its rounding (e4m3 keeps 3 mantissa bits): on products of 64
        # terms over 24 tokens that is not averaged out; measured cosines 0.980-0.999 (real shapes: tests/gpu)
        assert cosine(grads_a[name], grads_b[name]) > 0.97, name


def test_build_model_applies_base_fp8_before_lora(tok, make_cfg):
    cfg = make_cfg("tiny-random", adapter="qlora", load_in_4bit=True, lora_target_linear=True, base_fp8=True)
    model, info, _ = build_model(cfg, CPU, tokenizer=tok)
    assert any("base_fp8: 14 decoder linears" in n for n in info.notes)
    bases = [m.base_layer for m in model.modules() if hasattr(m, "lora_A")]
    assert len(bases) == 14 and all(type(b).__name__ == "FP8Linear4bit" for b in bases)


@pytest.mark.parametrize("keys, message", [
    ({"base_fp8": True}, "needs adapter: lora or qlora"),
    ({"base_fp8": True, "adapter": "lora", "lora_target_linear": True, "fsdp": True}, "not wired into the FSDP2"),
    ({"base_fp8": True, "adapter": "lora", "lora_target_linear": True, "rl": "grpo"}, "drop it for rl: grpo"),
])
def test_base_fp8_combinations_that_cannot_work_are_refused(keys, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"base_model": "tiny-random", "datasets": [{"path": "x.jsonl"}], **keys})


def nf4(n: int, k: int, nested: bool):
    from bitsandbytes.functional import quantize_4bit

    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(5)) * 0.02).to(torch.bfloat16)
    w[3, 70] = 0.5  # one large value: its block's absmax, and row 3's / column 70's amax
    return quantize_4bit(w, quant_type="nf4", compress_statistics=nested)


@pytest.mark.parametrize("nested", [False, True])
def test_nf4_to_fp8_reads_bitsandbytes_layout_and_scales_from_block_absmax(nested):
    from bitsandbytes.functional import dequantize_4bit, dequantize_blockwise

    from magistune.model.fp8 import _nf4_values, nf4_to_fp8

    packed, state = nf4(96, 256, nested)
    absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset if nested else state.absmax
    exact = torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax.float(), state.blocksize, "nf4",
                                                            state.shape, torch.float32)
    assert torch.equal(_nf4_values(packed, absmax.float(), state.code, 96, 256), exact)  # code · absmax, bitwise
    w = dequantize_4bit(packed, state).float()  # what bitsandbytes' own path multiplies with (bf16)
    w8, scale = nf4_to_fp8(packed, state, "rows")
    assert w8.shape == (96, 256) and w8.dtype == E4M3 and scale.shape == (96, 1)
    torch.testing.assert_close(scale * 448, w.abs().amax(dim=1, keepdim=True), rtol=2 ** -8, atol=0)  # exact amax
    assert float(rel_err(w8.float() * scale, w)) < 0.045
    wt8, scale_t = nf4_to_fp8(packed, state, "cols")
    assert wt8.shape == (256, 96) and wt8.is_contiguous() and scale_t.shape == (256, 1)
    col_amax = w.abs().amax(dim=0)[:, None]
    assert torch.all(scale_t * 448 >= col_amax * (1 - 2 ** -8))  # an upper bound: nothing saturates
    assert float(scale_t[70] * 448) == pytest.approx(float(col_amax[70]), rel=2 ** -8)
    assert float(rel_err(wt8.float() * scale_t, w.t())) < 0.045


def rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm() / b.norm()


def test_fp8_products_from_nf4_match_those_from_the_dequantised_weight():
    from bitsandbytes.functional import dequantize_4bit

    from magistune.model.fp8 import nf4_to_fp8

    packed, state = nf4(96, 256, True)
    w = dequantize_4bit(packed, state)
    g = torch.Generator().manual_seed(6)
    x, dy = torch.randn(40, 256, generator=g).to(torch.bfloat16), torch.randn(40, 96, generator=g).to(torch.bfloat16)
    assert cosine(fp8_forward(x, nf4_to_fp8(packed, state, "rows")), fp8_forward(x, w)) > 0.999
    assert cosine(fp8_input_grad(dy, nf4_to_fp8(packed, state, "cols")), fp8_input_grad(dy, w)) > 0.999
    assert cosine(fp8_forward(x, nf4_to_fp8(packed, state, "rows")), x.float() @ w.float().t()) > 0.999
