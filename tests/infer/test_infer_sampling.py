"""The generation loop against transformers' own `generate`, top-p on a known distribution, stops."""

from __future__ import annotations

import pytest
import torch

from infer_helpers import script
from magistune.infer.prompts import build_request, encode_prompt
from magistune.infer.sampling import SamplingOptions, generate_ids, make_generator, sample_next

GREEDY = SamplingOptions(temperature=0, max_tokens=6)


def prompts(tok) -> list[list[int]]:
    texts = ["Hi", "Tell me a long story about a dragon and a knight.", "2+2?"]
    return [encode_prompt(tok, build_request([{"role": "user", "content": t}])) for t in texts]


def test_batched_left_padded_greedy_equals_transformers_generate(tiny, special):
    ps = prompts(tiny.tokenizer)
    assert len({len(p) for p in ps}) == 3  # three lengths: two rows are padded
    ours = generate_ids(tiny.model, ps, special.eos, special.pad, GREEDY)
    for p, out in zip(ps, ours):  # the reference: transformers' generate, one unpadded prompt at a time
        ref = tiny.model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                  do_sample=False, max_new_tokens=6, eos_token_id=special.eos,
                                  pad_token_id=special.pad)
        assert out == ref[0, len(p):].tolist()


def test_one_row_alone_equals_the_same_row_in_a_batch(tiny, special):
    ps = prompts(tiny.tokenizer)
    batch = generate_ids(tiny.model, ps, special.eos, special.pad, GREEDY)
    assert generate_ids(tiny.model, [ps[2]], special.eos, special.pad, GREEDY)[0] == batch[2]


def test_top_p_keeps_the_nucleus_only():
    # probabilities 0.5, 0.3, 0.15, 0.05: with top_p 0.7 the masses before them are 0, 0.5, 0.8, 0.95
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    drawn = sample_next(logits, SamplingOptions(temperature=1.0, top_p=0.7), g)
    share = (drawn == 0).float().mean().item()
    assert set(drawn.tolist()) == {0, 1}
    assert abs(share - 0.625) < 0.03  # 0.5 / (0.5 + 0.3)
    assert sample_next(logits[:2], SamplingOptions(temperature=0), None).tolist() == [0, 0]


def test_seeded_sampling_repeats(tiny, special):
    ps = prompts(tiny.tokenizer)[:2]
    opts = SamplingOptions(temperature=1.0, top_p=0.95, max_tokens=5, seed=123)
    assert generate_ids(tiny.model, ps, special.eos, special.pad, opts) == \
        generate_ids(tiny.model, ps, special.eos, special.pad, opts)
    g = make_generator(opts, torch.device("cpu"))
    first = generate_ids(tiny.model, ps, special.eos, special.pad, opts, generator=g)
    assert generate_ids(tiny.model, ps, special.eos, special.pad, opts, generator=g) != first  # the stream goes on


def test_rows_stop_on_eos_and_at_the_budget(scripted, special):
    tok = scripted.tokenizer
    ps = prompts(tok)
    expected = script(tok)  # [THINK] … [/THINK] … </s>
    outs = generate_ids(scripted.model, ps, special.eos, special.pad, SamplingOptions(max_tokens=50, seed=0))
    assert outs == [expected] * 3  # sampled at temperature 0.7: the script's margin makes it certain
    cut = generate_ids(scripted.model, ps[:1], special.eos, special.pad, SamplingOptions(max_tokens=3))
    assert cut == [expected[:3]]


def test_a_prompt_that_fills_the_context_is_refused(tiny, special):
    limit = tiny.model.config.max_position_embeddings
    with pytest.raises(ValueError, match="context"):
        generate_ids(tiny.model, [[special.bos] * limit], special.eos, special.pad, GREEDY)
