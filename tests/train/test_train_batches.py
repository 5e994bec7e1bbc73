import itertools

import pytest
import torch

from magistune.config import ConfigError
from magistune.data.sample import IGNORE_INDEX, Sample
from magistune.train.batches import (
    DataPosition, StepStream, check_share, collate, epoch_order, eval_batches, steps_per_epoch, total_steps,
)
from train_helpers import make_samples


def test_collate_pads_right_with_pad_id_and_ignored_labels():
    a = Sample([5, 6, 7], [IGNORE_INDEX, 6, 7], "a")
    b = Sample([8, 9, 10, 11, 12], [IGNORE_INDEX, IGNORE_INDEX, 10, 11, 12], "b")
    batch = collate([a, b], pad_id=11)
    assert batch.input_ids.tolist() == [[5, 6, 7, 11, 11], [8, 9, 10, 11, 12]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX], b.labels]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.n_tokens == len(a) + len(b)
    # Label 0 of each row is never predicted: only labels[:, 1:] count.
    assert batch.n_trained == sum(t != IGNORE_INDEX for t in a.labels[1:] + b.labels[1:])


def test_collate_rejects_misaligned_labels():
    with pytest.raises(ValueError, match="3 input ids but 2 labels"):
        collate([Sample([1, 2, 3], [1, 2], "bad:1")], pad_id=0)


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(50, seed=42, epoch=0)
    assert sorted(a) == list(range(50))
    assert a == epoch_order(50, seed=42, epoch=0)
    assert a != epoch_order(50, seed=42, epoch=1)
    assert a != epoch_order(50, seed=43, epoch=0)


@pytest.mark.parametrize("n,mbs,accum", [(10, 2, 2), (11, 3, 2), (7, 1, 4), (5, 8, 1)])
def test_every_sample_once_per_epoch(n, mbs, accum):
    samples = make_samples(n)
    stream = StepStream(samples, mbs, accum, pad_id=0, seed=1)
    spe = steps_per_epoch(n, mbs, accum)
    steps = list(itertools.islice(stream, spe))
    assert [pos for pos, _ in steps] == [DataPosition(0, i + 1) for i in range(spe)]
    sources = [src for _, micro in steps for b in micro for src in b.sources]
    assert sorted(sources) == sorted(s.source for s in samples)
    for _, micro in steps:
        assert 1 <= len(micro) <= accum
        assert all(1 <= b.input_ids.shape[0] <= mbs for b in micro)
    # The next step starts epoch 1 in a new order.
    pos, micro = next(itertools.islice(stream, spe, spe + 1))
    assert pos == DataPosition(1, 1)


def test_resumed_stream_continues_exactly():
    samples = make_samples(9)
    full = list(itertools.islice(StepStream(samples, 2, 2, pad_id=0, seed=3), 8))  # 3 steps/epoch: crosses 2 epochs
    for k in range(1, 8):
        pos = full[k - 1][0]
        resumed = list(itertools.islice(StepStream(samples, 2, 2, pad_id=0, seed=3, start=pos), 8 - k))
        for (p1, m1), (p2, m2) in zip(full[k:], resumed, strict=True):
            assert p1 == p2
            assert [b.sources for b in m1] == [b.sources for b in m2]
            assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(m1, m2))


def test_position_past_the_epoch_is_an_error():
    with pytest.raises(ValueError, match="training set changed"):
        StepStream(make_samples(4), 1, 1, pad_id=0, seed=0, start=DataPosition(0, 5))


def test_total_steps():
    assert total_steps(1000, 2, 4, num_epochs=1, max_steps=None) == steps_per_epoch(1000, 2, 4)
    # 1.5 epochs round up; max_steps wins over epochs.
    assert total_steps(1000, 2, 4, num_epochs=1.5, max_steps=None) == -(-3 * steps_per_epoch(1000, 2, 4) // 2)
    assert total_steps(1000, 2, 4, num_epochs=3, max_steps=7) == 7


def test_eval_batches_cover_the_split_in_order():
    samples = make_samples(5)
    batches = eval_batches(samples, 2, pad_id=0)
    assert [s for b in batches for s in b.sources] == [s.source for s in samples]


def test_pad_to_sequence_len_fixes_every_width():
    """pad_to_sequence_len: train (plain and packed) and eval batches are all `pad_to` wide, and each is the
    unpadded batch followed by pad ids, IGNORE labels and mask 0: no trained token, no attended position added."""
    from magistune.train.packing import pack_samples

    def batches(pad_to: int):
        packs = pack_samples(samples, 32, seed=0).packs
        plain = [b for _, m in itertools.islice(StepStream(samples, 2, 2, pad_id=7, seed=1, pad_to=pad_to), 3) for b in m]
        packed = [b for _, m in itertools.islice(StepStream(samples, 2, 1, pad_id=7, seed=1, packs=packs,
                                                            pad_to=pad_to), 2) for b in m]
        return plain + packed + list(eval_batches(samples, 4, pad_id=7, pad_to=pad_to))

    samples = make_samples(9)
    for short, wide in zip(batches(0), batches(64), strict=True):
        w = short.input_ids.shape[1]
        assert w < 64 and wide.input_ids.shape[1] == 64
        assert torch.equal(wide.input_ids[:, :w], short.input_ids) and (wide.input_ids[:, w:] == 7).all()
        assert torch.equal(wide.labels[:, :w], short.labels) and (wide.labels[:, w:] == IGNORE_INDEX).all()
        assert torch.equal(wide.attention_mask[:, :w], short.attention_mask) and not wide.attention_mask[:, w:].any()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_check_share_refuses_exactly_the_epochs_a_rank_would_have_no_step_of(n, world):
    """check_share raises where a rank's StepStream of the same items could not start (its share would be empty
    and steps_per_epoch 0, the recipes' ZeroDivisionError), and passes wherever every rank gets a step."""
    samples = make_samples(n)
    try:
        streams = [StepStream(samples, 1, 1, pad_id=0, seed=0, shard=(r, world)) for r in range(world)]
    except ValueError:
        streams = None
    if streams is not None:
        check_share(n, world, "sample", "processes", "fix")
        assert all(s.steps_per_epoch >= 1 and next(iter(s))[1] for s in streams)
        return
    with pytest.raises(ConfigError) as e:
        check_share(n, world, "row", "processes", "Add training data.", tail=" after sample packing")
    plural = "" if n == 1 else "s"
    assert str(e.value) == (f"{n} training row{plural} after sample packing for {world} processes: each needs at "
                            "least one per epoch. Add training data.")
