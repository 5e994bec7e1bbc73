"""Sample packing: several samples in one row of up to `sequence_len` tokens, none of them seeing another.

Why. Chat samples vary in length. 4 samples of 300, 700, 1,200 and 2,000 tokens padded to a micro-batch of
4 × 2,000 = 8,000 token slots hold 4,200 real tokens: 48% of the compute goes to padding. Packed, they fill
3 rows of 2,048 (2,000 | 1,200 + 700 | 300) and the packing efficiency is 4,200 / (3 × 2,048) = 68%; on
thousands of samples first-fit decreasing usually reaches 95-99%.

How a packed row trains exactly like its samples one by one (tests/train/test_train_packing.py):
  * position_ids restart at 0 at each sample, so the rotary embedding sees the same positions;
  * attention never crosses a sample: a block-diagonal causal mask. transformers builds it from those
    position_ids whenever no 2D attention_mask is passed (masking_utils.find_packed_sequence_indices: a position
    that does not continue the previous one starts a new sequence) for sdpa, eager and flex attention. Flash
    attention gets the boundaries as cu_seq_lens for its variable-length kernel (batches.Batch.model_inputs),
    because its own detection from position_ids only works for a single row;
  * the loss never predicts across a boundary: position t predicts label t+1, so the last token of sample k
    would be scored against the first token of sample k+1. That label is IGNORE_INDEX in the row. One by one it
    is never scored either (position 0 has no predecessor), so the trained-token count is the same;
  * a row's padding tail is a sequence of its own (positions 0, 1, …, labels ignored): nothing attends to it;
  * images (Mistral3): the model fills the [IMG] tokens with image features in token order, so a row's images
    are its samples' images in order; collate_packed keeps them in row-major token order.

Order. The packs are made once (first-fit decreasing, deterministic for a seed); every epoch shuffles the order
of the packs by (seed, epoch), as batches.StepStream does for samples, so a DataPosition resumes a packed run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from magistune.data.sample import IGNORE_INDEX, Sample


def first_fit_decreasing(lengths: list[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Indices of `lengths` grouped into bins whose lengths sum to ≤ capacity: longest first, each into the
    first bin with room. Equal lengths go in a seeded order, so packs differ between seeds but not between runs.

    First fit in O(n log n): a max segment tree over the free space of n bins (n items never need more), the
    opened bins being its leftmost leaves. Finding the leftmost bin with free ≥ length walks one root-to-leaf
    path: 100,000 samples are 100,000 × 17 levels, about a second in Python.
    """
    too_long = [(i, n) for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"packing: sample {i} has {n} tokens, more than sequence_len {capacity} "
                         f"({len(too_long)} such samples); the data step should have dropped or truncated them")
    n = len(lengths)
    if n == 0:
        return []
    g = torch.Generator().manual_seed(seed)
    tie = torch.randperm(n, generator=g).tolist()
    order = sorted(range(n), key=lambda i: (-lengths[i], tie[i]))

    size = 1 << max(0, (n - 1).bit_length())  # leaves: a power of two ≥ n
    free = [0] * size + [capacity] * n + [0] * (size - n)  # free[size + b] = room left in bin b; 1-based heap
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    bins: list[list[int]] = []
    for i in order:
        need, node = lengths[i], 1
        while node < size:  # descend to the leftmost leaf with room (the root has room: empty bins remain)
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


@dataclass(frozen=True)
class Packing:
    """Samples packed into rows: `packs[r]` lists the sample indices of row r, in row order."""

    packs: list[list[int]]
    n_samples: int
    n_tokens: int  # real tokens over all rows
    capacity: int  # sequence_len

    @property
    def efficiency(self) -> float:
        """Real tokens / token slots: 950,000 tokens in 480 rows of 2,048 = 950,000 / 983,040 = 96.6%."""
        return self.n_tokens / max(1, len(self.packs) * self.capacity)

    def describe(self) -> str:
        rows = f"{len(self.packs)} row" + ("s" if len(self.packs) != 1 else "")
        return (f"{self.n_samples} samples → {rows} of ≤ {self.capacity} tokens "
                f"({self.n_samples / max(1, len(self.packs)):.1f} samples/row), packing efficiency "
                f"{self.efficiency:.1%} ({self.n_tokens:,} tokens / {len(self.packs)} × {self.capacity} slots)")


def pack_samples(samples: list[Sample], capacity: int, seed: int) -> Packing:
    """First-fit decreasing packing of `samples` into rows of `capacity` tokens."""
    lengths = [len(s) for s in samples]
    return Packing(first_fit_decreasing(lengths, capacity, seed), len(samples), sum(lengths), capacity)


def packed_row(samples: list[Sample]) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, labels, position_ids) of one packed row, unpadded: samples back to back, positions restarting
    at 0 in each, and the label of each sample's first token ignored (see the module docstring)."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for s in samples:
        if len(s.labels) != len(s.input_ids):
            raise ValueError(f"{s.source}: {len(s.input_ids)} input ids but {len(s.labels)} labels")
        if not s.input_ids:
            continue
        ids += s.input_ids
        labels += [IGNORE_INDEX] + s.labels[1:]  # never predicted from the previous sample's last token
        positions += range(len(s))
    return ids, labels, positions


def shard_for_rank(items: list, rank: int, world: int) -> list:
    """Rank `rank`'s share of `items` when `world` processes train together: items[rank::world] after dropping
    the last len(items) % world, so every rank gets the same count (a rank with one micro-batch more would wait
    forever in a collective). 10 packs on 4 ranks: 2 each, 2 dropped.

    Call it on each epoch's shuffled order (StepStream(shard=...) does), not on the packs themselves: the
    ≤ world - 1 dropped items are then different ones every epoch. Packing must happen before sharding (on
    every rank identically) for the counts to be equal.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard_for_rank: rank {rank} of world {world}")
    usable = len(items) - len(items) % world
    return items[rank:usable:world]


def dropped_by_sharding(n_items: int, world: int) -> int:
    """How many items shard_for_rank leaves out per epoch (to say so)."""
    return n_items % world


def packings_for(cfg, train: list[Sample], eval_: list[Sample]) -> tuple[Packing | None, Packing | None]:
    """The packings the config asks for: the train split with sample_packing, the eval split too unless
    eval_sample_packing: false. None where samples go one per row."""
    if not cfg.sample_packing:
        return None, None
    train_packing = pack_samples(train, cfg.sequence_len, cfg.seed)
    pack_eval = cfg.eval_sample_packing is not False and bool(eval_)
    return train_packing, pack_samples(eval_, cfg.sequence_len, cfg.seed) if pack_eval else None
