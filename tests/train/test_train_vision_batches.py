"""Micro-batches of image conversations: pixels equal mistral-common's, images of different sizes share a
batch (padded, with their real sizes), and the Mistral3 forward pass places every image's features."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from magistune.data.encode import ConversationEncoder
from magistune.data.images import ImageOptions
from magistune.data.records import RecordOptions, parse_record
from magistune.data.sample import Sample
from magistune.model_files import materialize_tiny
from magistune.tokenizer import SpecialIds, load_tokenizer, tiny_tokenizer_path
from magistune.train.batches import collate
from magistune.train.loss import token_loss_sum


def _png(size, seed):
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _sample(tok, tmp_path, sizes, name):
    parts = []
    for i, size in enumerate(sizes):
        (tmp_path / f"{name}{i}.png").write_bytes(_png(size, i))
        parts.append({"type": "image", "path": f"{name}{i}.png"})
    record = {"messages": [{"role": "user", "content": parts + [{"type": "text", "text": "describe"}]},
                           {"role": "assistant", "content": "noise"}]}
    conv = parse_record(record, RecordOptions(supports_images=True, images=ImageOptions(base_dir=tmp_path)))
    ids, labels, images = ConversationEncoder(tok).encode(conv)
    return Sample(ids, labels, name, images), tok.encode_chat_completion(conv.request)


def test_images_of_different_sizes_in_one_micro_batch(tmp_path):
    tok = load_tokenizer(tiny_tokenizer_path())
    a, ref_a = _sample(tok, tmp_path, [(56, 84), (140, 28)], "a")
    b, ref_b = _sample(tok, tmp_path, [(84, 56)], "b")
    batch = collate([a, b], SpecialIds.of(tok).pad, tok.instruct_tokenizer.image_encoder)
    expected = ref_a.images + ref_b.images
    assert batch.pixel_values.shape[0] == 3
    for i, arr in enumerate(expected):
        h, w = arr.shape[1:]
        assert batch.image_sizes[i].tolist() == [h, w]
        assert torch.equal(batch.pixel_values[i, :, :h, :w], torch.from_numpy(arr))
        assert batch.pixel_values[i, :, h:, :].abs().sum() == 0 and batch.pixel_values[i, :, :, w:].abs().sum() == 0

    from transformers import Mistral3ForConditionalGeneration

    model = Mistral3ForConditionalGeneration.from_pretrained(materialize_tiny("tiny-random-vision"), dtype=torch.float32)
    loss = token_loss_sum(model, batch)  # raises if image tokens and image features disagree
    assert torch.isfinite(loss)
    # The images matter: other pixels, other loss.
    other = collate([a, b], SpecialIds.of(tok).pad, tok.instruct_tokenizer.image_encoder)
    other.pixel_values = torch.randn_like(other.pixel_values)
    assert not torch.equal(token_loss_sum(model, other), loss)
