"""Small in-memory models for the training-stage unit tests (no files, a vocabulary of 97 for speed)."""

from __future__ import annotations

import torch
from transformers import MistralConfig, MistralForCausalLM

from magistune.data.sample import IGNORE_INDEX, Sample

VOCAB = 97
PAD = 0


def make_lm(seed: int = 0) -> MistralForCausalLM:
    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                        tie_word_embeddings=False, pad_token_id=PAD, sliding_window=None)
    cfg._attn_implementation = "eager"
    return MistralForCausalLM(cfg).float()


def make_samples(n: int, seed: int = 0, min_len: int = 4, max_len: int = 24) -> list[Sample]:
    """Samples of varied lengths whose first half is a prompt (IGNORE_INDEX) and second half trained."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        cut = length // 2
        out.append(Sample(ids, [IGNORE_INDEX] * cut + ids[cut:], f"mem:{i}"))
    return out
