"""Checkpoints (checkpoint.py, and checkpoint_load.py in the round trips): exact round trips, atomic saves (a
crash mid-save keeps the last good one), rotation, resolve."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import MistralForCausalLM

from magistune.config import Config, parse_config
from magistune.model import build_model
from magistune.model.adapt import apply_lora, save_trained
from magistune.train import checkpoint as ckpt
from magistune.train import checkpoint_load as ckpt_load
from magistune.train.batches import collate
from magistune.train.loss import forward_backward
from magistune.train.optim import build_optimizer, build_scheduler
from train_helpers import PAD, make_lm, make_samples


def cfg(tmp_path: Path, **kw) -> Config:
    return Config(base_model="tiny-random", datasets=[{"path": "d.jsonl"}], config_dir=tmp_path,
                  output_dir=str(tmp_path / "out"), **kw)


def setup(c: Config, seed: int = 0):
    """A model whose trained weights depend on `seed`: all of them for a full run, the LoRA matrices (on the
    same base model: a checkpoint holds only the adapter) for a LoRA run."""
    model = make_lm(0 if c.adapter else seed)
    if c.adapter:
        torch.manual_seed(seed)
        model = apply_lora(model, c)
    opt = build_optimizer(model, c, torch.device("cpu"))
    sched = build_scheduler(opt, "cosine", 1, 10)
    return model, opt, sched


def train_steps(model, opt, sched, n: int, seed: int = 0):
    for i in range(n):
        forward_backward(model, [collate(make_samples(2, seed=seed + i), PAD)])
        opt.step(), sched.step(), opt.zero_grad()


def save(c: Config, step: int, model, opt, sched, keep=None) -> Path:
    return ckpt.save_checkpoint(c.out_dir, step, lambda d: save_trained(model, d, c), opt, sched,
                                {"step": step, "position": {"epoch": 0, "step": step}}, ckpt.capture_rng(), keep)


def trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("adapter", ["lora", None])
def test_round_trip_is_exact(tmp_path, adapter):
    c = cfg(tmp_path, adapter=adapter, lora_target_linear=True, lora_dropout=0.1, weight_decay=0.01)
    model, opt, sched = setup(c)
    train_steps(model, opt, sched, 3)
    path = save(c, 3, model, opt, sched)
    assert ckpt.is_complete(path) and path.name == "checkpoint-3"
    assert (path / ("adapter_model.safetensors" if adapter else "model.safetensors")).is_file()
    # What an uninterrupted run does next (dropout draws from the RNG the checkpoint captured).
    train_steps(model, opt, sched, 2, seed=10)
    expected, expected_lr, expected_rand = trained(model), sched.get_last_lr(), (random.random(), np.random.rand())

    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # scramble the RNGs
    if adapter:
        model2, opt2, sched2 = setup(c, seed=1)  # other LoRA weights: they must come from the checkpoint
    else:  # a full model is rebuilt from the checkpoint folder itself (what the recipe does)
        model2 = MistralForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        opt2 = build_optimizer(model2, c, torch.device("cpu"))
        sched2 = build_scheduler(opt2, "cosine", 1, 10)
    state = ckpt_load.load_checkpoint(path, model2, opt2, sched2)
    assert state["step"] == 3
    train_steps(model2, opt2, sched2, 2, seed=10)
    got = trained(model2)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert sched2.get_last_lr() == expected_lr
    assert (random.random(), np.random.rand()) == expected_rand


def test_crash_mid_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    c = cfg(tmp_path)
    model, opt, sched = setup(c)
    good = save(c, 1, model, opt, sched)
    before = sorted(p.name for p in good.iterdir())

    real_save = torch.save

    def dying_save(obj, f, *a, **kw):
        if str(f).endswith("optimizer.pt"):
            raise OSError("disk full (simulated crash mid-save)")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="simulated"):
        save(c, 2, model, opt, sched)
    monkeypatch.setattr(torch, "save", real_save)

    assert (c.out_dir / ".checkpoint-2.tmp").is_dir()  # the torn save, under a name that is never resumed
    assert not (c.out_dir / "checkpoint-2").exists()
    assert sorted(p.name for p in good.iterdir()) == before
    c.resume_from_checkpoint = "auto"
    assert ckpt.resolve_resume(c)[0] == good
    # A checkpoint-named folder without the marker (e.g. copied by hand, half-way) is not resumed either.
    (c.out_dir / "checkpoint-5").mkdir()
    assert ckpt.latest_checkpoint(c.out_dir) == good
    # The next save clears the leftovers.
    save(c, 3, model, opt, sched)
    assert not (c.out_dir / ".checkpoint-2.tmp").exists()
    assert ckpt.latest_checkpoint(c.out_dir).name == "checkpoint-3"


def test_rotation_keeps_the_newest(tmp_path):
    c = cfg(tmp_path)
    model, opt, sched = setup(c)
    for step in (2, 4, 6, 8, 10):
        save(c, step, model, opt, sched, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(c.out_dir)] == ["checkpoint-8", "checkpoint-10"]  # numeric order
    assert sorted(p.name for p in c.out_dir.iterdir()) == ["checkpoint-10", "checkpoint-8"]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    c = cfg(tmp_path)
    model, opt, sched = setup(c)
    save(c, 4, model, opt, sched)
    path = ckpt.save_checkpoint(c.out_dir, 4, lambda d: save_trained(model, d, c), opt, sched, {"step": 4, "v": 2},
                                ckpt.capture_rng())
    assert ckpt.read_state(path)["v"] == 2
    assert sorted(p.name for p in c.out_dir.iterdir()) == ["checkpoint-4"]


def test_resolve_resume(tmp_path):
    c = cfg(tmp_path, resume_from_checkpoint="auto")
    path, note = ckpt.resolve_resume(c)
    assert path is None and "starting fresh" in note
    model, opt, sched = setup(c)
    saved = save(c, 7, model, opt, sched)
    assert ckpt.resolve_resume(c)[0] == saved
    c.resume_from_checkpoint = "checkpoint-7"  # relative to output_dir
    assert ckpt.resolve_resume(c)[0] == saved
    c.resume_from_checkpoint = str(saved)
    assert ckpt.resolve_resume(c)[0] == saved
    c.resume_from_checkpoint = "checkpoint-9"
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        ckpt.resolve_resume(c)
    (c.out_dir / "checkpoint-9").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="incomplete checkpoint"):
        ckpt.resolve_resume(c)
    c.resume_from_checkpoint = None
    assert ckpt.resolve_resume(c) == (None, None)


def test_adapter_checkpoint_into_a_full_run_is_refused(tmp_path):
    lora_cfg = cfg(tmp_path, adapter="lora", lora_target_linear=True)
    model, opt, sched = setup(lora_cfg)
    path = save(lora_cfg, 1, model, opt, sched)
    with pytest.raises(ckpt.CheckpointError, match="trains the full model"):
        ckpt_load.load_weights(make_lm(), path)


def test_full_vision_checkpoint_resumes_through_from_pretrained(tmp_path):
    """transformers renames Mistral3's tensors when it saves; the model rebuilt from the checkpoint folder
    (full_model_source) must still hold exactly the trained weights."""
    cpu = torch.device("cpu")
    c, _ = parse_config({"base_model": "tiny-random-vision", "datasets": [{"path": "d.jsonl"}],
                         "output_dir": str(tmp_path / "out"), "resume_from_checkpoint": "auto"})
    model, _, model_dir = build_model(c, cpu)
    opt = build_optimizer(model, c, cpu)
    sched = build_scheduler(opt, "constant", 0, 10)
    forward_backward(model, [collate(make_samples(2, seed=1), PAD)])
    opt.step(), sched.step(), opt.zero_grad()
    ckpt.save_checkpoint(c.out_dir, 1, lambda d: save_trained(model, d, c, model_dir / "tekken.json"), opt, sched,
                         {"step": 1}, ckpt.capture_rng())

    resume, _ = ckpt.resolve_resume(c)
    model2, _, _ = build_model(ckpt_load.full_model_source(c, resume), cpu)
    opt2 = build_optimizer(model2, c, cpu)
    sched2 = build_scheduler(opt2, "constant", 0, 10)
    ckpt_load.load_checkpoint(resume, model2, opt2, sched2)
    theirs = dict(model2.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(theirs[name], p), name
    for group, group2 in zip(opt.param_groups, opt2.param_groups):
        for p, p2 in zip(group["params"], group2["params"]):
            assert (p in opt.state) == (p2 in opt2.state)  # the vision tower gets no gradient from text
            if p in opt.state:
                assert torch.equal(opt.state[p]["exp_avg"], opt2.state[p2]["exp_avg"])
    with pytest.raises(ckpt.CheckpointError, match="trains the full model"):
        lora, _ = parse_config({"base_model": "tiny-random-vision", "datasets": [{"path": "d.jsonl"}],
                                "adapter": "lora", "lora_target_linear": True})
        lora_model, _, _ = build_model(lora, cpu)
        lora_path = ckpt.save_checkpoint(tmp_path / "lora", 1, lambda d: save_trained(lora_model, d, lora), opt, sched,
                                         {"step": 1}, ckpt.capture_rng())
        ckpt_load.full_model_source(c, lora_path)


# --- no code from checkpoints (issue 12, item 1) ----------------------------------------------------------

class _Payload:
    """Unpickling this runs code: it writes a file (a crafted rng_state.pt of an 'older' checkpoint)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "pwned"))


def test_rng_state_is_json_and_nothing_is_unpickled(tmp_path, monkeypatch):
    c = cfg(tmp_path, adapter="lora", lora_target_linear=True)
    model, opt, sched = setup(c)
    path = save(c, 1, model, opt, sched)
    assert not (path / "rng_state.pt").exists()
    import json as _json
    assert set(_json.loads((path / "rng_state.json").read_text())) >= {"python", "numpy", "torch"}
    real_load = torch.load

    def safe_only(*a, **kw):
        assert kw.get("weights_only") is True, "a checkpoint file was loaded with pickle"
        return real_load(*a, **kw)

    monkeypatch.setattr(torch, "load", safe_only)
    ckpt_load.load_checkpoint(path, model, opt, sched)


def test_pickled_rng_state_of_an_old_checkpoint_is_refused_unloaded(tmp_path):
    c = cfg(tmp_path, adapter="lora", lora_target_linear=True)
    model, opt, sched = setup(c)
    path = save(c, 1, model, opt, sched)
    (path / "rng_state.json").unlink(missing_ok=True)
    target = tmp_path / "pwned.txt"
    torch.save({"python": _Payload(target)}, path / "rng_state.pt")
    with pytest.raises(ckpt.CheckpointError, match="rng_state.pt: a pickled RNG state"):
        ckpt_load.load_checkpoint(path, model, opt, sched)
    assert not target.exists()


def test_a_malformed_rng_state_names_the_file(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="rng_state.json: not a valid RNG state"):
        (tmp_path / "rng_state.json").write_text('{"python": [3]}')
        ckpt.load_rng(tmp_path / "rng_state.json")


# --- checksummed checkpoints (issue 12, item 4) -------------------------------------------------------------

def _flip_bytes(f: Path, at: int) -> None:
    data = bytearray(f.read_bytes())
    data[at:at + 8] = bytes(255 - b for b in data[at:at + 8])  # same size, other tensor values
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,reason", [
    (lambda p: (p / "adapter_model.safetensors").write_bytes((p / "adapter_model.safetensors").read_bytes()[:100]),
     "adapter_model.safetensors: 100 bytes"),
    (lambda p: _flip_bytes(p / "adapter_model.safetensors", -16), "SHA-256 differs"),
    (lambda p: (p / "trainer_state.json").write_text("{not json"), "trainer_state.json"),
    (lambda p: (p / "optimizer.pt").unlink(), "optimizer.pt: missing"),
])
def test_auto_skips_a_damaged_checkpoint_and_says_why(tmp_path, damage, reason):
    c = cfg(tmp_path, adapter="lora", lora_target_linear=True, resume_from_checkpoint="auto")
    model, opt, sched = setup(c)
    good = save(c, 2, model, opt, sched)
    bad = save(c, 4, model, opt, sched)
    marker = json.loads((bad / "COMPLETE").read_text())["files"]
    assert marker["optimizer.pt"]["size"] == (bad / "optimizer.pt").stat().st_size
    assert len(marker["optimizer.pt"]["sha256"]) == 64
    damage(bad)
    path, note = ckpt.resolve_resume(c)
    assert path == good
    assert "skipped checkpoint-4" in note and reason in note
    c.resume_from_checkpoint = str(bad)  # named explicitly: an error naming the file
    with pytest.raises(ckpt.CheckpointError, match=f"{bad} is damaged: .*{reason.split(':')[0]}"):
        ckpt.resolve_resume(c)


def test_auto_with_only_damaged_checkpoints_is_an_error(tmp_path):
    c = cfg(tmp_path, resume_from_checkpoint="auto")
    model, opt, sched = setup(c)
    bad = save(c, 2, model, opt, sched)
    (bad / "scheduler.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="(?s)no intact checkpoint.*checkpoint-2: .*scheduler.pt: 0 bytes"):
        ckpt.resolve_resume(c)


# --- disk full (issue 12, item 6) ---------------------------------------------------------------------------

def _fake_disk(monkeypatch, free: int):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - free, free))


def test_disk_full_removes_the_partial_save_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import errno

    c = cfg(tmp_path)
    model, opt, sched = setup(c)
    good = save(c, 1, model, opt, sched)
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        if str(f).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    _fake_disk(monkeypatch, free=3 * 10**8)
    with pytest.raises(ckpt.NoSpace) as info:
        save(c, 2, model, opt, sched)
    size = ckpt.folder_size(good)
    assert f"no space left on {c.out_dir}: {size / 1e9:.1f} GB needed for checkpoint-2, 0.3 GB free" in str(info.value)
    assert "newest: checkpoint-1" in str(info.value)
    assert sorted(p.name for p in c.out_dir.iterdir()) == ["checkpoint-1"]  # no .checkpoint-2.tmp left
    assert ckpt.damage(good) is None


def test_space_warning_before_a_save_that_will_not_fit(tmp_path, monkeypatch):
    c = cfg(tmp_path)
    model, opt, sched = setup(c)
    assert ckpt.space_warning(c.out_dir) is None  # nothing saved yet: nothing to compare with
    good = save(c, 1, model, opt, sched)
    size = ckpt.folder_size(good)
    _fake_disk(monkeypatch, free=size + 1)
    assert ckpt.space_warning(c.out_dir) is None
    _fake_disk(monkeypatch, free=size // 2)
    assert "the last checkpoint (checkpoint-1) took" in ckpt.space_warning(c.out_dir)
