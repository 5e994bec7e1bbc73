"""The loss: cross-entropy summed over trained tokens, normalised over the whole optimizer step.

Normalisation. A step of 4 micro-batches holding 10, 10, 10 and 970 trained tokens has one loss: the mean
over its 1,000 tokens, each token weighing 1/1,000. Averaging inside each micro-batch and then over the 4
micro-batches would give each of the first 30 tokens 1/40 of the step (25× too much) and each of the last
970 tokens 1/3,880 — short samples would dominate. So we count the trained tokens of every micro-batch of
the step first, then backpropagate sum(token losses) / (tokens of the whole step) for each micro-batch. The
accumulated gradient is exactly the gradient of one big batch's token mean (tests/train/test_loss.py).

Memory. Logits are the largest activation: 2,048 tokens × 131,072 vocab × 4 bytes (fp32) = 1 GiB per
sequence, plus as much again for the softmax saved for backward. We (1) project only the positions whose
next token is trained (prompts and padding never reach lm_head), and (2) beyond `CHUNK_TOKENS` such positions,
project them a chunk at a time inside an activation checkpoint, so no more than one chunk's logits is ever
alive: 1,024 × 131,072 × 4 = 512 MiB, recomputed chunk by chunk in backward (the extra matmul is ~3% of a
24B model's forward). A micro-batch with ≤ 1,024 trained tokens is one chunk and needs no recomputation.

Seam. `token_loss_sum(model, batch)` is the whole contract: (hidden states of the decoder, lm_head) → the
summed loss. A fused kernel (Cut Cross Entropy) replaces `chunked_ce_sum` without touching the loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from magistune.data.sample import IGNORE_INDEX
from magistune.train.batches import Batch

CHUNK_TOKENS = 1024

LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]  # (model, micro-batch) → summed loss (scalar)


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body (input ids → last hidden states) and lm_head, through a PEFT wrapper if any.

    MistralForCausalLM: (model.model, model.lm_head). A PeftModel wraps the same modules with LoRA layers
    injected in place, so unwrapping it keeps the adapters in the forward pass.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings()
    body = getattr(inner, inner.base_model_prefix, None)
    if head is None or body is None or body is inner:
        raise TypeError(f"{type(inner).__name__}: expected a causal LM with a base model and an lm_head")
    return body, head


def _ce_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # the softmax in fp32 even under bf16 autocast
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_ce_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                   chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """Σ cross-entropy(head(hidden[i]), targets[i]) over N rows, `chunk` rows of logits at a time."""
    if hidden.shape[0] <= chunk:  # one chunk: keeping its logits for backward is within the budget
        return _ce_sum(head, hidden, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk):
        h, y = hidden[i:i + chunk], targets[i:i + chunk]
        if torch.is_grad_enabled():
            # Keep only h for backward; the chunk's logits are recomputed there and freed again.
            total = total + checkpoint(_ce_sum, head, h, y, use_reentrant=False)
        else:
            total = total + _ce_sum(head, h, y)
    return total


def token_loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy of a micro-batch over its trained tokens (not averaged).

    Position t predicts token t+1: hidden[:, :-1] is scored against labels[:, 1:].
    """
    body, head = decoder_and_head(model)
    inputs = batch.model_inputs()
    if "pixel_values" in inputs:  # the vision tower's dtype (bf16 or fp32), as the HF processor would hand it
        inputs["pixel_values"] = inputs["pixel_values"].to(body.get_input_embeddings().weight.dtype)
    hidden = body(**inputs, use_cache=False).last_hidden_state
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return chunked_ce_sum(head, hidden[:, :-1][keep], targets[keep])


def loss_fn_for(cfg) -> LossFn:
    """The loss the config asks for. Cut Cross Entropy arrives with the throughput issue (config notes it)."""
    return token_loss_sum


@dataclass
class StepLoss:
    loss_sum: float  # Σ token losses of the step
    n_trained: int  # trained tokens of the step: the normaliser
    n_tokens: int  # real tokens processed (tokens/s)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.n_trained if self.n_trained else float("nan")


def forward_backward(model: torch.nn.Module, micro: list[Batch], loss_fn: LossFn = token_loss_sum,
                     autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                     device: torch.device | str = "cpu") -> StepLoss:
    """Accumulate the gradient of one optimizer step: Σ_micro-batches ∇(loss_sum / tokens of the step).

    Micro-batches must already be on `device` or are moved there one at a time.
    """
    n_trained = sum(b.n_trained for b in micro)  # counted first, over the whole step
    n_tokens = sum(b.n_tokens for b in micro)
    if n_trained == 0:
        return StepLoss(0.0, 0, n_tokens)
    total = torch.zeros((), dtype=torch.float64)
    for b in micro:
        b = b.to(device)
        with autocast():
            loss_sum = loss_fn(model, b)
        (loss_sum / n_trained).backward()
        total += loss_sum.detach().double().cpu()
    return StepLoss(float(total), n_trained, n_tokens)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[Batch], loss_fn: LossFn = token_loss_sum,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             device: torch.device | str = "cpu") -> StepLoss:
    """The token-mean loss of a held-out split (model in eval mode: no dropout)."""
    was_training = model.training
    model.eval()
    total, n_trained, n_tokens = 0.0, 0, 0
    try:
        for b in batches:
            with autocast():
                total += float(loss_fn(model, b.to(device)))
            n_trained += b.n_trained
            n_tokens += b.n_tokens
    finally:
        model.train(was_training)
    return StepLoss(total, n_trained, n_tokens)
