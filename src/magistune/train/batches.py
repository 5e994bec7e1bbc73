"""Samples → padded micro-batches → optimizer steps, in a deterministic, resumable order.

One optimizer step = `gradient_accumulation_steps` micro-batches of `micro_batch_size` samples:
2 samples × 4 micro-batches = 8 samples per step, and at sequence_len 2048 at most
2 × 2048 tokens × 4 accum = 16,384 tokens/step.

The order of an epoch is a permutation drawn from a `torch.Generator` seeded with (seed, epoch), so epoch 3
of a resumed run is the same as epoch 3 of an uninterrupted one without replaying epochs 0–2. Inside an
epoch, a `DataPosition` (epoch, step index) is all a checkpoint has to remember.

The last step of an epoch may hold fewer micro-batches, and its last micro-batch fewer samples: no sample
is dropped. The loss normalises by the trained tokens of the whole step (loss.py), so short steps are fine.

With sample packing (packing.py) the items are packs instead of samples: a micro-batch is `micro_batch_size`
rows of up to sequence_len tokens, each row several samples back to back (collate_packed), and an epoch
shuffles the packs the same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Iterator

import torch

from magistune.config import ConfigError
from magistune.data.sample import IGNORE_INDEX, Sample
from magistune.train.packing import packed_row, shard_for_rank


@dataclass
class Batch:
    """A right-padded micro-batch: (B, T) tensors, T = the longest sample (or packed row) of the micro-batch."""

    input_ids: torch.Tensor  # pad id after each sample's end
    labels: torch.Tensor  # IGNORE_INDEX on padding and on untrained tokens; aligned with input_ids
    attention_mask: torch.Tensor  # 1 on real tokens, 0 on padding
    sources: list[str]
    # Images of the whole micro-batch in token order: (N, 3, H_max, W_max), each image top-left and zero-padded
    # to the largest; image_sizes (N, 2) holds each one's real (height, width) in pixels.
    pixel_values: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None
    # Packed rows only (collate_packed): each sample's positions 0, 1, …; the padding tail counts from 0 too.
    position_ids: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @property
    def n_tokens(self) -> int:
        """Real (unpadded) tokens: what tokens/s counts."""
        return int(self.attention_mask.sum())

    @property
    def n_trained(self) -> int:
        """Tokens that are predicted and scored. The model shifts: label t is predicted from tokens < t, so
        the first position never counts (loss.py scores labels[:, 1:])."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, input_ids=move(self.input_ids), labels=move(self.labels),
                       attention_mask=move(self.attention_mask), pixel_values=move(self.pixel_values),
                       image_sizes=move(self.image_sizes), position_ids=move(self.position_ids))

    def model_inputs(self, varlen: bool = False) -> dict:
        """Keyword arguments for the model's forward: ids and mask, plus the images when there are any.

        Packed rows pass position_ids and no attention_mask: transformers then masks attention block-diagonally
        (packing.py). `varlen` (flash attention) adds the sample boundaries as cumulative lengths over the
        flattened B × T tokens, which its variable-length kernel takes directly (cu_seq_lens_varlen).
        """
        if self.packed:
            inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids}
            if varlen:
                inputs.update(cu_seq_lens_varlen(self.position_ids))
        else:
            inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.pixel_values is not None:
            inputs.update(pixel_values=self.pixel_values, image_sizes=self.image_sizes)
        return inputs


def cu_seq_lens_varlen(position_ids: torch.Tensor) -> dict:
    """Flash attention's varlen arguments for packed rows: every sequence (padding tails included) starts where
    its position is 0. Rows [[0 1 2 0 1 0 1 2 3], [0 1 2 3 4 0 1 2 3]] flatten to 18 tokens with starts
    0 3 5 9 14 and cu_seq_lens [0 3 5 9 14 18]; the longest sequence is 5 tokens."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


@dataclass(frozen=True)
class DataPosition:
    """Where the data stream stands: `step` optimizer steps of `epoch` are done."""

    epoch: int = 0
    step: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataPosition":
        return cls(epoch=int(d["epoch"]), step=int(d["step"]))


def collate_images(samples: list[Sample], image_encoder) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Pixels of every image of the micro-batch, recomputed from the stored bytes by mistral-common's own
    encoder (so they equal encode_chat_completion's), padded to the largest height and width.
    Memory: a 1540 × 1540 image is 3 × 1540² × 4 bytes = 28 MB in fp32, only for the micro-batch in flight."""
    blobs = [img for s in samples for img in s.images]
    if not blobs:
        return None, None
    if image_encoder is None:
        raise ValueError(f"{samples[0].source}: samples have images but the tokenizer has no image encoder")
    from magistune.data.images import pixel_values

    arrays = [pixel_values(image_encoder, b) for b in blobs]
    h, w = max(a.shape[1] for a in arrays), max(a.shape[2] for a in arrays)
    pixels = torch.zeros((len(arrays), 3, h, w), dtype=torch.float32)
    for i, a in enumerate(arrays):
        pixels[i, :, :a.shape[1], :a.shape[2]] = torch.from_numpy(a)
    sizes = torch.tensor([[a.shape[1], a.shape[2]] for a in arrays], dtype=torch.long)
    return pixels, sizes


def collate(samples: list[Sample], pad_id: int, image_encoder=None, width: int = 0) -> Batch:
    """Pad right to the longest sample, or to `width` if wider (pad_to_sequence_len): pad id in input_ids,
    IGNORE_INDEX in labels, 0 in attention_mask. Images go to pixel_values / image_sizes (see collate_images)."""
    if not samples:
        raise ValueError("collate: empty micro-batch")
    width = max([width] + [len(s) for s in samples])
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        if len(s.labels) != len(s.input_ids):
            raise ValueError(f"{s.source}: {len(s.input_ids)} input ids but {len(s.labels)} labels")
        n = len(s)
        ids[i, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(s.labels, dtype=torch.long)
        mask[i, :n] = 1
    pixels, sizes = collate_images(samples, image_encoder)
    return Batch(ids, labels, mask, [s.source for s in samples], pixels, sizes)


def collate_packed(rows: list[list[Sample]], pad_id: int, image_encoder=None, width: int = 0) -> Batch:
    """Packed rows (each a list of samples, see packing.py), right-padded to the longest row (or to `width`).

    Row [a(3 tokens), b(2)] in width 6: input_ids a0 a1 a2 b0 b1 pad, labels IGNORE la1 la2 IGNORE lb1 IGNORE,
    position_ids 0 1 2 0 1 0, attention_mask 1 1 1 1 1 0. Images in row-major token order."""
    if not rows or not all(rows):
        raise ValueError("collate_packed: empty micro-batch or empty row")
    built = [packed_row(row) for row in rows]
    width = max([width] + [len(ids) for ids, _, _ in built])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels, row_positions) in enumerate(built):
        n = len(row_ids)
        ids[i, :n] = torch.tensor(row_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(row_labels, dtype=torch.long)
        mask[i, :n] = 1
        positions[i, :n] = torch.tensor(row_positions, dtype=torch.long)
        positions[i, n:] = torch.arange(width - n)  # the padding tail: a sequence of its own
    flat = [s for row in rows for s in row]
    pixels, sizes = collate_images(flat, image_encoder)
    return Batch(ids, labels, mask, [s.source for s in flat], pixels, sizes, positions)


def epoch_order(n_samples: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch)."""
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)  # distinct (seed, epoch) pairs → distinct streams
    return torch.randperm(n_samples, generator=g).tolist()


def micro_batches_per_epoch(n_samples: int, micro_batch_size: int) -> int:
    return math.ceil(n_samples / micro_batch_size)


def steps_per_epoch(n_samples: int, micro_batch_size: int, grad_accum: int) -> int:
    """E.g. 1,000 samples / 2 per micro-batch = 500 micro-batches / 4 accum = 125 steps."""
    return math.ceil(micro_batches_per_epoch(n_samples, micro_batch_size) / grad_accum)


def total_steps(n_samples: int, micro_batch_size: int, grad_accum: int, num_epochs: float, max_steps: int | None) -> int:
    """max_steps when set, else num_epochs × steps per epoch (rounded up: 1.5 epochs of 125 steps = 188)."""
    if max_steps is not None:
        return max_steps
    return max(1, math.ceil(num_epochs * steps_per_epoch(n_samples, micro_batch_size, grad_accum)))


def every(per_epoch: int | None, steps: int | None, spe: int) -> int | None:
    """An interval in steps from `eval_steps`-style or `evals_per_epoch`-style keys (4 per epoch of 125 → 31)."""
    if steps is not None:
        return steps
    return max(1, spe // per_epoch) if per_epoch else None


class StepStream:
    """Yields (position after the step, [micro-batches]) for every optimizer step from `start` on.

    Epochs repeat until the caller stops iterating (the recipe stops at total_steps), so max_steps may run
    past num_epochs and a fractional num_epochs stops inside an epoch.

    `packs` (packing.Packing.packs): the items are packs of sample indices, collated as packed rows.
    `shard` (rank, world): this rank's share of each epoch's order (packing.shard_for_rank), equal on every rank.
    `pad_to` (pad_to_sequence_len): every micro-batch is at least this wide, so every step has the same shapes.
    """

    def __init__(self, samples: list[Sample], micro_batch_size: int, grad_accum: int, pad_id: int, seed: int,
                 start: DataPosition = DataPosition(), image_encoder=None, packs: list[list[int]] | None = None,
                 shard: tuple[int, int] = (0, 1), pad_to: int = 0):
        if not samples:
            raise ValueError("no training samples")
        self.samples = samples
        self.packs = packs
        self.pad_to = pad_to
        self.mbs = micro_batch_size
        self.accum = grad_accum
        self.pad_id = pad_id
        self.image_encoder = image_encoder
        self.seed = seed
        self.start = start
        self.rank, self.world = shard
        self.n_items = len(packs) if packs is not None else len(samples)
        per_rank = items_per_rank(self.n_items, self.world)
        if per_rank == 0:
            raise ValueError(f"{self.n_items} {'packs' if packs is not None else 'samples'} cannot give each of "
                             f"{self.world} ranks one")
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, its permutation), drawn once per epoch
        self.steps_per_epoch = steps_per_epoch(per_rank, micro_batch_size, grad_accum)
        if start.step > self.steps_per_epoch:
            raise ValueError(f"data position {start} is past the end of an epoch of {self.steps_per_epoch} steps "
                             "(the training set changed since the checkpoint?)")

    def step_indices(self, epoch: int, step: int) -> list[list[int]]:
        """Item indices (samples, or packs with `packs`) of each micro-batch of step `step` (0-based) of `epoch`."""
        if self._order[0] != epoch:
            order = epoch_order(self.n_items, self.seed, epoch)
            self._order = (epoch, shard_for_rank(order, self.rank, self.world))
        order = self._order[1]
        per_step = self.mbs * self.accum
        chunk = order[step * per_step:(step + 1) * per_step]
        return [chunk[i:i + self.mbs] for i in range(0, len(chunk), self.mbs)]

    def collate(self, idx: list[int]) -> Batch:
        if self.packs is None:
            return collate([self.samples[i] for i in idx], self.pad_id, self.image_encoder, self.pad_to)
        rows = [[self.samples[j] for j in self.packs[i]] for i in idx]
        return collate_packed(rows, self.pad_id, self.image_encoder, self.pad_to)

    def __iter__(self) -> Iterator[tuple[DataPosition, list[Batch]]]:
        epoch, step = self.start.epoch, self.start.step
        while True:
            if step >= self.steps_per_epoch:
                epoch, step = epoch + 1, 0
            micro = [self.collate(idx) for idx in self.step_indices(epoch, step)]
            step += 1
            yield DataPosition(epoch, step), micro


def items_per_rank(n_items: int, world: int) -> int:
    """What shard_for_rank gives each rank: 10 packs on 4 ranks → 2 (the remaining 2 wait for another epoch)."""
    return n_items // world


def check_share(n_items: int, world: int, noun: str, who: str, fix: str, tail: str = "") -> None:
    """A ConfigError, before the model loads, when an epoch of `n_items` gives one of the `world` ranks (or
    data-parallel groups: `who`) nothing: items_per_rank 0 would leave the run 0 steps per epoch."""
    if items_per_rank(n_items, world) == 0:
        raise ConfigError(f"{n_items} training {noun}{'' if n_items == 1 else 's'}{tail} for {world} {who}: each "
                          f"needs at least one per epoch. {fix}")


def eval_batches(samples: list[Sample], micro_batch_size: int, pad_id: int, image_encoder=None,
                 packs: list[list[int]] | None = None, pad_to: int = 0) -> Iterator[Batch]:
    """The held-out split in file order, micro_batch_size samples at a time (collated lazily: images are big).
    With `packs`, micro_batch_size packed rows at a time, in pack order. `pad_to` as in StepStream."""
    if packs is not None:
        for i in range(0, len(packs), micro_batch_size):
            rows = [[samples[j] for j in pack] for pack in packs[i:i + micro_batch_size]]
            yield collate_packed(rows, pad_id, image_encoder, pad_to)
        return
    for i in range(0, len(samples), micro_batch_size):
        yield collate(samples[i:i + micro_batch_size], pad_id, image_encoder, pad_to)
