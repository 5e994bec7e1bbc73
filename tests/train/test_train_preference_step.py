"""The shared-prompt pair forward equals two plain forwards; the reference with adapters off; DPO at step 1 is ln 2."""

import math
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model

from magistune.data.sample import IGNORE_INDEX, KTOSample, PreferenceSample
from magistune.train.preference_loss import kto_kl_estimate
from magistune.train.preference_step import (CHOSEN, REJECTED, collate_kto, collate_pairs, kto_kl_rows, kto_step_kl,
                                             pair_logps, pair_loss, reference_pair_logps, sample_logps,
                                             shared_row_unsupported)
from train_helpers import PAD, VOCAB, make_lm


def make_pairs(n: int, seed: int = 0) -> list[PreferenceSample]:
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(1, VOCAB, (k,), generator=g).tolist()  # noqa: E731
    out = []
    for i in range(n):
        p, c, r = (int(x) for x in torch.randint(2, 12, (3,), generator=g))
        prompt, chosen, rejected = rand(p), rand(c), rand(r)
        ign = [IGNORE_INDEX] * p
        out.append(PreferenceSample(prompt + chosen, ign + chosen, prompt + rejected, ign + rejected, f"mem:{i}"))
    return out


@torch.no_grad()
def plain_logps(model, ids: list[int], labels: list[int]) -> float:
    """Σ log p(label t | tokens < t) from one ordinary forward of the whole sequence: the reference."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], -1)
    return sum(logp[t - 1, labels[t]].item() for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_row_equals_two_plain_forwards(attn):
    model = make_lm(1)
    model.config._attn_implementation = attn
    pairs = make_pairs(4, seed=2)
    out = pair_logps(model, collate_pairs(pairs, PAD))
    for b, s in enumerate(pairs):
        want_c = plain_logps(model, s.chosen_input_ids, s.chosen_labels)
        want_r = plain_logps(model, s.rejected_input_ids, s.rejected_labels)
        assert abs(out.chosen[b].item() - want_c) < 1e-5 * max(1, abs(want_c))
        assert abs(out.rejected[b].item() - want_r) < 1e-5 * max(1, abs(want_r))
        assert int(out.chosen_tokens[b]) == len(s.chosen_input_ids) - s.prompt_len
        assert int(out.rejected_tokens[b]) == len(s.rejected_input_ids) - s.prompt_len


def test_shared_row_gradient_equals_two_plain_forwards():
    pairs = make_pairs(3, seed=5)
    a, b = make_lm(3), make_lm(3)
    out = pair_logps(a, collate_pairs(pairs, PAD))
    (out.chosen - 2 * out.rejected).sum().backward()
    total = sum(plain_logps_tensor(b, s.chosen_input_ids, s.chosen_labels)
                - 2 * plain_logps_tensor(b, s.rejected_input_ids, s.rejected_labels) for s in pairs)
    total.backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


def plain_logps_tensor(model, ids, labels) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    y = torch.tensor(labels[1:])
    keep = y != IGNORE_INDEX
    return torch.log_softmax(logits[:-1], -1)[keep].gather(1, y[keep][:, None]).sum()


def test_row_layout_positions_and_mask():
    s = PreferenceSample([5, 6, 7, 8], [-100, -100, 7, 8], [5, 6, 9], [-100, -100, 9], "mem:0")
    short = PreferenceSample([5, 6, 1], [-100, -100, 1], [5, 6, 2], [-100, -100, 2], "mem:1")
    batch = collate_pairs([s, short], PAD)
    assert batch.input_ids[0].tolist() == [5, 6, 7, 8, 9]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 2]
    assert batch.position_ids[1].tolist() == [0, 1, 2, 2, 0]  # padding tail counts from 0
    assert batch.chosen_index[0].tolist() == [1, 2, 3] and batch.chosen_labels[0].tolist() == [-100, 7, 8]
    assert batch.rejected_index[0].tolist() == [1, 4] and batch.rejected_labels[0].tolist() == [-100, 9]
    mask = batch.attention_mask()[0, 0]
    seg = batch.segments[0]
    assert mask[4].tolist() == [True, True, False, False, True]  # r0 sees the prompt and itself, not c0 c1
    assert mask[3].tolist() == [True, True, True, True, False]  # c1: causal
    assert (seg == CHOSEN).sum() == 2 and (seg == REJECTED).sum() == 1
    assert batch.n_tokens == 5 + 4
    additive = batch.attention_mask(torch.float32)[0, 0]
    assert additive[4, 2] == torch.finfo(torch.float32).min and additive[4, 1] == 0


def test_pairs_must_share_their_prompt():
    bad = PreferenceSample([5, 6, 7], [-100, -100, 7], [5, 4, 9], [-100, -100, 9], "f.jsonl:3")
    with pytest.raises(ValueError, match="f.jsonl:3.*share a prompt"):
        collate_pairs([bad], PAD)


def lora(model):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def cfg(rl, **kw):
    base = dict(rl=rl, rl_beta=0.1, dpo_label_smoothing=0.0, simpo_gamma=0.5, cpo_alpha=1.0,
                kto_desirable_weight=1.0, kto_undesirable_weight=1.0)
    return SimpleNamespace(**(base | kw))


def test_dpo_at_step_one_with_fresh_lora_is_ln2():
    model = lora(make_lm(4))
    batch = collate_pairs(make_pairs(3, seed=7), PAD)
    policy, ref = pair_logps(model, batch), reference_pair_logps(model, batch)
    out = pair_loss(cfg("dpo"), policy, ref)
    assert torch.equal(policy.chosen.detach(), ref.chosen) and torch.equal(policy.rejected.detach(), ref.rejected)
    torch.testing.assert_close(out.losses, torch.full((3,), math.log(2)), rtol=0, atol=1e-7)
    stats = out.stats()
    assert stats["reward_chosen"] == 0 and stats["reward_rejected"] == 0 and stats["reward_margin"] == 0
    assert policy.chosen.requires_grad and not ref.chosen.requires_grad


def test_reference_is_the_base_model_once_the_adapter_moved():
    model = lora(make_lm(4))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    batch = collate_pairs(make_pairs(2, seed=8), PAD)
    ref = reference_pair_logps(model, batch)
    base = pair_logps(make_lm(4), batch)
    torch.testing.assert_close(ref.chosen, base.chosen.detach())
    assert not torch.allclose(pair_logps(model, batch).chosen.detach(), ref.chosen)


@pytest.mark.parametrize("rl", ["ipo", "orpo", "simpo"])
def test_pair_losses_are_finite_and_differentiable(rl):
    model = lora(make_lm(4))
    batch = collate_pairs(make_pairs(2, seed=9), PAD)
    ref = reference_pair_logps(model, batch) if rl == "ipo" else None
    out = pair_loss(cfg(rl), pair_logps(model, batch), ref)
    assert out.losses.shape == (2,) and torch.isfinite(out.losses).all()
    out.losses.sum().backward()


def kto_samples(n, seed=0):
    pairs = make_pairs(n, seed)
    return [KTOSample(s.chosen_input_ids, s.chosen_labels, s.source, label=i % 2 == 0) for i, s in enumerate(pairs)]


def test_kto_rows_and_step_kl():
    model = lora(make_lm(6))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    samples = kto_samples(3, seed=10)
    rows = kto_kl_rows(samples)
    assert rows[1].input_ids == samples[1].input_ids[:samples[1].prompt_len] + samples[0].input_ids[samples[0].prompt_len:]
    kl = kto_step_kl(model, samples, PAD, micro_batch_size=2)
    batch = collate_kto(rows, PAD)
    with torch.no_grad():
        policy = sample_logps(model, batch)[0]
        with model.disable_adapter():
            ref = sample_logps(model, batch)[0]
    torch.testing.assert_close(kl, kto_kl_estimate(policy, ref))
    want = [plain_logps(model, r.input_ids, r.labels) for r in rows]
    torch.testing.assert_close(policy, torch.tensor(want), rtol=1e-5, atol=1e-5)


def test_flash_attention_is_refused_with_a_reason():
    model = make_lm(0)
    assert shared_row_unsupported(model) is None
    model.config._attn_implementation = "flash_attention_2"
    assert "sdpa" in shared_row_unsupported(model)


def test_shared_row_with_an_image_equals_two_plain_forwards(tmp_path):
    """Mistral3 (tiny-random-vision): the prompt's image is encoded once per row; both answers' log-probs equal
    those of plain forwards of prompt + answer with the image."""
    from transformers import Mistral3ForConditionalGeneration

    from magistune.data.encode import ConversationEncoder
    from magistune.data.images import ImageOptions
    from magistune.data.preference import PreferenceEncoder, split_record, to_sample
    from magistune.data.records import RecordOptions
    from magistune.data.sample import Sample
    from magistune.model_files import materialize_tiny
    from magistune.tokenizer import SpecialIds, load_tokenizer, tiny_tokenizer_path
    from magistune.train.batches import collate
    from test_train_vision_batches import _png

    (tmp_path / "a.png").write_bytes(_png((56, 84), 0))
    tok = load_tokenizer(tiny_tokenizer_path())
    record = {"prompt": [{"role": "user", "content": [{"type": "image", "path": "a.png"}, {"type": "text", "text": "what?"}]}],
              "chosen": [{"role": "assistant", "content": "noise"}], "rejected": [{"role": "assistant", "content": "a cat"}]}
    opts = RecordOptions(supports_images=True, images=ImageOptions(base_dir=tmp_path))
    rec = split_record(record, kto=False)
    pair = to_sample(rec, PreferenceEncoder(ConversationEncoder(tok), opts).encode(rec), "mem:0")
    assert len(pair.images) == 1
    pad, enc = SpecialIds.of(tok).pad, tok.instruct_tokenizer.image_encoder
    model = Mistral3ForConditionalGeneration.from_pretrained(materialize_tiny("tiny-random-vision"), dtype=torch.float32)
    model.config.text_config._attn_implementation = "sdpa"
    out = pair_logps(model, collate_pairs([pair], pad, enc))
    for got, ids, labels in ((out.chosen, pair.chosen_input_ids, pair.chosen_labels),
                             (out.rejected, pair.rejected_input_ids, pair.rejected_labels)):
        batch = collate([Sample(ids, labels, "x", pair.images)], pad, enc)
        with torch.no_grad():
            logits = model(**batch.model_inputs()).logits[0, :-1].float()
        y = batch.labels[0, 1:]
        want = torch.log_softmax(logits, -1)[y != -100].gather(1, y[y != -100][:, None]).sum()
        torch.testing.assert_close(got[0].detach(), want, rtol=1e-5, atol=1e-5)
