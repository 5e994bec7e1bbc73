"""model/fused.py: the tiled MLP and the liger swaps compute what the stock modules compute, under the same names."""

from __future__ import annotations

import pytest
import torch
from transformers.models.mistral.modeling_mistral import MistralRMSNorm

from magistune.config import ConfigError, parse_config
from magistune.model import apply_lora, build_model, enable_checkpointing, load_model
from magistune.model.fused import FusedRMSNorm, SwiGLUMLP, apply_fused_parts, tiled_shards

CPU = torch.device("cpu")


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids)
    loss = out.logits.double().pow(2).mean()  # any scalar of every position's output
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def lora_model(text_dir, tok, make_cfg, **keys):
    cfg = make_cfg("tiny-random", adapter="lora", lora_target_linear=True, lora_r=4, lora_alpha=8,
                   gradient_checkpointing=True, sequence_len=64, **keys)
    model, _ = load_model(cfg, text_dir, CPU, tokenizer=tok)
    notes = apply_fused_parts(model, cfg, CPU)
    torch.manual_seed(0)  # PEFT draws lora_A from the global generator
    model = apply_lora(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B = 0 at the start would leave lora_A without gradient
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.train()
    return model, notes


@pytest.mark.parametrize("shards", [2, 3, 5])
def test_tiled_mlp_gives_the_same_loss_and_gradients(text_dir, tok, make_cfg, shards):
    ids = torch.randint(100, 131072, (2, 37), generator=torch.Generator().manual_seed(1))  # 37: uneven shards
    plain, _ = lora_model(text_dir, tok, make_cfg)
    tiled, notes = lora_model(text_dir, tok, make_cfg, tiled_mlp=True, tiled_mlp_num_shards=shards)
    assert all(isinstance(layer.mlp, SwiGLUMLP) and layer.mlp.shards == shards
               for layer in tiled.get_base_model().model.layers)
    assert notes and f"{shards} checkpointed shards" in notes[0]
    loss_a, grads_a = loss_and_grads(plain, ids)
    loss_b, grads_b = loss_and_grads(tiled, ids)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 7 * 2  # A and B of 7 linears in 2 layers
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)


def test_tiled_mlp_with_dropout_replays_the_same_masks(text_dir, tok, make_cfg, monkeypatch):
    """Each shard's checkpoint restores the RNG state for its recompute in backward, so LoRA dropout inside the
    MLP uses the forward's own masks: the gradients equal those of the same shards run without checkpoints."""
    ids = torch.randint(100, 131072, (1, 24), generator=torch.Generator().manual_seed(2))
    results = []
    for replay in (True, False):
        if not replay:  # the reference: shards computed directly, nothing recomputed
            monkeypatch.setattr("magistune.model.fused.checkpoint", lambda fn, x, use_reentrant: fn(x))
        model, _ = lora_model(text_dir, tok, make_cfg, tiled_mlp=True, tiled_mlp_num_shards=4, lora_dropout=0.3)
        torch.manual_seed(5)
        results.append(loss_and_grads(model, ids))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-9, msg=name)


def test_swapped_modules_keep_every_name(text_dir, tok, make_cfg, tmp_path):
    cfg = make_cfg("tiny-random", tiled_mlp=True, liger_glu_activation=True, liger_rms_norm=True, sequence_len=64)
    stock, _ = load_model(cfg, text_dir, CPU, tokenizer=tok)
    names = list(stock.state_dict())
    swapped, info, _ = build_model(cfg, CPU, tokenizer=tok)
    assert list(swapped.state_dict()) == names
    assert any("liger kernels need a CUDA GPU" in n for n in info.notes)  # CPU: the stock modules stay, said once
    assert not any(isinstance(m, FusedRMSNorm) for m in swapped.modules())
    assert all(isinstance(layer.mlp, SwiGLUMLP) and not layer.mlp.liger for layer in swapped.model.layers)
    fused = [FusedRMSNorm(m.weight, m.variance_epsilon) for m in swapped.modules() if isinstance(m, MistralRMSNorm)]
    assert len(fused) == 2 * 2 + 1
    enable_checkpointing(swapped)


def test_fused_norm_on_cpu_is_mistral_rmsnorm():
    ref = MistralRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 1.5, 16))
    fused = FusedRMSNorm(ref.weight, ref.variance_epsilon)
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    assert torch.equal(fused(x), ref(x))


def test_shard_count_follows_sequence_length(make_cfg):
    assert tiled_shards(make_cfg("tiny-random", tiled_mlp=True, sequence_len=32768), 5120) == 7
    assert tiled_shards(make_cfg("tiny-random", tiled_mlp=True, sequence_len=2048), 5120) == 2
    assert tiled_shards(make_cfg("tiny-random", tiled_mlp=True, tiled_mlp_num_shards=16, sequence_len=2048), 5120) == 16


@pytest.mark.parametrize("keys, message", [
    ({"liger_rope": True}, "RoPE is applied inside transformers' attention"),
    ({"liger_fused_linear_cross_entropy": True}, "use cut_cross_entropy"),
    ({"tiled_mlp_num_shards": 1}, "tiled_mlp_num_shards"),
])
def test_combinations_that_cannot_work_are_refused(keys, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"base_model": "tiny-random", "datasets": [{"path": "x.jsonl"}], **keys})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_liger_kernels_match_the_stock_modules_on_cuda(text_dir, tok, make_cfg):
    pytest.importorskip("liger_kernel")
    dev = torch.device("cuda")
    ids = torch.randint(100, 131072, (2, 64), generator=torch.Generator().manual_seed(3)).to(dev)
    results = []
    for keys in ({}, {"liger_glu_activation": True, "liger_rms_norm": True, "tiled_mlp": True}):
        cfg = make_cfg("tiny-random", adapter="lora", lora_target_linear=True, lora_r=4, bf16=True,
                       gradient_checkpointing=True, sequence_len=64, **keys)
        torch.manual_seed(0)  # PEFT draws lora_A from the global generator
        model, info, _ = build_model(cfg, dev, tokenizer=tok)
        assert not any("liger kernels need" in n for n in info.notes)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results.append(loss_and_grads(model, ids))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=2e-2, atol=0)
    for name in grads_a:  # bf16 roundings in other places: compare directions and sizes
        a, b = grads_a[name].float().flatten(), grads_b[name].float().flatten()
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99, name
        assert float(b.norm() / a.norm()) == pytest.approx(1, rel=5e-2), name
