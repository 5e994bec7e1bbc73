"""model/varlen_attention.py: when training picks torch's varlen kernel, and that everything it does not handle
itself (unpacked rows, Pixtral's patches) is exactly transformers' sdpa."""

from __future__ import annotations

import pytest
import torch
from transformers import Mistral3ForConditionalGeneration, MistralForCausalLM

from magistune.model.load import resolve_attn
from magistune.model.varlen_attention import NAME, register, varlen_kernel

CUDA = torch.device("cuda")


def test_training_with_packing_on_cuda_picks_varlen(make_cfg):
    if varlen_kernel() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    packing = make_cfg("tiny-random", sample_packing=True)
    assert resolve_attn(packing, CUDA, training=True) == NAME
    assert resolve_attn(packing, CUDA) == "sdpa"  # inference (left padding needs masks)
    assert resolve_attn(packing, torch.device("cpu"), training=True) == NAME  # sample by sample (no kernel)
    assert resolve_attn(make_cfg("tiny-random"), CUDA, training=True) == "sdpa"  # no packing: nothing to gain
    assert resolve_attn(make_cfg("tiny-random", sample_packing=True, attn_implementation="sdpa"), CUDA,
                        training=True) == "sdpa"  # the config's own choice stands


def test_unpacked_right_padded_rows_are_sdpa_exactly(text_dir):
    register()
    ids = torch.randint(100, 131072, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # the second row: 7 tokens + 4 pads on the right
    outs = {}
    for impl in ("sdpa", NAME):
        model = MistralForCausalLM.from_pretrained(text_dir, dtype=torch.float32, attn_implementation=impl)
        outs[impl] = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(outs[NAME][0], outs["sdpa"][0])
    torch.testing.assert_close(outs[NAME][1, :7], outs["sdpa"][1, :7], rtol=1e-5, atol=1e-5)


def test_pixtral_patches_keep_their_own_mask(vision_dir):
    """Two images in one batch: the vision tower's block mask between them reaches sdpa unchanged."""
    register()
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    sizes = torch.tensor([[56, 56], [28, 56]])
    feats = {}
    for impl in ("sdpa", NAME):
        model = Mistral3ForConditionalGeneration.from_pretrained(vision_dir, dtype=torch.float32,
                                                                 attn_implementation=impl)
        feats[impl] = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes)
    a, b = (f if isinstance(f, torch.Tensor) else torch.cat(list(getattr(f, "pooler_output", f))) for f in feats.values())
    assert torch.equal(a, b)


def test_packed_rows_on_the_cpu_attend_sample_by_sample(text_dir):
    """Without the kernel (the CPU) the boundaries drive one causal attention per sample: each sample's logits are
    those of the sample alone, and no T × T mask is built."""
    from magistune.train.batches import cu_seq_lens_varlen

    register()
    ids = torch.randint(100, 131072, (2, 12), generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 0, 1, 0, 1, 2]])
    model = MistralForCausalLM.from_pretrained(text_dir, dtype=torch.float32, attn_implementation=NAME)
    packed = model(input_ids=ids, position_ids=pos, **cu_seq_lens_varlen(pos)).logits
    alone = MistralForCausalLM.from_pretrained(text_dir, dtype=torch.float32, attn_implementation="sdpa")
    for row, starts in ((0, [0, 5, 8, 12]), (1, [0, 7, 9, 12])):
        for a, b in zip(starts, starts[1:]):
            want = alone(input_ids=ids[row:row + 1, a:b]).logits[0]
            torch.testing.assert_close(packed[row, a:b], want, rtol=1e-5, atol=1e-5)
    leaky = alone(input_ids=ids).logits  # the test can fail: the rows as one sequence each
    assert (leaky[:, 5:] - packed[:, 5:]).abs().max() > 1e-3
