"""The memory-efficient losses: chunked cross-entropy equals the full-logits loss (value and gradients); Cut Cross
Entropy is chosen from the config, falls back to the chunked loss with a note off CUDA, and on a GPU agrees
with it (marked gpu)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from magistune.config import parse_config
from magistune.train.batches import collate
from magistune.train.loss import (
    NOT_INSTALLED, _cce_installed, cce_unusable, chunked_ce_sum, decoder_and_head, loss_fn_for, note_once,
    token_loss_sum,
)
from train_helpers import PAD, make_lm, make_samples


def cfg(**keys):
    return parse_config({"base_model": "tiny-random", "datasets": [{"path": "x.jsonl"}], **keys})[0]


@pytest.mark.parametrize("n,chunk", [(50, 7), (64, 16), (10, 1024)])
def test_chunked_loss_and_gradients_equal_the_full_logits_loss(n, chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 1000, bias=False)
    hidden = torch.randn(n, 32, requires_grad=True)
    targets = torch.randint(0, 1000, (n,))

    full = F.cross_entropy(head(hidden).float(), targets, reduction="sum")  # all N × V logits at once
    g_full = torch.autograd.grad(full, [hidden, head.weight])
    chunked = chunked_ce_sum(head, hidden, targets, chunk=chunk)
    g_chunked = torch.autograd.grad(chunked, [hidden, head.weight])
    # fp32; measured at 3,000 × 131,072 with 1,024-row chunks: the same loss, gradients within 6e-7 of the largest
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-5)
    for a, b in zip(g_chunked, g_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_loss_fn_for_reads_the_config():
    assert loss_fn_for(cfg()) is token_loss_sum
    fn = loss_fn_for(cfg(cut_cross_entropy=True))
    assert isinstance(fn, functools.partial) and fn.keywords == {"cce": True, "offload": False}
    fn = loss_fn_for(cfg(plugins=["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"]))
    assert fn.keywords["cce"]  # Axolotl's plugin line alone
    assert loss_fn_for(cfg(activation_offloading=True)).keywords == {"cce": False, "offload": True}


def test_cce_off_cuda_falls_back_to_the_chunked_loss_with_a_note(capsys):
    note_once.cache_clear()
    model = make_lm(1)
    batch = collate(make_samples(3, seed=2), PAD)
    expected = token_loss_sum(model, batch)
    fn = loss_fn_for(cfg(cut_cross_entropy=True))
    torch.testing.assert_close(fn(model, batch), expected, rtol=0, atol=0)
    fn(model, batch)
    err = capsys.readouterr().err
    assert err.count("note: cut_cross_entropy:") == 1 and "chunked cross-entropy" in err  # once, not per step


def test_cce_unusable_says_why():
    model = make_lm(2)
    _, head = decoder_and_head(model)
    why = cce_unusable(head, torch.zeros(2, 32))
    assert ("CUDA" in why) if _cce_installed() else why == NOT_INSTALLED
    from peft import LoraConfig, get_peft_model

    lora_head = get_peft_model(make_lm(2), LoraConfig(r=2, target_modules=["lm_head"]))
    _, head = decoder_and_head(lora_head)
    if torch.cuda.is_available() and _cce_installed():
        assert "not a plain" in cce_unusable(head, torch.zeros(2, 32, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cce_on_cuda_matches_the_chunked_loss():
    pytest.importorskip("cut_cross_entropy")
    from peft import LoraConfig, get_peft_model
    from transformers import MistralForCausalLM

    from magistune.model_files import materialize_tiny

    torch.manual_seed(0)
    model = MistralForCausalLM.from_pretrained(materialize_tiny("tiny-random"), dtype=torch.bfloat16,
                                               device_map={"": "cuda"})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                             init_lora_weights=False))
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 131072, (2, 512), generator=g)
    labels = ids.clone()
    labels[:, :100] = -100
    from magistune.train.batches import Batch

    batch = Batch(ids, labels, torch.ones_like(ids), ["r", "r"]).to("cuda")
    _, head = decoder_and_head(model)
    assert cce_unusable(head, torch.zeros(1, 64, device="cuda", dtype=torch.bfloat16)) is None

    def run(cce):
        model.zero_grad(set_to_none=True)
        loss = token_loss_sum(model, batch, cce=cce)
        (loss / batch.n_trained).backward()
        return float(loss), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    (l_cce, g_cce), (l_ref, g_ref) = run(True), run(False)
    assert l_cce == pytest.approx(l_ref, rel=2e-3)  # bf16 logits; CCE accumulates the softmax in fp32
    for name in g_ref:
        cos = F.cosine_similarity(g_cce[name].flatten(), g_ref[name].flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))
