"""Ulysses sequence parallelism (DeepSpeed-Ulysses): one long sequence spread over P processes.

    sequence_parallel_degree: 2      (Axolotl's key; its newer name context_parallel_size means the same here)

Each of the P ranks of a sequence-parallel group holds a contiguous slice of every row: T/P tokens. Everything
but attention works token by token (embeddings, norms, MLP, lm_head, the loss), so it runs on the slice alone.
Attention needs the whole sequence; before it, an all-to-all turns each rank's (B, H, T/P, D) query, key and value
into (B, H/P, T, D): every rank gets the full sequence for H/P of the heads. Attention runs on those heads, and a
second all-to-all turns the (B, T, H/P, D) result back into the slice's (B, T/P, H, D). Magistral Small, 2 ranks:
16 of the 32 query heads and 4 of the 8 key/value heads each; the activations of every layer are halved, the
attention's inputs travel twice per layer (forward) and twice again in backward.

Positions. Rank r's slice is tokens [r·T/P, (r+1)·T/P) and RoPE gets their true positions (position_ids of the
slice, from the full row), so the rotated queries and keys are those of the one-process run.

Labels. Position t is scored against token t+1. The full row's targets are labels[1:] followed by "ignored";
rank r takes its slice of those, so the last token of a slice is scored against the first token of the next
slice. The trained tokens of the row are counted once per group: the loss normaliser divides the sum of all
ranks' counts by P as well (sp_normaliser).

Gradients. Each rank backpropagates its slice's loss; the all-to-all's backward sends each attention-input
gradient back to the rank that computed that input, so a rank's parameter gradients are the part of the full
row's gradient that its own computations produced, and the row's gradient is their SUM over the group. DDP and
FSDP2 average over all N = P × D ranks (÷ N), so the divisor of each rank's loss sum is (all ranks' tokens / P) / N.
The D = N / P groups are data-parallel: group g (ranks g·P … g·P+P-1) trains item g, g+D, … of each epoch.

Attention kernel on the full sequence: unpacked rows are causal (right padding is exact under the causal rule);
packed rows attend within their samples: torch's varlen kernel on CUDA (model/varlen_attention.py), one attention
per sample elsewhere (the CPU, tests); no T × T mask either way. Gloo (CPU) implements all_to_all, so the same code runs there.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from magistune.config import ConfigError
from magistune.data.sample import IGNORE_INDEX
from magistune.model.varlen_attention import varlen_attention
from magistune.train.batches import Batch, cu_seq_lens_varlen
from magistune.train.loss import cce_sum, cce_unusable, chunked_ce_sum, decoder_and_head, fallback_note, note_once
from magistune.train.offload import OffloadActivations

NAME = "magistune_ulysses"


@dataclass(frozen=True)
class SequenceGroup:
    """This rank's sequence-parallel group: `size` ranks holding slices of the same rows, this one `index`-th."""

    size: int
    index: int
    group: object  # the torch.distributed ProcessGroup of the `size` ranks
    dp_rank: int  # which of the world / size data-parallel groups this is
    dp_world: int


def check_degree(degree: int, world: int, text_config) -> None:
    """ConfigError unless P divides the number of processes and both head counts of the model."""
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    if world % degree:
        raise ConfigError(f"sequence_parallel_degree: {degree} does not divide the {world} processes (torchrun "
                          "--nproc-per-node × nodes must be a multiple of it)")
    if heads % degree or kv_heads % degree:
        raise ConfigError(f"sequence_parallel_degree: {degree} must divide the model's {heads} attention heads and "
                          f"{kv_heads} key/value heads (each rank attends with heads / degree of them); "
                          f"use one of {[d for d in range(2, kv_heads + 1) if kv_heads % d == 0 and heads % d == 0]}")
    if getattr(text_config, "sliding_window", None) is not None:
        raise ConfigError("sequence_parallel_degree: the model has a sliding attention window, which Ulysses "
                          "attention does not implement")


def new_groups(rank: int, world: int, degree: int) -> SequenceGroup:
    """Consecutive ranks form the groups: degree 2 on 4 ranks → {0, 1} and {2, 3}. Every rank creates every group
    (torch.distributed's rule), then keeps its own."""
    mine = None
    for g in range(world // degree):
        members = list(range(g * degree, (g + 1) * degree))
        pg = dist.new_group(members)
        if rank in members:
            mine = SequenceGroup(degree, rank - g * degree, pg, g, world // degree)
    return mine


# --- the all-to-all, differentiable --------------------------------------------------------------------------

def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split x in P pieces along scatter_dim, send piece j to rank j, concatenate what arrives along gather_dim."""
    size = dist.get_world_size(group)
    pieces = [p.contiguous() for p in x.chunk(size, dim=scatter_dim)]
    out = [torch.empty_like(p) for p in pieces]
    dist.all_to_all(out, pieces, group=group)
    return torch.cat(out, dim=gather_dim)


class AllToAll(torch.autograd.Function):
    """Its backward is the all-to-all the other way round: each gradient piece goes back where it came from."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return all_to_all(grad, ctx.group, gather_dim, scatter_dim), None, None, None


# --- the attention function ----------------------------------------------------------------------------------

def ulysses_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature; the slices' q (B, H, T/P, D), k/v (B, H_kv, T/P, D) → (B, T/P, H, D).

    The loss passes `magistune_sp` (the SequenceGroup) and `magistune_sp_positions` (the full rows' position_ids,
    None for unpacked rows) through the model's forward keywords; gradient checkpointing keeps them for the
    recomputation in backward."""
    sp: SequenceGroup | None = kwargs.pop("magistune_sp", None)
    positions = kwargs.pop("magistune_sp_positions", None)
    kwargs.pop("position_ids", None)  # the slice's; attention needs no positions (RoPE is applied already)
    if sp is None:  # a forward that is not sequence-parallel (a whole sequence on this rank)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q, k, v = (AllToAll.apply(x, sp.group, 1, 2) for x in (query, key, value))  # heads scattered, sequence gathered
    if positions is not None:  # packed rows: causal inside each sample (varlen kernel, or sample by sample)
        out, _ = varlen_attention(module, q, k, v, None, dropout=dropout, scaling=scaling,
                                  **cu_seq_lens_varlen(positions))
    else:  # causal over the row: right padding is exact
        out, _ = sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, **kwargs)
    return AllToAll.apply(out, sp.group, 1, 2), None  # (B, T, H/P, D) → (B, T/P, H, D)


@functools.cache
def register() -> str:
    """Make NAME a valid attn_implementation (once per process)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, ulysses_attention)
    return NAME


def use_ulysses(model: torch.nn.Module) -> None:
    """Route the language model's attention through ulysses_attention (the vision tower keeps its own)."""
    register()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.config.get_text_config()._attn_implementation = NAME


# --- the loss on a slice ------------------------------------------------------------------------------------

def padded_to_multiple(batch: Batch, multiple: int, pad_id: int) -> Batch:
    """Pad the rows on the right to a multiple of `multiple` tokens (pad id, ignored labels, mask 0; packed rows'
    positions continue the last sample's, which no earlier token attends to)."""
    extra = -batch.input_ids.shape[1] % multiple
    if not extra:
        return batch
    pos = batch.position_ids
    if pos is not None:
        pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, extra + 1, device=pos.device)], dim=1)
    return Batch(F.pad(batch.input_ids, (0, extra), value=pad_id), F.pad(batch.labels, (0, extra), value=IGNORE_INDEX),
                 F.pad(batch.attention_mask, (0, extra), value=0), batch.sources, position_ids=pos)


def slice_loss_sum(model: torch.nn.Module, batch: Batch, sp: SequenceGroup, pad_id: int, cce: bool = False,
                   offload: bool = False) -> torch.Tensor:
    """This rank's part of loss.token_loss_sum: the summed cross-entropy of its slice's trained targets."""
    if batch.pixel_values is not None:
        raise ConfigError("sequence_parallel_degree: rows with images are not supported (the image tokens of a row "
                          "may straddle two slices); train without images or with sequence_parallel_degree: 1")
    body, head = decoder_and_head(model)
    batch = padded_to_multiple(batch, sp.size, pad_id)
    b, t = batch.input_ids.shape
    full_pos = batch.position_ids if batch.packed else torch.arange(t, device=batch.input_ids.device).expand(b, t)
    targets = F.pad(batch.labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # token t is scored against label t+1
    lo, hi = sp.index * t // sp.size, (sp.index + 1) * t // sp.size
    with OffloadActivations() if offload and torch.is_grad_enabled() else contextlib.nullcontext():
        hidden = body(input_ids=batch.input_ids[:, lo:hi], position_ids=full_pos[:, lo:hi], use_cache=False,
                      magistune_sp=sp, magistune_sp_positions=batch.position_ids).last_hidden_state
    y = targets[:, lo:hi]
    keep = y != IGNORE_INDEX
    h, y = hidden[keep], y[keep]
    if cce and h.shape[0]:
        why = cce_unusable(head, h)
        if why is None:
            return cce_sum(head, h, y)
        note_once(fallback_note(why))
    return chunked_ce_sum(head, h, y)  # no trained token here: 0, still connected (backward runs the collectives)


def slice_loss_fn(cfg, sp: SequenceGroup, pad_id: int):
    """The loss of a sequence-parallel rank with the config's options (as loss.loss_fn_for)."""
    return functools.partial(slice_loss_sum, sp=sp, pad_id=pad_id, cce=cfg.use_cce, offload=cfg.activation_offloading)


def sp_normaliser(normaliser, degree: int):
    """Each group's P ranks count the same trained tokens: the sum over all ranks counts every token P times."""
    return lambda n_trained: normaliser(n_trained) / degree


__all__ = ["NAME", "AllToAll", "SequenceGroup", "all_to_all", "check_degree", "new_groups",
           "padded_to_multiple", "register", "slice_loss_fn", "slice_loss_sum", "sp_normaliser", "ulysses_attention",
           "use_ulysses"]
