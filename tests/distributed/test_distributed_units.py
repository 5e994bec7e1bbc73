"""Multi-GPU pieces that need no second process: config keys, launch, disagreement messages, eval sharing."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from magistune import cli
from magistune.config import ConfigError, parse_config
from magistune.data.sample import IGNORE_INDEX, Sample
from magistune.train import distributed
from magistune.train.batches import collate
from magistune.train.launch import distributed_mode, single_process_notes, torchrun_env
from magistune.train.metrics import Printer, QuietLogger
from magistune.train.rank_agreement import describe_disagreement, sample_digest

BASE = {"base_model": "tiny-random", "datasets": [{"path": "data.jsonl"}]}


def cfg_of(**keys):
    return parse_config({**BASE, **keys})


# --- config keys ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keys,expect", [
    ({"fsdp": True}, (True, False, True)),
    ({"fsdp": ["full_shard", "auto_wrap"]}, (True, False, True)),
    ({"fsdp": "full_shard auto_wrap offload"}, (True, True, True)),
    ({"fsdp": ["shard_grad_op"]}, (True, False, False)),
    ({"fsdp": []}, (False, False, True)),
    ({"fsdp_version": 2, "fsdp_config": {"offload_params": True, "reshard_after_forward": False,
                                         "state_dict_type": "SHARDED_STATE_DICT", "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                         "transformer_layer_cls_to_wrap": "MistralDecoderLayer"}}, (True, True, False)),
    ({"fsdp": ["full_shard"], "fsdp_config": {"fsdp_offload_params": False, "fsdp_sharding_strategy": "FULL_SHARD",
                                              "fsdp_cpu_ram_efficient_loading": True, "fsdp_sync_module_states": True}},
     (True, False, True)),
])
def test_axolotl_fsdp_forms(keys, expect):
    cfg, _ = cfg_of(**keys)
    assert (cfg.fsdp, cfg.fsdp_cpu_offload, cfg.fsdp_reshard_after_forward) == expect


def test_empty_multi_gpu_keys_are_the_defaults():
    """Axolotl's examples leave `fsdp:` and `fsdp_config:` empty."""
    cfg, notes = cfg_of(fsdp=None, fsdp_config=None, fsdp_version=None, ddp=None, ddp_timeout=None)
    assert not cfg.fsdp and not cfg.ddp and cfg.fsdp_version == 2 and cfg.ddp_timeout == 1800
    assert all(": empty: as if unset" in n for n in notes) and len(notes) == 4  # one note a key, none an error


def test_fsdp_activation_checkpointing_turns_checkpointing_on():
    cfg, _ = cfg_of(fsdp_config={"activation_checkpointing": True})
    assert cfg.fsdp and cfg.gradient_checkpointing


def test_fsdp_version_1_is_a_note():
    cfg, notes = cfg_of(fsdp=True, fsdp_version=1)
    assert cfg.fsdp and any(n.startswith("fsdp_version: 1") and "FSDP2" in n for n in notes)


@pytest.mark.parametrize("keys,needle", [
    ({"fsdp": True, "ddp": True}, "set fsdp (shard the model over the GPUs) or ddp"),
    ({"fsdp_cpu_offload": True}, "fsdp_cpu_offload offloads FSDP's shards; it needs fsdp: true"),
    ({"fsdp": True, "optimizer": "adamw_bnb_8bit"}, "optimizer: adamw_bnb_8bit cannot update FSDP's sharded"),
    ({"fsdp": True, "optimizer": "paged_adamw_8bit"}, "optimizer: paged_adamw_8bit cannot update FSDP's sharded"),
    ({"fsdp": True, "train_vision_tower": True}, "fsdp cannot train the vision tower"),
    ({"fsdp": ["hybrid_shard"]}, "fsdp: 'hybrid_shard' is not supported"),
    ({"fsdp_config": {"fsdp_offload_paramz": True}}, "fsdp_config.fsdp_offload_paramz: unknown"),
    ({"fsdp_config": {"sharding_strategy": "NO_SHARD"}}, "fsdp_config.sharding_strategy: NO_SHARD is not supported"),
    ({"fsdp": ["offload"], "fsdp_cpu_offload": False}, "fsdp_cpu_offload: False contradicts"),
    ({"ddp_timeout": 0}, "ddp_timeout"),
])
def test_configs_that_cannot_run_distributed(keys, needle):
    with pytest.raises(ConfigError) as e:
        cfg_of(**keys)
    assert needle in str(e.value)


def test_ddp_with_8bit_optimizer_is_fine():
    cfg, _ = cfg_of(ddp=True, optimizer="adamw_bnb_8bit", adapter="qlora", load_in_4bit=True, lora_target_linear=True)
    assert cfg.ddp


# --- launch -------------------------------------------------------------------------------------------------

def test_outside_torchrun_fsdp_trains_in_one_process_with_a_note(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cfg = cfg_of(fsdp=True)[0]
    assert torchrun_env() is None and distributed_mode(cfg, torchrun_env()) is None  # sft.py, one process
    assert any("not launched by torchrun" in n and "--nproc" in n for n in single_process_notes(cfg))
    assert single_process_notes(cfg_of()[0]) == []


def test_torchrun_with_one_process_and_no_engine_is_the_plain_run(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    env = torchrun_env()
    assert distributed_mode(cfg_of()[0], env) is None
    assert distributed_mode(cfg_of(fsdp=True)[0], env) == "fsdp" and distributed_mode(cfg_of(ddp=True)[0], env) == "ddp"
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = cfg_of()[0]
    assert distributed_mode(cfg, torchrun_env()) == "ddp"  # several processes, no key: DDP, with a note
    assert any("neither fsdp nor ddp set: DDP" in n for n in distributed.mode_notes(cfg, "ddp", 2))


def test_nproc_execs_torchrun(monkeypatch, write_config, write_jsonl, tmp_path):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    write_jsonl(tmp_path / "data.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "hello"}]}])
    path = write_config(fsdp=True)
    seen = {}

    def fake_exec(exe, argv):
        seen["argv"] = argv
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", fake_exec)
    with pytest.raises(SystemExit):
        cli.main(["train", str(path), "--nproc", "2"])
    argv = seen["argv"]
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    assert "--standalone" in argv and "--nproc-per-node=2" in argv
    assert argv[-4:] == ["-m", "magistune", "train", str(path)]


def test_nproc_checks_the_config_first_and_refuses_inside_torchrun(monkeypatch, write_config, capsys, tmp_path):
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("exec'd despite a bad config"))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    bad = write_config(fsdp=True, ddp=True)
    assert cli.main(["train", str(bad), "--nproc", "2"]) == 2
    assert "not both" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train", str(write_config(name="ok.yaml", fsdp=True)), "--nproc", "2"]) == 2
    assert "already started by torchrun" in capsys.readouterr().err


# --- ranks that disagree --------------------------------------------------------------------------------------

def _sample(ids, trained=True, source="f:1"):
    return Sample(ids, ids if trained else [IGNORE_INDEX] * len(ids), source)


def test_sample_digest_sees_tokens_labels_and_sources():
    a = [_sample([1, 2, 3]), _sample([4, 5])]
    assert sample_digest(a) == sample_digest([_sample([1, 2, 3]), _sample([4, 5])])
    assert sample_digest(a) != sample_digest([_sample([1, 2, 3]), _sample([4, 5], trained=False)])
    assert sample_digest(a) != sample_digest([_sample([1, 2, 3]), _sample([4, 5], source="f:2")])
    assert sample_digest(a) != sample_digest([_sample([1, 2]), _sample([3, 4, 5])])


def test_disagreement_names_keys_and_data():
    one = {"config": {"learning_rate": 1e-3, "datasets": [{"path": "/a.jsonl"}]}, "data": {"train": [8, "ab" * 32], "eval": [2, "cd" * 32]}}
    same = {"config": {"learning_rate": 1e-3, "datasets": [{"path": "/a.jsonl"}]}, "data": {"train": [8, "ab" * 32], "eval": [2, "cd" * 32]}}
    assert describe_disagreement([one, same]) is None
    other = {"config": {"learning_rate": 2e-3, "datasets": [{"path": "/b.jsonl"}]}, "data": {"train": [9, "ef" * 32], "eval": [2, "cd" * 32]}}
    msg = describe_disagreement([one, same, other])
    assert "config key learning_rate: rank 0 has 0.001, rank 2 has 0.002" in msg
    assert "config key datasets[0].path: rank 0 has '/a.jsonl', rank 2 has '/b.jsonl'" in msg
    assert "train data: rank 0 has 8 samples (sha256 abababababab), rank 2 has 9 samples (sha256 efefefefefef)" in msg
    assert "eval data" not in msg and "rank 1" not in msg


# --- eval batches shared between ranks ---------------------------------------------------------------------------

def _batches(n):
    return [collate([_sample([i + 1, i + 2, i + 3])], pad_id=0) for i in range(n)]


@pytest.mark.parametrize("n,world", [(5, 2), (4, 2), (1, 2), (7, 3), (0, 2)])
def test_eval_share_is_disjoint_complete_and_equal_in_count(n, world):
    shares = [list(distributed.eval_share(iter(_batches(n)), r, world)) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # the same number of forwards everywhere
    real = [b for s in shares for b in s if b.n_trained]
    assert sorted(int(b.input_ids[0, 0]) for b in real) == list(range(1, n + 1))
    assert sum(b.n_trained for s in shares for b in s) == sum(b.n_trained for b in _batches(n))


@pytest.mark.parametrize("n,mbs,world", [(5, 2, 2), (4, 1, 2), (3, 1, 2), (1, 2, 2), (7, 2, 3), (0, 1, 2)])
def test_preference_eval_groups_are_disjoint_complete_and_equal_in_count(n, mbs, world):
    """preference_ranks.eval_groups: every index counted once over the ranks, the same number of forwards on each."""
    from magistune.train.preference_ranks import eval_groups

    shares = [eval_groups(n, mbs, SimpleNamespace(rank=r, world=world)) for r in range(world)]
    assert len({len(s) for s in shares}) == 1
    counted = sorted(i for s in shares for idx, counted in s if counted for i in idx)
    assert counted == list(range(n))
    assert all(len(idx) <= mbs and idx for s in shares for idx, _ in s)


def test_sample_digest_sees_both_answers_of_a_pair_and_kto_labels():
    from magistune.data.sample import KTOSample, PreferenceSample

    def pair(rejected):
        return PreferenceSample([1, 2, 3], [-100, 2, 3], [1, 2, *rejected], [-100, 2, *rejected], "f:1")

    assert sample_digest([pair([4])]) == sample_digest([pair([4])]) != sample_digest([pair([5])])
    good, bad = KTOSample([1, 2], [-100, 2], "f:1", label=True), KTOSample([1, 2], [-100, 2], "f:1", label=False)
    assert sample_digest([good]) != sample_digest([bad])


def test_filler_trains_nothing_and_keeps_the_shape():
    b = _batches(1)[0]
    f = distributed.filler(b)
    assert f.n_trained == 0 and f.input_ids.shape == b.input_ids.shape and b.n_trained > 0


def test_quiet_logger_keeps_errors_only(capsys):
    log = QuietLogger(Printer(rank=1))
    log.message("step 3/4: loss 1.0")
    log.message("error: out of memory at step 3")
    assert capsys.readouterr().err == "[rank 1] error: out of memory at step 3\n"
    assert log.log_train(3, loss=1.0)["loss"] == 1.0


def test_normalised_gradient_equals_the_global_batch_gradient():
    """The arithmetic of loss.forward_backward + normaliser, without processes: 2 ranks with unequal token counts,
    each backpropagating loss_sum × 2 / T, averaged (÷ 2), give the gradient of the one-process step."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
    from train_helpers import make_lm, make_samples

    from magistune.train.loss import forward_backward

    samples = make_samples(6, seed=3)
    micro = [collate(samples[i:i + 2], pad_id=0) for i in range(0, 6, 2)]
    shares = [micro[:1], micro[1:]]  # rank 0: 1 micro-batch, rank 1: 2 (different token counts)
    model = make_lm()
    ref = forward_backward(model, micro)
    want = [p.grad.clone() for p in model.parameters()]
    total = sum(b.n_trained for b in micro)
    grads = []
    for share in shares:
        model.zero_grad()
        forward_backward(model, share, normaliser=lambda n: total / 2)
        grads.append([p.grad.clone() for p in model.parameters()])
    for w, a, b in zip(want, *grads):
        torch.testing.assert_close((a + b) / 2, w, rtol=1e-5, atol=1e-7)
    assert ref.n_trained == total


def test_meta_device_build_gets_the_tiled_mlp():
    """FSDP2's full fine-tune builds its model on the meta device (sharding._build_from_rank0, through
    model.build_model(meta=True)); the tiled MLP is swapped in there too, under the names rank 0's weights arrive
    with, and nothing of it holds memory."""
    from magistune.model import build_model
    from magistune.model.fused import SwiGLUMLP

    cfg, _ = cfg_of(tiled_mlp=True, tiled_mlp_num_shards=3, gradient_checkpointing=True)
    loaded, _, _ = build_model(cfg, torch.device("cpu"))
    model, _, _ = build_model(cfg, torch.device("cpu"), meta=True)
    assert all(isinstance(layer.mlp, SwiGLUMLP) and layer.mlp.shards == 3 for layer in model.model.layers)
    assert list(model.state_dict()) == list(loaded.state_dict())
    assert all(t.is_meta for t in model.state_dict().values())


def test_meta_device_build_matches_the_loaded_adapter_model():
    """LoRA on the meta device: the same trainable parameter names as the loaded model (rank 0's broadcast)."""
    from magistune.model import build_model

    cfg, _ = cfg_of(adapter="lora", lora_target_linear=True, lora_r=4)
    loaded, _, _ = build_model(cfg, torch.device("cpu"))
    model, _, _ = build_model(cfg, torch.device("cpu"), meta=True)
    assert list(model.state_dict()) == list(loaded.state_dict())
    trained = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    assert trained(model) == trained(loaded) and trained(model)


def test_meta_device_build_gets_liger_and_the_lora_kernels(monkeypatch):
    """FSDP2's LoRA build: rank 0's copy on the CPU keeps the stock RMSNorm and MLP (liger needs CUDA), the meta
    build of a GPU rank swaps liger's modules in (liger_ready, made true here) and the fused LoRA kernels on top.
    Rank 0's weights load into it by name (sharding._build_from_rank0), so the names must be the same."""
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    from magistune.model import build_model, fused
    from magistune.model.lora_kernels import LoRAFusedAttention

    cfg, _ = cfg_of(adapter="lora", lora_target_linear=True, lora_r=4, fsdp=True, liger_rms_norm=True,
                    liger_glu_activation=True, lora_qkv_kernel=True, lora_o_kernel=True, lora_mlp_kernel=True)
    host, host_info, _ = build_model(cfg, torch.device("cpu"))
    assert any("liger kernels need a CUDA GPU" in n for n in host_info.notes)
    monkeypatch.setattr(fused, "liger_ready", lambda device: None)
    model, info, _ = build_model(cfg, torch.device("cpu"), meta=True)
    assert not any("liger" in n for n in info.notes)
    layers = model.base_model.model.model.layers
    assert all(isinstance(layer.input_layernorm, fused.FusedRMSNorm) and layer.mlp.liger and layer.mlp.fuse_gate_up
               and isinstance(layer.self_attn, LoRAFusedAttention) for layer in layers)
    assert all(isinstance(layer.input_layernorm, MistralRMSNorm) for layer in host.base_model.model.model.layers)
    assert list(model.state_dict()) == list(host.state_dict())
    trained = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    assert trained(model) == trained(host) and trained(model)
