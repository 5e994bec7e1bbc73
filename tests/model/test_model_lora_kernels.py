"""model/lora_kernels.py + fused.apply_lora_kernels: the fused LoRA Function computes what PEFT's layers compute
(outputs and every gradient), with dropout what a direct implementation with the same shared mask computes,
and the wired-in model keeps PEFT's module tree."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

from magistune.config import ConfigError
from magistune.data.sample import IGNORE_INDEX, Sample
from magistune.model import ModelError, build_model
from magistune.model import lora_kernels
from magistune.model.fused import SwiGLUMLP, _lora_group_ready
from magistune.model.lora_kernels import LoRAFusedAttention, lora_group
from magistune.train.batches import collate_packed
from magistune.train.loss import token_loss_sum

CPU = torch.device("cpu")
KERNELS = {"lora_qkv_kernel": True, "lora_o_kernel": True, "lora_mlp_kernel": True}


class Projections(nn.Module):
    """Three linears reading one input, shaped like q (wide), k and v (narrow)."""

    def __init__(self, d_in=24, widths=(40, 16, 16), dtype=torch.float32, bias=False):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d_in, w, bias=bias, dtype=dtype) for w in widths)


def peft_projections(dtype=torch.float32, dropout=0.0, **lora):
    torch.manual_seed(0)
    model = get_peft_model(Projections(dtype=dtype), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                                target_modules=["q", "k", "v"], **lora))
    with torch.no_grad():  # B = 0 at the start would leave A without gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape) * 0.1)
    return model.train()


def outputs_and_grads(model, x, fused: bool, seed: int = 3):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    mods = tuple(model.base_model.model.get_submodule(n) for n in ("q", "k", "v"))
    torch.manual_seed(seed)
    ys = lora_group(x, mods) if fused else [m(x) for m in mods]
    sum((y.float() * torch.linspace(-1, 1, y.shape[-1])).sum() for y in ys).backward()  # a different weight per column
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return ys, x.grad, grads


def assert_same(a, b, rtol, atol):
    ys_a, dx_a, g_a = a
    ys_b, dx_b, g_b = b
    for ya, yb in zip(ys_a, ys_b):
        torch.testing.assert_close(yb, ya, rtol=rtol, atol=atol)
    torch.testing.assert_close(dx_b, dx_a, rtol=rtol, atol=atol)
    assert g_a.keys() == g_b.keys() and len(g_a) == 6
    for n in g_a:
        assert g_b[n].dtype == g_a[n].dtype == torch.float32, n
        torch.testing.assert_close(g_b[n], g_a[n], rtol=rtol, atol=atol, msg=n)


@pytest.mark.parametrize("rslora", [False, True])
def test_fp32_group_equals_peft(rslora):
    model = peft_projections(use_rslora=rslora)
    x = torch.randn(2, 7, 24)
    assert_same(outputs_and_grads(model, x, False), outputs_and_grads(model, x, True), rtol=1e-5, atol=1e-6)


def test_bf16_bases_equal_peft_to_bf16_precision():
    """bf16 bases, fp32 LoRA weights (PEFT's autocast_adapter_dtype): PEFT adds the LoRA term in fp32, the
    Function in x's dtype (bf16) into the base output; they agree to bf16's rounding."""
    model = peft_projections(dtype=torch.bfloat16)
    x = torch.randn(2, 7, 24, dtype=torch.bfloat16)
    assert_same(outputs_and_grads(model, x, False), outputs_and_grads(model, x, True), rtol=2e-2, atol=2e-2)


def test_under_autocast_equals_peft():
    model = peft_projections()
    x = torch.randn(2, 7, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, fused = outputs_and_grads(model, x, False), outputs_and_grads(model, x, True)
    assert fused[0][0].dtype == plain[0][0].dtype == torch.bfloat16
    assert_same(plain, fused, rtol=2e-2, atol=2e-2)


def test_nf4_base_is_dequantised():
    bnb = pytest.importorskip("bitsandbytes")
    model = peft_projections()
    base = model.base_model.model
    for name in ("q", "k", "v"):  # bitsandbytes Linear4bit (NF4) bases, quantised on the CPU
        lin = base.get_submodule(name).base_layer
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                              quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4", module=q).to("cpu")
        base.get_submodule(name).base_layer = q
    x = torch.randn(2, 5, 24)
    assert_same(outputs_and_grads(model, x, False), outputs_and_grads(model, x, True), rtol=1e-5, atol=1e-5)


def test_nf4_weight_gathered_without_its_quant_state_is_dequantised():
    """Under FSDP2 a Linear4bit's weight, during forward and backward, is the all-gathered packed tensor as a
    plain Parameter (no quant_state); base_weight takes the state bitsandbytes keeps on the layer."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    lin = nn.Linear(24, 40, bias=False)
    q = bnb.nn.Linear4bit(24, 40, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4", module=q).to("cpu")
    want = bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state)
    q.weight = nn.Parameter(q.weight.data.clone(), requires_grad=False)  # what FSDP2 sets on the module
    assert getattr(q.weight, "quant_state", None) is None
    got = lora_kernels.base_weight(q, torch.float32)
    assert got.shape == lin.weight.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def reference_with_mask(model, x, p, seed=3):
    """y_i = base_i(x) + s_i · (x ⊙ m / (1-p)) A_iᵀ B_iᵀ with one mask m for the three, drawn as the kernel
    draws it (lora_kernels.dropout on x as tokens × features, after torch.manual_seed(seed))."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    mask = lora_kernels.dropout(x.detach().reshape(-1, x.shape[-1]), p)[1].view(x.shape).float()
    assert 0.5 < mask.mean() < 0.9  # p = 0.3
    ys = []
    for name in ("q", "k", "v"):
        m = model.base_model.model.get_submodule(name)
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        ys.append(m.base_layer(x) + m.scaling["default"] * ((x * mask / (1 - p)) @ a.t()) @ b.t())
    sum((y.float() * torch.linspace(-1, 1, y.shape[-1])).sum() for y in ys).backward()
    return ys, x.grad, {n: q.grad for n, q in model.named_parameters() if q.requires_grad}


def test_dropout_uses_one_mask_for_the_group():
    model = peft_projections(dropout=0.3)
    x = torch.randn(2, 9, 24)
    assert_same(reference_with_mask(model, x, 0.3), outputs_and_grads(model, x, True), rtol=1e-5, atol=1e-6)
    model.eval()  # no dropout in eval: PEFT's layers exactly
    with torch.no_grad():
        for y_fused, y_plain in zip(lora_group(x, tuple(model.base_model.model.get_submodule(n) for n in "qkv")),
                                    (model.base_model.model.get_submodule(n)(x) for n in "qkv")):
            torch.testing.assert_close(y_fused, y_plain, rtol=1e-5, atol=1e-6)


def test_keeping_dequantised_weights_skips_the_backward_dequantisation(monkeypatch):
    """Under non-reentrant checkpointing the Function runs forward, recompute, backward: three weight fetches per
    base; keeping the weights (KEEP_DEQUANTISED_WEIGHTS), the recompute's are kept for backward: two. The
    gradients do not change."""
    from torch.utils.checkpoint import checkpoint

    model = peft_projections(dropout=0.2)
    mods = tuple(model.base_model.model.get_submodule(n) for n in ("q", "k", "v"))
    calls, real = [], lora_kernels.base_weight
    monkeypatch.setattr(lora_kernels, "base_weight", lambda lin, dtype: calls.append(lin) or real(lin, dtype))
    x = torch.randn(2, 6, 24)
    results = []
    for keep in (False, True):
        calls.clear()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(4)
        xi = x.clone().requires_grad_(True)
        ys = checkpoint(lambda t, keep=keep: lora_group(t, mods, keep), xi, use_reentrant=False)
        sum(y.pow(2).sum() for y in ys).backward()
        results.append((len(calls), xi.grad, [p.grad for p in model.parameters() if p.requires_grad]))
    assert (results[0][0], results[1][0]) == (9, 6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_dora_and_bias_are_refused():
    torch.manual_seed(0)
    dora = get_peft_model(Projections(), LoraConfig(r=4, target_modules=["q", "k", "v"], use_dora=True))
    with pytest.raises(ModelError, match="uses DoRA"):
        _lora_group_ready(["q"], [dora.base_model.model.q])
    biased = get_peft_model(Projections(bias=True), LoraConfig(r=4, target_modules=["q", "k", "v"]))
    with pytest.raises(ModelError, match="has a bias"):
        _lora_group_ready(["q"], [biased.base_model.model.q])
    partial = get_peft_model(Projections(), LoraConfig(r=4, target_modules=["q", "v"]))
    assert _lora_group_ready(["q", "k", "v"], [partial.base_model.model.get_submodule(n) for n in "qkv"]) \
        == "k without LoRA"


def test_config_refuses_what_the_kernels_cannot_do(make_cfg):
    with pytest.raises(ConfigError, match="need adapter"):
        make_cfg("tiny-random", lora_qkv_kernel=True)
    with pytest.raises(ConfigError, match="not DoRA"):
        make_cfg("tiny-random", adapter="lora", lora_target_linear=True, peft_use_dora=True, lora_mlp_kernel=True)
    for engine in ("fsdp", "ddp"):  # both build through model.build_model (tests/distributed run them)
        assert make_cfg("tiny-random", adapter="lora", lora_target_linear=True, lora_o_kernel=True, **{engine: True})


def tiny_lora(make_cfg, tok, base="tiny-random", **keys):
    keys = {"adapter": "lora", "lora_target_linear": True, "lora_r": 4, "lora_alpha": 8, "sequence_len": 64,
            "gradient_checkpointing": True, **keys}
    cfg = make_cfg(base, **keys)
    torch.manual_seed(0)  # PEFT draws lora_A from the global generator
    model, info, _ = build_model(cfg, CPU, tokenizer=tok)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train(), info.notes


def step(model, batch):
    model.zero_grad(set_to_none=True)
    loss = token_loss_sum(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_step(plain_step, fused_step):
    """(loss, grads) of PEFT's layers and of the kernels: the same loss and every LoRA gradient (fp32 bounds)."""
    (loss_a, grads_a), (loss_b, grads_b) = plain_step, fused_step
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-4, atol=1e-6, msg=n)


def packed_batch():
    g = torch.Generator().manual_seed(1)

    def sample(n, i):
        ids = torch.randint(100, 131072, (n,), generator=g).tolist()
        return Sample(ids, [IGNORE_INDEX] + ids[1:], f"s{i}")
    return collate_packed([[sample(9, 0), sample(6, 1)], [sample(13, 2)]], 11)


@pytest.mark.parametrize("extra", [{}, {"tiled_mlp": True, "tiled_mlp_num_shards": 3}], ids=["plain", "tiled"])
def test_tiny_model_with_kernels_equals_peft(make_cfg, tok, extra, monkeypatch):
    """Packed rows (two samples in a row, block-diagonal attention) through the whole model: same loss and
    LoRA gradients with the keys on as off, the same parameter names, the fused modules in place."""
    plain, _ = tiny_lora(make_cfg, tok, **extra)
    fused, notes = tiny_lora(make_cfg, tok, **extra, **KERNELS)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in fused.named_parameters()]
    assert "LoRA kernels: fused q,k,v in 2/2, o in 2/2, gate,up in 2/2, down in 2/2 decoder layers" in notes
    for layer in fused.get_base_model().model.layers:
        assert isinstance(layer.self_attn, LoRAFusedAttention) and layer.self_attn.fuse_qkv and layer.self_attn.fuse_o
        assert isinstance(layer.mlp, SwiGLUMLP) and layer.mlp.fuse_gate_up and layer.mlp.fuse_down
    batch = packed_batch()
    plain_step = step(plain, batch)
    calls, apply = [], lora_kernels.LoRAGroupFunction.apply
    monkeypatch.setattr(lora_kernels.LoRAGroupFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    fused_step = step(fused, batch)
    shards = extra.get("tiled_mlp_num_shards", 1)  # 2 layers × ((q,k,v) + o + shards × ((gate,up) + down)) …
    assert len(calls) == 16 if shards == 1 else len(calls) >= 2 * (2 + 2 * shards)  # … and again in recompute
    assert len(plain_step[1]) == 2 * 7 * 2
    assert_same_step(plain_step, fused_step)


def test_partial_groups_fall_back_with_a_note(make_cfg, tok):
    keys = {"lora_target_linear": False, "lora_target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]}
    plain, _ = tiny_lora(make_cfg, tok, **keys)
    fused, notes = tiny_lora(make_cfg, tok, **keys, **KERNELS)
    assert "LoRA kernels: q,k,v of 2 layers keep PEFT's layers (k_proj without LoRA)" in notes
    assert "LoRA kernels: gate,up of 2 layers keep PEFT's layers (gate_proj, up_proj without LoRA)" in notes
    layer = fused.get_base_model().model.layers[0]
    assert not layer.self_attn.fuse_qkv and layer.self_attn.fuse_o
    assert not layer.mlp.fuse_gate_up and layer.mlp.fuse_down
    batch = packed_batch()
    assert_same_step(step(plain, batch), step(fused, batch))


def test_disabled_and_merged_adapters_take_peft_path(make_cfg, tok):
    """DPO's reference pass disables the adapters; merging folds them into the base: both must give PEFT's result."""
    fused, _ = tiny_lora(make_cfg, tok, **KERNELS)
    fused.eval()
    ids = torch.randint(100, 131072, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted = fused(input_ids=ids).logits
        with fused.disable_adapter():
            bare = fused(input_ids=ids).logits
        fused.merge_adapter()
        merged = fused(input_ids=ids).logits
        fused.unmerge_adapter()
    assert not torch.allclose(bare, adapted, atol=1e-4)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
    plain, _ = tiny_lora(make_cfg, tok)
    with torch.no_grad(), plain.disable_adapter():
        torch.testing.assert_close(bare, plain.eval()(input_ids=ids).logits, rtol=1e-6, atol=1e-6)


def test_mistral3_language_model_is_fused_and_the_vision_tower_is_not(make_cfg, tok):
    plain, _ = tiny_lora(make_cfg, tok, base="tiny-random-vision")
    fused, notes = tiny_lora(make_cfg, tok, base="tiny-random-vision", **KERNELS)
    assert "LoRA kernels: fused q,k,v in 2/2, o in 2/2, gate,up in 2/2, down in 2/2 decoder layers" in notes
    assert not any(isinstance(m, LoRAFusedAttention) for m in fused.get_base_model().model.vision_tower.modules())
    batch = packed_batch()
    assert_same_step(step(plain, batch), step(fused, batch))


def test_generation_with_the_kv_cache_is_unchanged(make_cfg, tok):
    """GRPO's rollouts generate with the training model: the fused attention updates the cache as MistralAttention."""
    ids = torch.randint(100, 131072, (1, 7), generator=torch.Generator().manual_seed(1))
    tokens = []
    for keys in ({}, KERNELS):
        model, _ = tiny_lora(make_cfg, tok, gradient_checkpointing=False, **keys)
        with torch.no_grad():
            tokens.append(model.eval().generate(input_ids=ids, max_new_tokens=8, do_sample=False, use_cache=True))
    assert torch.equal(tokens[0], tokens[1])
