"""The static-cache sampler on CUDA (model/static_generation.py): the decode step replayed from a CUDA graph gives
the plain loop's ids (fp32), and the eager static step's logits on an NF4 + LoRA model in bf16 (what GRPO samples
with), without falling back from the graph; generate_rollouts takes it on CUDA.

Marked `gpu` and skipped without CUDA; run on the GPU host with `python3 -m pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[1, 5, 6, 7, 8], [1, 8, 9], [1, 40], [1, 5, 6, 7, 8]]


def _generate(fn, model, opts, seed, **kw):
    from magistune.model.static_generation import generate_ids_static

    g = torch.Generator(device="cuda").manual_seed(seed)
    if fn == "static":
        return generate_ids_static(model, PROMPTS, 2, 0, opts, generator=g, **kw)
    from magistune.model.generation import generate_ids

    return generate_ids(model, PROMPTS, 2, 0, opts, generator=g)


def test_graph_replay_gives_the_plain_loops_ids_in_fp32():
    sys.path.insert(0, str(ROOT / "tests/train"))
    from train_helpers import make_lm

    from magistune.model.generation import SamplingOptions

    torch.backends.cuda.matmul.allow_tf32 = False
    lm = make_lm().cuda().eval()
    lm.config._attn_implementation = "sdpa"
    for opts in (SamplingOptions(0.0, 1.0, 24), SamplingOptions(1.0, 0.9, 24)):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="the decode step could not be captured")  # fell back
            graph = _generate("static", lm, opts, seed=3, graph=True)
        assert graph == _generate("plain", lm, opts, seed=3)


def decode_logits(model, graph: bool, autocast_dtype) -> list[torch.Tensor]:
    """Logits of two decode steps after a prefill of PROMPTS[0] × 4 rows, eager or from the CUDA graph."""
    from magistune.model.static_generation import DecodeStep, StaticDecoder, prefill_mask

    device, rows, width, length = next(model.parameters()).device, 4, len(PROMPTS[0]), len(PROMPTS[0]) + 4
    decoder = StaticDecoder(model, rows, length, autocast_dtype or torch.float32, device)
    ids = torch.tensor([PROMPTS[0]] * rows, device=device)
    mask = torch.zeros((rows, length), dtype=torch.bool, device=device)
    mask[:, :width] = True
    positions = torch.arange(width, device=device).expand(rows, -1)
    decoder.forward(ids, positions, torch.arange(width, device=device), prefill_mask(mask[:, :width], length))
    step = DecodeStep(decoder, rows, length, device, graph, autocast_dtype)
    out = []
    for k, column in enumerate((width, width + 1)):
        mask[:, column] = True
        feed = torch.tensor([[10 + k], [20 + k], [30 + k], [40 + k]], device=device)
        out.append(step(feed, torch.full((rows, 1), column, device=device), column, mask[:, None, None, :]).clone())
    assert (step.graph is not None) == graph  # captured (no fallback to eager)
    return out


def test_graph_replay_on_nf4_lora_in_bf16_gives_the_eager_steps_logits():
    sys.path.insert(0, str(ROOT / "bench"))
    from random_model import random_model

    from magistune.config import parse_config
    from magistune.model import adapt_model
    from magistune.model_files.tiny import tiny_text_config
    from magistune.train.preflight import autocast_for
    from magistune.train.rollout import generate_rollouts

    cfg = parse_config({"base_model": "bench", "datasets": [{"path": "x.jsonl"}], "rl": "grpo", "adapter": "qlora",
                        "load_in_4bit": True, "lora_r": 8, "lora_alpha": 16, "lora_target_linear": True,
                        "bf16": True})[0]
    device = torch.device("cuda")
    model, _ = random_model(tiny_text_config(), cfg, device)
    model, _ = adapt_model(model, cfg, device)
    for p in model.parameters():  # B ≠ 0, so the LoRA path changes the logits
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    model.eval()
    autocast = autocast_for(device, torch.bfloat16)
    with torch.no_grad(), autocast():
        eager = decode_logits(model, False, torch.bfloat16)
        graph = decode_logits(model, True, torch.bfloat16)
    for e, g in zip(eager, graph):
        torch.testing.assert_close(g.float(), e.float(), atol=2e-2, rtol=2e-2)
    assert not torch.allclose(graph[0].float(), graph[1].float())  # the replay read the second step's inputs
    with warnings.catch_warnings():  # the seam picks the graph on CUDA and keeps it
        warnings.filterwarnings("error", message="the decode step could not be captured")
        out = generate_rollouts(model, PROMPTS, eos=-1, pad=0, max_new_tokens=32, temperature=0.7, top_p=0.95,
                                generator=torch.Generator(device="cuda").manual_seed(7), autocast=autocast)
    assert [len(x) for x in out] == [32] * len(PROMPTS) and model.training is False
