"""Models for the inference tests: tiny-random itself, and a "scripted" copy of it that always writes

    [THINK] Let me think [/THINK] Hello world </s>

(one id per step, whatever the prompt), so thinking, answers and stops can be checked exactly.

How the scripted model works: with every o_proj and down_proj zeroed, no layer adds anything to the
residual stream, so the last hidden state is the (RMS-normalised) embedding of the current token, h_x with
|h_x| = √64 = 8. lm_head's row y is set to 10 · h_x / 8 for the one token x that y must follow, every other row
to 0. The logit of y after x is then 10 · 8 = 80, the other scripted rows get 10 · cos(h_x, h_x') · 8 (|cos|
about 0.1-0.4 for random 64-d vectors: below 35), and all other tokens 0: a margin of e^(45 / 0.7) at
temperature 0.7, so sampling is deterministic too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import MistralForCausalLM

from magistune.tokenizer import SpecialIds

THINKING_TEXT = "Let me think"
ANSWER_TEXT = "Hello world"


def plain_ids(tok, text: str) -> list[int]:
    return tok.instruct_tokenizer.tokenizer.encode(text, bos=False, eos=False)


def script(tok) -> list[int]:
    """The ids the scripted model writes after [/INST]."""
    s = SpecialIds.of(tok)
    return [s.begin_think, *plain_ids(tok, THINKING_TEXT), s.end_think, *plain_ids(tok, ANSWER_TEXT), s.eos]


def write_scripted_model(base_dir: Path, out_dir: Path, tok) -> Path:
    model = MistralForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    seq = [tok.instruct_tokenizer.tokenizer.get_special_token("[/INST]")] + script(tok)
    assert len(set(seq)) == len(seq), "each token must have one successor"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        emb = model.model.embed_tokens.weight
        model.lm_head.weight.zero_()
        for x, y in zip(seq, seq[1:]):
            h = emb[x] / emb[x].pow(2).mean().sqrt()  # the RMS norm's output (weight 1, eps negligible)
            model.lm_head.weight[y] = 10 * h / h.norm()
    model.to(torch.bfloat16).save_pretrained(out_dir)
    shutil.copyfile(base_dir / "tekken.json", out_dir / "tekken.json")
    return out_dir
