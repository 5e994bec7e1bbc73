"""The loss: cross-entropy summed over trained tokens, normalised over the whole optimizer step.

Normalisation. A step of 4 micro-batches holding 10, 10, 10 and 970 trained tokens has one loss: the mean
over its 1,000 tokens, each token weighing 1/1,000. Averaging inside each micro-batch and then over the 4
micro-batches would give each of the first 30 tokens 1/40 of the step (25× too much) and each of the last
970 tokens 1/3,880 — short samples would dominate. So we count the trained tokens of every micro-batch of
the step first, then backpropagate sum(token losses) / (tokens of the whole step) for each micro-batch. The
accumulated gradient is exactly the gradient of one big batch's token mean (tests/train/test_train_loss.py).

Memory. Logits are the largest activation: 2,048 tokens × 131,072 vocab × 4 bytes (fp32) = 1 GiB per
sequence, plus as much again for the softmax saved for backward. We (1) project only the positions whose
next token is trained (prompts and padding never reach lm_head), and (2) beyond `CHUNK_TOKENS` such positions,
project them a chunk at a time inside an activation checkpoint, so no more than one chunk's logits is ever
alive: 1,024 × 131,072 × 4 = 512 MiB, recomputed chunk by chunk in backward (the extra matmul is ~3% of a
24B model's forward). A micro-batch with ≤ 1,024 trained tokens is one chunk and needs no recomputation.

Cut Cross Entropy (`cut_cross_entropy: true`, or Axolotl's CutCrossEntropyPlugin line). Apple's fused kernel
computes each logit tile in on-chip memory, keeps only the log-sum-exp per row and the target's logit, and
recomputes the tiles in backward: no logits in GPU memory at all (vs 512 MiB per chunk above) and no extra
lm_head matmul per chunk. It takes the same inputs as chunked_ce_sum (trained positions only, already shifted,
reduction="sum"), so the normalisation is unchanged. It runs on CUDA when the package is importable and lm_head is
a plain linear layer; anywhere else the chunked loss runs, after a note.

Seam. `token_loss_sum(model, batch)` is the whole contract: (hidden states of the decoder, lm_head) → the
summed loss. `loss_fn_for(cfg)` picks its options (CCE, activation offloading) from the config.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from magistune.data.sample import IGNORE_INDEX
from magistune.model.varlen_attention import NAME as VARLEN
from magistune.train.batches import Batch
from magistune.train.offload import OffloadActivations

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


def cce_sum(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ cross-entropy(hidden[i] @ W.T, targets[i]) by Cut Cross Entropy's kernel (CUDA only)."""
    from cut_cross_entropy import linear_cross_entropy

    w = head.weight
    return linear_cross_entropy(hidden.to(w.dtype), w, targets, reduction="sum").float()


NOT_INSTALLED = "the cut_cross_entropy package cannot be imported (pip install cut-cross-entropy; it needs triton)"


@functools.cache
def _cce_installed() -> bool:
    if importlib.util.find_spec("cut_cross_entropy") is None:
        return False
    try:  # present but broken (no triton on a CPU-only torch, say) counts as absent
        import cut_cross_entropy  # noqa: F401
    except Exception:
        return False
    return True


def cce_unusable(head: nn.Module, hidden: torch.Tensor) -> str | None:
    """Why Cut Cross Entropy cannot compute this loss, or None when it can."""
    if not _cce_installed():
        return NOT_INSTALLED
    if not hidden.is_cuda:
        return f"it needs a CUDA device (this runs on {hidden.device.type})"
    w = getattr(head, "weight", None)
    if not isinstance(head, nn.Linear) or head.bias is not None or getattr(w, "quant_state", None) is not None:
        return f"lm_head is a {type(head).__name__}, not a plain bias-free linear layer (LoRA on lm_head?)"
    if type(w) is not torch.Tensor and type(w) is not nn.Parameter:  # e.g. an FSDP2-sharded DTensor
        return f"lm_head's weight is a {type(w).__name__}, not a whole tensor"
    return None


@functools.cache
def note_once(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr, flush=True)


def fallback_note(why: str) -> str:
    return f"cut_cross_entropy: {why}; using the chunked cross-entropy instead"


def uses_varlen_attention(body: nn.Module) -> bool:
    """Flash attention kernels (flash_attention_2/3, hub flash kernels, torch's varlen: model/varlen_attention.py)
    take packed boundaries as cu_seq_lens; the others (sdpa, eager, flex) get a block-diagonal mask that
    transformers builds from position_ids."""
    impl = body.config.get_text_config()._attn_implementation or ""
    return "flash" in impl or impl == VARLEN


def token_loss_sum(model: torch.nn.Module, batch: Batch, cce: bool = False, offload: bool = False) -> torch.Tensor:
    """Summed cross-entropy of a micro-batch over its trained tokens (not averaged).

    Position t predicts token t+1: hidden[:, :-1] is scored against labels[:, 1:]. `cce`: Cut Cross Entropy where
    it can run (cce_unusable says why not, once). `offload`: the activations that the decoder saves for backward
    wait in CPU memory (offload.py), while gradients are being computed.
    """
    body, head = decoder_and_head(model)
    inputs = batch.model_inputs(varlen=batch.packed and uses_varlen_attention(body))
    # Right-padded rows need no padding mask: under the causal rule no real token sees a later pad, and pads are
    # never scored. Without it sdpa runs causal, instead of a B × 1 × T × T mask (32 GiB for 2 rows of 131,072).
    inputs.pop("attention_mask", None)
    if "pixel_values" in inputs:  # the vision tower's dtype (bf16 or fp32), as the HF processor would hand it
        inputs["pixel_values"] = inputs["pixel_values"].to(body.get_input_embeddings().weight.dtype)
    with OffloadActivations() if offload and torch.is_grad_enabled() else contextlib.nullcontext():
        hidden = body(**inputs, use_cache=False).last_hidden_state
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h, y = hidden[:, :-1][keep], targets[keep]
    if cce and h.shape[0]:
        why = cce_unusable(head, h)
        if why is None:
            return cce_sum(head, h, y)
        note_once(fallback_note(why))
    return chunked_ce_sum(head, h, y)


def loss_fn_for(cfg) -> LossFn:
    """The loss the config asks for: token_loss_sum with Cut Cross Entropy and/or activation offloading."""
    if cfg.use_cce and not _cce_installed():
        note_once(fallback_note(NOT_INSTALLED))  # said before the model loads; the same note is not repeated
    if not cfg.use_cce and not cfg.activation_offloading:
        return token_loss_sum
    return functools.partial(token_loss_sum, cce=cfg.use_cce, offload=cfg.activation_offloading)


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
                     device: torch.device | str = "cpu",
                     normaliser: Callable[[int], float] | None = None,
                     grad_sync: Callable[[bool], contextlib.AbstractContextManager] | None = None) -> StepLoss:
    """Accumulate the gradient of one optimizer step: Σ_micro-batches ∇(loss_sum / tokens of the step).

    Micro-batches must already be on `device` or are moved there one at a time. `normaliser` (multi-GPU,
    distributed.token_normaliser) turns this rank's trained-token count into the divisor: all ranks' tokens / number of ranks,
    as the gradient averaging over ranks divides by that number again. `grad_sync(is_last)` (multi-GPU) wraps
    each micro-batch (sharding.grad_sync): adapters reduce their gradients over the ranks once, after the last one. The returned
    StepLoss is this rank's.
    """
    n_trained = sum(b.n_trained for b in micro)  # counted first, over the whole step
    n_tokens = sum(b.n_tokens for b in micro)
    divisor = n_trained if normaliser is None else normaliser(n_trained)
    if divisor == 0:  # no trained token in the step (on any rank)
        return StepLoss(0.0, 0, n_tokens)
    total = torch.zeros((), dtype=torch.float64, device=device)  # on the device: no host sync per micro-batch
    for i, b in enumerate(micro):
        b = b.to(device)
        with grad_sync(i == len(micro) - 1) if grad_sync else contextlib.nullcontext():
            with autocast():
                loss_sum = loss_fn(model, b)
            (loss_sum / divisor).backward()
        total += loss_sum.detach().double()
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
