"""The loss: per-token sum equals transformers' own loss; accumulation over micro-batches equals one big batch."""

import pytest
import torch

from magistune.train.batches import collate
from magistune.train.loss import chunked_ce_sum, decoder_and_head, evaluate, forward_backward, token_loss_sum
from train_helpers import PAD, make_lm, make_samples


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def hf_mean_loss(model, batch) -> torch.Tensor:
    """transformers' ForCausalLMLoss: shift by one, mean over labels != -100. The reference."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_token_loss_sum_equals_transformers_mean_times_count(lm, attn):
    """A right-padded batch: the reference gets the padding mask, token_loss_sum runs causal without it (no
    B × 1 × T × T mask), and the scored tokens cannot tell."""
    lm.config._attn_implementation = attn
    batch = collate(make_samples(3, seed=1), PAD)
    assert batch.attention_mask.min() == 0  # there is padding
    ours = token_loss_sum(lm, batch)
    ref = hf_mean_loss(lm, batch) * batch.n_trained
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_chunking_changes_nothing(lm):
    batch = collate(make_samples(3, seed=2), PAD)
    body, head = decoder_and_head(lm)
    hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    keep = batch.labels[:, 1:] != -100
    h, y = hidden[:, :-1][keep], batch.labels[:, 1:][keep]
    whole = chunked_ce_sum(head, h, y, chunk=10_000)
    (g_whole,) = torch.autograd.grad(whole, head.weight, retain_graph=True)
    small = chunked_ce_sum(head, h, y, chunk=3)  # many chunks, each recomputed in backward
    (g_small,) = torch.autograd.grad(small, head.weight)
    torch.testing.assert_close(small, whole)
    torch.testing.assert_close(g_small, g_whole)


def test_accumulated_gradient_equals_one_big_batch():
    # Very different trained-token counts per micro-batch: where per-micro-batch averaging goes wrong.
    samples = make_samples(2, seed=3, min_len=4, max_len=6) + make_samples(2, seed=4, min_len=30, max_len=40)
    micro = [collate(samples[i:i + 2], PAD) for i in (0, 2)]
    assert micro[0].n_trained * 3 < micro[1].n_trained

    big_model, acc_model, naive_model = make_lm(5), make_lm(5), make_lm(5)
    hf_mean_loss(big_model, collate(samples, PAD)).backward()
    reference = grads(big_model)

    step = forward_backward(acc_model, micro)
    accumulated = grads(acc_model)
    assert step.n_trained == sum(b.n_trained for b in micro)
    assert reference.keys() == accumulated.keys()
    for name in reference:
        torch.testing.assert_close(accumulated[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)

    # The common bug (mean per micro-batch, then mean over micro-batches) must differ: the test can fail.
    for b in micro:
        (hf_mean_loss(naive_model, b) / len(micro)).backward()
    naive = grads(naive_model)
    assert not torch.allclose(naive["lm_head.weight"], reference["lm_head.weight"], rtol=1e-3, atol=1e-6)

    # The reported step loss is the token mean over the whole step.
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(step.loss), hf_mean_loss(make_lm(5), collate(samples, PAD)),
                                   rtol=1e-5, atol=1e-5)


def test_through_a_peft_wrapper_lora_layers_are_in_the_forward():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_lm(6), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))  # non-zero B: LoRA changes outputs
    batch = collate(make_samples(2, seed=7), PAD)
    ours = token_loss_sum(model, batch)
    torch.testing.assert_close(ours, hf_mean_loss(model, batch) * batch.n_trained, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        assert not torch.allclose(token_loss_sum(model, batch), ours)
    ours.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_evaluate_is_the_token_mean_without_gradients(lm):
    lm.train()
    batches = [collate(s, PAD) for s in (make_samples(2, seed=8), make_samples(3, seed=9))]
    result = evaluate(lm, batches)
    assert lm.training  # restored
    assert all(p.grad is None for p in lm.parameters())
    lm.eval()
    with torch.no_grad():
        expected = sum(float(hf_mean_loss(lm, b)) * b.n_trained for b in batches) / sum(b.n_trained for b in batches)
    assert result.loss == pytest.approx(expected, rel=1e-5)
