import math
from pathlib import Path

import pytest
import torch
import transformers

from magistune.config import Config
from magistune.train.optim import (
    build_optimizer, build_scheduler, check_optimizer, lr_factor, param_groups, warmup_steps,
)
from train_helpers import make_lm


def cfg(**kw) -> Config:
    return Config(base_model="tiny-random", datasets=[{"path": "d.jsonl"}], config_dir=Path("."), **kw)


HF_SCHEDULES = {
    "cosine": transformers.get_cosine_schedule_with_warmup,
    "linear": transformers.get_linear_schedule_with_warmup,
    "constant": lambda opt, w, total: transformers.get_constant_schedule_with_warmup(opt, w),
}


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 20), (5, 5), (1, 1)])
def test_schedules_match_transformers(kind, warmup, total):
    def opt():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)

    ours_opt, ref_opt = opt(), opt()
    ours = build_scheduler(ours_opt, kind, warmup, total)
    ref = HF_SCHEDULES[kind](ref_opt, warmup, total)
    for _ in range(total + 2):
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], abs=1e-12)
        ours_opt.step(), ref_opt.step()
        ours.step(), ref.step()


def test_scheduler_state_round_trip():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, "cosine", 2, 10)
    for _ in range(4):
        opt.step(), sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_scheduler(opt2, "cosine", 2, 10)
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert sched2.last_epoch == 4
    assert sched.get_last_lr()[0] == pytest.approx(lr_factor("cosine", 4, 2, 10))


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown 'step'"):
        build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1), "step", 0, 5)


def test_warmup_from_steps_or_ratio():
    assert warmup_steps(cfg(warmup_steps=7), 100) == 7
    assert warmup_steps(cfg(warmup_steps=700), 100) == 100
    assert warmup_steps(cfg(warmup_ratio=0.1), 95) == math.ceil(0.1 * 95)
    assert warmup_steps(cfg(), 100) == 0


def test_no_weight_decay_on_biases_and_norms():
    model = make_lm()
    model.model.layers[0].self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(32))
    model.model.embed_tokens.weight.requires_grad_(False)
    groups = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    kept = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert "model.layers.0.self_attn.q_proj.bias" in kept
    assert {n for n in kept if "norm" in n} == {n for n, _ in model.named_parameters() if "norm" in n}
    assert "model.layers.0.mlp.up_proj.weight" in decayed and "lm_head.weight" in decayed
    assert "model.embed_tokens.weight" not in decayed | kept  # frozen: not in the optimizer


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit"])
def test_every_optimizer_steps_on_cpu(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 1))
    opt = build_optimizer(model, cfg(optimizer=name, learning_rate=1e-2, weight_decay=0.01), torch.device("cpu"))
    x, y = torch.randn(32, 64), torch.randn(32, 1)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.5 * losses[0]
    if name == "adamw_torch_fused":
        assert opt.defaults["fused"] is True
    if "8bit" in name:
        import bitsandbytes as bnb

        assert isinstance(opt, bnb.optim.optimizer.Optimizer8bit)


def test_paged_optimizer_on_cpu_is_a_note():
    note = check_optimizer("paged_adamw_8bit", torch.device("cpu"))
    assert note and "only on CUDA" in note
    assert check_optimizer("adamw_torch", torch.device("cpu")) is None
