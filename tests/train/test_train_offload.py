"""Activation offloading: with checkpointing, the tensors that go to the CPU are the decoder layers' inputs, and the
gradients are exactly those without offloading."""

from __future__ import annotations

import contextlib

import pytest
import torch

from magistune.model.adapt import enable_checkpointing
from magistune.train.loss import chunked_ce_sum, decoder_and_head, token_loss_sum
from magistune.train.offload import OffloadActivations
from train_helpers import make_lm


class Recording(OffloadActivations):
    """Also remembers the shape of every tensor it moved."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.shapes = []

    def _pack(self, t):
        packed = super()._pack(t)
        if not isinstance(packed, torch.Tensor):
            self.shapes.append(tuple(t.shape))
        return packed


def grads_with(model, ids, context):
    model.zero_grad(set_to_none=True)
    body, head = decoder_and_head(model)
    with context:
        hidden = body(input_ids=ids).last_hidden_state
    loss = chunked_ce_sum(head, hidden[:, :-1].reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True])
def test_offloaded_gradients_are_identical_and_layer_inputs_are_what_moves(lora):
    model = make_lm(3)
    enable_checkpointing(model)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))
    model.train()
    ids = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    loss, ref = grads_with(model, ids, contextlib.nullcontext())
    # On the CPU "offloading" copies CPU → CPU: the same round trip through the hooks as CUDA → pinned CPU.
    off = Recording(min_bytes=0, device_types=("cpu",))
    loss_off, got = grads_with(model, ids, off)
    assert loss_off == loss and ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(got[name], ref[name]), name  # bit-identical: the values only took a trip
    n_layers = model.config.num_hidden_layers
    assert off.shapes.count((2, 40, 32)) >= n_layers  # each checkpointed layer's input (B, T, hidden)


def test_without_checkpointing_everything_saved_moves():
    model = make_lm(4).train()
    ids = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with_ckpt = make_lm(4)
    enable_checkpointing(with_ckpt)
    with_ckpt.train()
    a, b = Recording(min_bytes=0, device_types=("cpu",)), Recording(min_bytes=0, device_types=("cpu",))
    grads_with(model, ids, a)
    grads_with(with_ckpt, ids, b)
    assert a.bytes_offloaded > 3 * b.bytes_offloaded  # checkpointing leaves only the layer inputs to move


def test_token_loss_sum_with_offload_on_cpu_is_unchanged():
    from magistune.train.batches import collate
    from train_helpers import PAD, make_samples

    model = make_lm(5)
    enable_checkpointing(model)
    model.train()
    batch = collate(make_samples(3, seed=5), PAD)
    torch.testing.assert_close(token_loss_sum(model, batch, offload=True), token_loss_sum(model, batch), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_on_cuda_moves_layer_inputs_to_pinned_memory_and_keeps_gradients():
    from transformers import MistralForCausalLM

    from magistune.model_files import materialize_tiny

    torch.manual_seed(0)
    model = MistralForCausalLM.from_pretrained(materialize_tiny("tiny-random"), dtype=torch.float32,
                                               device_map={"": "cuda"})
    enable_checkpointing(model)
    model.train()
    ids = torch.randint(1000, 131072, (2, 4096), device="cuda")
    loss, ref = grads_with(model, ids, contextlib.nullcontext())
    off = Recording(min_bytes=1 << 20)
    loss_off, got = grads_with(model, ids, off)
    assert off.shapes.count((2, 4096, 64)) >= model.config.num_hidden_layers
    assert loss_off == pytest.approx(loss, rel=1e-6)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7)
