"""The preference recipe's step: micro-batches of one step accumulate to one big batch's gradient (pairs and KTO),
the precomputed table gives the same loss as the adapters-off reference, and eval reports the same metrics."""

import contextlib
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model

from magistune.data.sample import KTOSample
from magistune.train.dpo import DPO
from magistune.train.preference_ref import compute_split
from magistune.train.preference_step import collate_kto, collate_pairs, kto_kl_rows
from test_train_preference_step import make_pairs
from train_helpers import PAD, make_lm


def lora_model(seed=4):
    model = get_peft_model(make_lm(seed), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)  # policy ≠ reference, so every loss has a gradient
    return model


def recipe(rl, model, train, table=None):
    r = DPO.__new__(DPO)
    r.cfg = SimpleNamespace(rl=rl, rl_beta=0.1, dpo_label_smoothing=0.0, simpo_gamma=0.5, cpo_alpha=1.0,
                            kto_desirable_weight=1.0, kto_undesirable_weight=1.5, micro_batch_size=2)
    r.kto, r.model, r.table, r.cce = rl == "kto", model, table, False
    r.autocast, r.device, r.pad_id, r.image_encoder = contextlib.nullcontext, torch.device("cpu"), PAD, None
    r.data = SimpleNamespace(train=train, eval=train)
    if r.kto:
        r.kl_rows = {"train": kto_kl_rows(train), "eval": kto_kl_rows(train)}
    return r


def samples_for(rl, n=5):
    pairs = make_pairs(n, seed=11)
    if rl != "kto":
        return pairs
    return [KTOSample(s.chosen_input_ids, s.chosen_labels, s.source, label=i % 3 != 0) for i, s in enumerate(pairs)]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def micro(r, groups):
    collate = collate_kto if r.kto else collate_pairs
    return [(idx, collate([r.data.train[i] for i in idx], PAD)) for idx in groups]


@pytest.mark.parametrize("rl", ["dpo", "ipo", "orpo", "simpo", "kto"])
def test_accumulated_micro_batches_equal_one_batch(rl):
    train = samples_for(rl)
    one, acc = recipe(rl, lora_model(), train), recipe(rl, lora_model(), train)
    big = one.forward_backward(micro(one, [[0, 1, 2, 3, 4]]))
    small = acc.forward_backward(micro(acc, [[0], [1, 2, 3], [4]]))  # uneven micro-batches
    assert big.n_items == small.n_items == 5
    assert small.loss == pytest.approx(big.loss, rel=1e-6)
    assert small.stats() == pytest.approx(big.stats(), rel=1e-5, abs=1e-6)  # fp32: other padding widths
    g_big, g_small = grads(one.model), grads(acc.model)
    assert g_big and g_big.keys() == g_small.keys()
    for name in g_big:
        torch.testing.assert_close(g_small[name], g_big[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("rl", ["dpo", "kto"])
def test_precomputed_table_equals_the_adapters_off_reference(rl):
    train = samples_for(rl)
    live = recipe(rl, lora_model(), train)
    split = compute_split(live.model, train, live.kto, PAD, 2, torch.device("cpu"), contextlib.nullcontext)
    table = {f"train.{k}": v for k, v in split.items()} | {f"eval.{k}": v for k, v in split.items()}
    cached = recipe(rl, lora_model(), train, table)
    a = live.forward_backward(micro(live, [[0, 1], [2, 3, 4]]))
    b = cached.forward_backward(micro(cached, [[0, 1], [2, 3, 4]]))
    assert b.loss == pytest.approx(a.loss, rel=1e-6) and b.stats() == pytest.approx(a.stats(), rel=1e-5, abs=1e-7)
    assert cached.evaluate().stats() == pytest.approx(live.evaluate().stats(), rel=1e-5, abs=1e-7)


def test_eval_is_the_train_loss_without_gradient():
    train = samples_for("dpo")
    r = recipe("dpo", lora_model(), train)
    ev = r.evaluate()
    assert not any(p.grad is not None for p in r.model.parameters()) and r.model.training
    step = r.forward_backward(micro(r, [[0, 1, 2, 3, 4]]))
    assert ev.loss == pytest.approx(step.loss, rel=1e-6)  # no dropout in this model: eval mode changes nothing
    assert ev.n_items == 5 and 0 <= ev.stats()["reward_accuracy"] <= 1
