"""The peak-memory estimate (train/memory_estimate.py) against measured peaks, and the refusal before loading."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import MistralConfig

from magistune import cli
from magistune.config import ConfigError, load_config, parse_config
from magistune.data.sample import KTOSample
from magistune.train.dpo import DPO
from magistune.train.grpo import GRPO
from magistune.train.metrics import Printer
from magistune.train.preference_step import collate_pairs
from test_train_preference_step import make_pairs
from magistune.train import memory_estimate
from magistune.train.memory_estimate import GiB, check_memory, estimate, longest_row

# Magistral Small 2506/2507's language model (config.json), without weights
MAGISTRAL_SMALL = MistralConfig(vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=128, sliding_window=None)
QLORA = {"base_model": "tiny-random", "datasets": [{"path": "d.jsonl"}], "adapter": "qlora", "load_in_4bit": True,
         "lora_r": 32, "lora_dropout": 0.05, "lora_target_linear": True, "optimizer": "adamw_bnb_8bit",
         "gradient_checkpointing": True,
         "bf16": True}
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LONG = {"cut_cross_entropy": True, "activation_offloading": True, "tiled_mlp": True, "tiled_mlp_num_shards": 7}


def cfg_of(**keys):
    return parse_config({**QLORA, **keys})[0]


# torch.cuda.max_memory_allocated on 1 H200, random-weight Magistral Small, QLoRA NF4 r=32 on all 7 projections,
# lora_dropout 0.05, 8-bit AdamW, checkpointing, bf16 (the lead's measurements, issue 17)
MEASURED = [
    ({"sequence_len": 2048}, 16.6),
    ({"sequence_len": 2048, "micro_batch_size": 2, "gradient_accumulation_steps": 4}, 18.7),
    ({"sequence_len": 8192, "cut_cross_entropy": True}, 21.8),
    ({"sequence_len": 32768, **LONG}, 22.4),
    ({"sequence_len": 65536, **LONG}, 29.8),
    # 2026-12-02 (bench/results/long_context_2026-12-02.jsonl): 8 shards, liger kernels, lora_dropout 0.05 and 0
    ({"sequence_len": 65536, **LONG, "tiled_mlp_num_shards": 8, "liger_rms_norm": True, "liger_glu_activation": True},
     26.15),
    ({"sequence_len": 65536, **LONG, "tiled_mlp_num_shards": 8, "liger_rms_norm": True, "liger_glu_activation": True,
      "lora_dropout": 0.0}, 23.07),
    # the seed's shape with liger, CCE and offloading (bench/results/train_step_three_sides_2026-12-02.md)
    ({"sequence_len": 2048, "micro_batch_size": 2, "gradient_accumulation_steps": 4, "cut_cross_entropy": True,
      "activation_offloading": True, "liger_rms_norm": True, "liger_glu_activation": True}, 16.87),
    # issue 17's last points: 131,072 tokens in 16 shards without dropout; 65,536 with the three LoRA kernels (one
    # dropout mask per group, saved as bool: 24.40 GiB against 26.15 with PEFT's layers, the point above)
    ({"sequence_len": 131072, **LONG, "tiled_mlp_num_shards": 16, "liger_rms_norm": True, "liger_glu_activation": True,
      "lora_dropout": 0.0}, 28.74),
    ({"sequence_len": 65536, **LONG, "tiled_mlp_num_shards": 8, "liger_rms_norm": True, "liger_glu_activation": True,
      "lora_qkv_kernel": True, "lora_o_kernel": True, "lora_mlp_kernel": True}, 24.40),
]


@pytest.mark.parametrize("keys,gib", MEASURED)
def test_estimate_is_within_10_percent_of_the_measured_peak(keys, gib):
    assert estimate(cfg_of(**keys), MAGISTRAL_SMALL).total / GiB == pytest.approx(gib, rel=0.10)


def test_full_fine_tune_on_two_gpus_with_fsdp():
    """examples/magistral-small-2506-full-fsdp.yaml at seq 2,048 on 2 H200s: 97.9 GiB per GPU (README)."""
    cfg, _ = parse_config({"base_model": "x", "datasets": [{"path": "d"}], "sequence_len": 2048, "bf16": True,
                           "gradient_checkpointing": True, "fsdp": True, "optimizer": "adamw_torch_fused"})
    assert estimate(cfg, MAGISTRAL_SMALL, world=2, fsdp=True).total / GiB == pytest.approx(97.9, rel=0.10)


def test_the_parts():
    """Weights: 22.2B NF4 linear weights + 1.34B bf16 embeddings/lm_head = 13.2 GiB; LoRA r=32 on 7 projections:
    185M fp32 values + gradients + 8-bit AdamW = 10 B each."""
    est = estimate(cfg_of(sequence_len=2048), MAGISTRAL_SMALL)
    assert est.weights / GiB == pytest.approx(13.2, abs=0.1)
    assert est.trained == pytest.approx(40 * 32 * (2 * 9216 + 2 * 6144 + 3 * 37888) * 10)
    assert est.tokens == 2048


def test_options_lower_the_estimate_and_more_gpus_share_it():
    base = cfg_of(sequence_len=32768)
    total = estimate(base, MAGISTRAL_SMALL).total
    for keys in ({"activation_offloading": True}, {"tiled_mlp": True}):
        assert estimate(base.model_copy(update=keys), MAGISTRAL_SMALL).total < total
    short = cfg_of(sequence_len=2048)  # the logits' chunk is the peak at 2,048 tokens, not at 32,768
    cce = short.model_copy(update={"cut_cross_entropy": True})
    assert estimate(cce, MAGISTRAL_SMALL).total < estimate(short, MAGISTRAL_SMALL).total
    assert estimate(base.model_copy(update={"cut_cross_entropy": True}), MAGISTRAL_SMALL).total == total
    no_ckpt = estimate(base.model_copy(update={"gradient_checkpointing": False}), MAGISTRAL_SMALL).total
    assert no_ckpt > 2 * total
    fsdp = estimate(base, MAGISTRAL_SMALL, world=4, fsdp=True)
    assert fsdp.weights < estimate(base, MAGISTRAL_SMALL).weights / 2
    assert estimate(base, MAGISTRAL_SMALL, world=2, sp_degree=2).tokens == 16384
    full = estimate(parse_config({"base_model": "x", "datasets": [{"path": "d"}]})[0], MAGISTRAL_SMALL)
    assert full.trained / GiB == pytest.approx(23.57e9 * 6 / GiB, rel=0.01)  # bf16 gradients + AdamW's 2 moments


def test_a_config_over_the_gpu_is_refused_naming_the_option_that_fits():
    cfg = cfg_of(sequence_len=32768)  # 13.2 + 1.7 + 28.0 GiB of activations
    with pytest.raises(ConfigError) as e:
        check_memory(cfg, MAGISTRAL_SMALL, 32 * GiB)
    msg = str(e.value)
    assert "estimated peak" in msg and "of the GPU's 32.0 GiB" in msg and "skip_memory_check: true" in msg
    assert "activation_offloading: true" in msg
    assert "cut_cross_entropy" not in msg.split("fit with")[1]  # the logits are not what is too large here


def test_smaller_micro_batches_are_named_when_they_fit():
    with pytest.raises(ConfigError, match=r"micro_batch_size: 1 \(gradient_accumulation_steps × 4/1"):
        check_memory(cfg_of(sequence_len=8192, micro_batch_size=4, cut_cross_entropy=True), MAGISTRAL_SMALL, 23 * GiB)


def test_sequence_len_is_named_when_nothing_else_fits(monkeypatch):
    monkeypatch.setattr(memory_estimate, "cce_installed", lambda: True)
    with pytest.raises(ConfigError, match="all of cut_cross_entropy, activation_offloading, tiled_mlp, "
                                         "micro_batch_size: 1 and sequence_len: 16384"):
        check_memory(cfg_of(sequence_len=131072), MAGISTRAL_SMALL, 20 * GiB)


def test_no_refusal_without_a_known_gpu_or_with_the_override():
    cfg = cfg_of(sequence_len=32768)
    total = estimate(cfg, MAGISTRAL_SMALL).total
    assert check_memory(cfg, MAGISTRAL_SMALL, None).startswith(f"memory: estimated peak {total / GiB:.1f} GiB on a GPU")
    assert check_memory(cfg.model_copy(update={"skip_memory_check": True}), MAGISTRAL_SMALL, 32 * GiB)


def test_train_refuses_before_loading_on_a_gpu_too_small(write_config, write_jsonl, tmp_path, capsys, monkeypatch):
    """Through the CLI: a (pretend) 10 MiB GPU; exit 2, the message, no traceback, nothing loaded."""
    monkeypatch.setattr("magistune.train.preflight.pick_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=10 * 2**20))
    write_jsonl(tmp_path / "data.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "yo"}]}])
    assert cli.main(["train", str(write_config())]) == 2
    err = capsys.readouterr().err
    assert "error: memory: estimated peak" in err and "more than the GPU has" in err and "Traceback" not in err


# --- Cut Cross Entropy is offered only where it is installed ----------------------------------------------------

def test_cce_is_offered_only_when_installed(monkeypatch):
    cfg = cfg_of(sequence_len=2048)  # the logits' chunk (1.25 GiB) is what CCE removes here
    limit = (estimate(cfg.model_copy(update={"cut_cross_entropy": True}), MAGISTRAL_SMALL).total
             + estimate(cfg, MAGISTRAL_SMALL).total) / 2
    monkeypatch.setattr(memory_estimate, "cce_installed", lambda: True)
    with pytest.raises(ConfigError, match="it would fit with cut_cross_entropy: true"):
        check_memory(cfg, MAGISTRAL_SMALL, limit)
    monkeypatch.setattr(memory_estimate, "cce_installed", lambda: False)
    with pytest.raises(ConfigError) as e:
        check_memory(cfg, MAGISTRAL_SMALL, limit)
    assert "cut_cross_entropy" not in str(e.value)
    with pytest.raises(ConfigError) as e:  # nor in the "all of …" fallback, which is then computed without it
        check_memory(cfg_of(sequence_len=131072), MAGISTRAL_SMALL, 20 * GiB)
    assert "cut_cross_entropy" not in str(e.value) and "all of activation_offloading, tiled_mlp" in str(e.value)


def test_cce_installed_is_find_spec():
    assert memory_estimate.cce_installed() == (importlib.util.find_spec("cut_cross_entropy") is not None)


# --- sequence parallelism, past one GPU ---------------------------------------------------------------------------

def test_sequence_parallel_degree_is_named_for_a_long_sequence_that_fits_no_gpu(monkeypatch):
    monkeypatch.setattr(memory_estimate, "cce_installed", lambda: True)
    cfg, limit = cfg_of(sequence_len=262144), 24 * GiB
    with pytest.raises(ConfigError) as e:
        check_memory(cfg, MAGISTRAL_SMALL, limit)
    degree = int(re.search(r"sequence_parallel_degree: (\d+) on \d+ GPUs", str(e.value)).group(1))
    every = cfg.model_copy(update={**LONG, "tiled_mlp_num_shards": None, "gradient_checkpointing": True})
    assert estimate(every, MAGISTRAL_SMALL, world=degree, sp_degree=degree).total <= limit
    assert estimate(every, MAGISTRAL_SMALL, world=degree // 2, sp_degree=degree // 2).total > limit
    assert f"--nproc {degree}" in str(e.value)


def test_sequence_parallel_is_not_named_for_short_rows_or_preference_tuning():
    with pytest.raises(ConfigError) as e:  # the weights alone exceed 10 GiB: more GPUs with FSDP
        check_memory(cfg_of(sequence_len=8192), MAGISTRAL_SMALL, 10 * GiB)
    assert "sequence_parallel" not in str(e.value) and "use more GPUs (fsdp: true)" in str(e.value)
    with pytest.raises(ConfigError) as e:  # rl: not implemented with sequence parallelism
        check_memory(rl_cfg("dpo", sequence_len=131072), MAGISTRAL_SMALL, 24 * GiB)
    assert "sequence_parallel" not in str(e.value)


# --- preference tuning: a pair's row, its mask ----------------------------------------------------------------

H, Q, KV, LAYERS = 5120, 32 * 128, 8 * 128, 40


def rl_cfg(rl, **keys):
    raw = {**QLORA, "rl": rl, "datasets": [{"path": "d.jsonl", "type": "chat_template"}], **keys}
    if rl == "grpo":
        raw["trl"] = {"num_generations": 4, "max_completion_length": 1024, **raw.get("trl", {})}
    return parse_config(raw)[0]


def test_dpo_and_grpo_are_within_10_percent_of_their_measured_peaks():
    """bench/results/dpo_step_2026-12-02.jsonl and grpo_step_2026-12-02.jsonl, magistune's side (1 H200, the
    QLoRA above): one pair, a 1,024-token prompt and two 1,024-token answers (one row of 3,072), lora_dropout 0.05:
    17.96 GiB; GRPO, 8 completions of a 256-token prompt + 512 new tokens in one micro-batch, lora_dropout 0:
    19.51 GiB for the step, 16.25 during the rollout (the gradients freed then; the estimate counts them)."""
    dpo = estimate(rl_cfg("dpo", sequence_len=2048), MAGISTRAL_SMALL, row=3072)
    assert dpo.tokens == 3072 and dpo.total / GiB == pytest.approx(17.96, rel=0.10)
    grpo = estimate(rl_cfg("grpo", sequence_len=768, micro_batch_size=8, lora_dropout=0.0,
                           trl={"num_generations": 8, "max_completion_length": 512}), MAGISTRAL_SMALL, prompt=256)
    assert grpo.total / GiB == pytest.approx(19.51, rel=0.10)
    assert (grpo.weights + grpo.trained + grpo.rollout) / GiB == pytest.approx(16.25, rel=0.10)


def test_a_pair_row_is_the_prompt_once_and_both_answers():
    dpo = rl_cfg("dpo", sequence_len=4096, micro_batch_size=2)
    assert estimate(dpo, MAGISTRAL_SMALL).tokens == 2 * (2 * 4096 - 1)  # each side ≤ sequence_len, the prompt ≥ 1
    assert estimate(dpo, MAGISTRAL_SMALL, row=3000).tokens == 6000
    assert estimate(dpo, MAGISTRAL_SMALL, row=10**6).tokens == 2 * (2 * 4096 - 1)
    pairs = make_pairs(3, seed=1)
    assert longest_row(pairs) == max(len(collate_pairs([s], 0).input_ids[0]) for s in pairs)
    kto = [KTOSample(s.chosen_input_ids, s.chosen_labels, s.source) for s in pairs]
    assert longest_row(kto) == max(len(s.chosen_input_ids) for s in pairs)


@pytest.mark.parametrize("rl,mbs,masked", [("dpo", 1, True), ("orpo", 2, True), ("kto", 1, False), ("kto", 2, True)])
def test_the_attention_mask_adds_its_bytes(rl, mbs, masked):
    """The same tokens as SFT's, plus (with a mask) B·T² bool + SDPA's bf16 bias and k, v at the query width:
    3·B·T² + 8q a token. CCE on: the layer, not the logits, is the peak."""
    row = 4000
    pref = estimate(rl_cfg(rl, sequence_len=4096, micro_batch_size=mbs, cut_cross_entropy=True), MAGISTRAL_SMALL,
                    row=row)
    sft = estimate(cfg_of(sequence_len=row, micro_batch_size=mbs, cut_cross_entropy=True), MAGISTRAL_SMALL)
    assert pref.tokens == sft.tokens == mbs * row
    extra = 3 * mbs * row ** 2 + mbs * row * 8 * Q if masked else 0
    assert pref.activations - sft.activations == pytest.approx(extra)


def test_preference_tuning_keeps_its_checkpoints_and_is_not_offered_offloading():
    dpo = rl_cfg("dpo", sequence_len=16384, cut_cross_entropy=True)
    est = estimate(dpo, MAGISTRAL_SMALL, row=16384)
    with pytest.raises(ConfigError) as e:
        check_memory(dpo, MAGISTRAL_SMALL, est.total - est.tokens * LAYERS * 2 * H / 2, row=16384)
    assert "activation_offloading" not in str(e.value) and "tiled_mlp: true" in str(e.value)


def test_lora_kernels_share_one_dropout_copy():
    """PEFT: a bf16 dropout(x) + bool mask for each of q, k, v (3 B × 3h); lora_qkv_kernel: one for the group."""
    base = cfg_of(sequence_len=8192, cut_cross_entropy=True)
    kernels = base.model_copy(update={"lora_qkv_kernel": True, "lora_o_kernel": True, "lora_mlp_kernel": True})
    saved = estimate(base, MAGISTRAL_SMALL).activations - estimate(kernels, MAGISTRAL_SMALL).activations
    assert saved == pytest.approx(8192 * 3 * (3 * H - H))
    no_dropout = base.model_copy(update={"lora_dropout": 0.0})
    copies = estimate(base, MAGISTRAL_SMALL).activations - estimate(no_dropout, MAGISTRAL_SMALL).activations
    assert copies == pytest.approx(8192 * 3 * (3 * H + Q))


# --- GRPO: the training rows, and the rollout before them ---------------------------------------------------------

def test_grpo_rollout_is_the_kv_cache_of_every_completion_and_the_prefill():
    cfg = rl_cfg("grpo", sequence_len=4096, micro_batch_size=4, gradient_accumulation_steps=2)
    est = estimate(cfg, MAGISTRAL_SMALL, prompt=512)
    rows, columns = 8, 512 + 1024
    cache = LAYERS * 2 * KV * rows * columns * 2
    prefill = rows * (512 * columns * (8 * 32 + 3) + 512 * (2 * (H + 3 * 32768) + 4 * Q) + columns * 8 * Q)
    assert est.rollout == cache + prefill and est.rollout_shape == (rows, columns)
    assert est.tokens == 4 * columns  # a training forward: micro_batch_size rows of prompt + completion
    assert est.total == est.weights + est.trained + max(est.activations, est.rollout)
    assert estimate(cfg, MAGISTRAL_SMALL).rollout_shape == (rows, 4096)  # no data: prompt ≤ sequence_len − 1024
    doubled = estimate(cfg.model_copy(update={"gradient_accumulation_steps": 4}), MAGISTRAL_SMALL, prompt=512)
    assert doubled.rollout == 2 * est.rollout and doubled.activations == est.activations
    offload = cfg.model_copy(update={"activation_offloading": True})  # (the config refuses it with rl: grpo)
    assert estimate(offload, MAGISTRAL_SMALL, prompt=512).activations == est.activations
    assert "rollout" in est.line() and f"KV cache of {rows} completions × {columns:,} tokens" in est.line()


def test_grpo_refusal_names_a_shorter_completion_when_the_rollout_is_too_large():
    cfg = rl_cfg("grpo", sequence_len=8192, micro_batch_size=8, gradient_accumulation_steps=8,
                 trl={"max_completion_length": 4096})
    est = estimate(cfg, MAGISTRAL_SMALL, prompt=512)
    assert est.rollout > est.activations
    with pytest.raises(ConfigError) as e:
        check_memory(cfg, MAGISTRAL_SMALL, est.total - est.rollout / 2, prompt=512)
    msg = str(e.value)
    n = int(re.search(r"trl.max_completion_length: (\d+)", msg).group(1))
    assert n < 4096 and "activation_offloading" not in msg and "sequence_parallel" not in msg
    with pytest.raises(ConfigError, match="no option of magistune's makes it fit on this GPU: fewer completions"):
        check_memory(cfg, MAGISTRAL_SMALL, est.weights + est.trained + GiB, prompt=512)


# --- the recipes print the line (CPU: never refuse) and refuse on a GPU too small ---------------------------------

def preference_config(tmp_path):
    shutil.copy(EXAMPLES / "data" / "demo_dpo.jsonl", tmp_path / "pairs.jsonl")
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump({"base_model": "tiny-random", "datasets": [{"path": "pairs.jsonl",
                    "type": "chat_template"}], "rl": "dpo", "sequence_len": 512, "adapter": "lora",
                    "lora_target_linear": True, "output_dir": "out"}), encoding="utf-8")
    return path


def grpo_config(tmp_path):
    shutil.copy(EXAMPLES / "data" / "grpo_math.jsonl", tmp_path / "prompts.jsonl")
    shutil.copy(EXAMPLES / "rewards.py", tmp_path)
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump({"base_model": "tiny-random", "datasets": [{"path": "prompts.jsonl",
                    "type": "chat_template"}], "rl": "grpo", "sequence_len": 256, "adapter": "lora",
                    "lora_target_linear": True, "trl": {"num_generations": 2, "max_completion_length": 16,
                                                        "reward_funcs": ["rewards.lowercase_share"]},
                    "micro_batch_size": 2, "output_dir": "out"}), encoding="utf-8")
    return path


@pytest.mark.parametrize("recipe,write", [(DPO, preference_config), (GRPO, grpo_config)])
def test_the_rl_recipes_print_the_line_on_the_cpu(recipe, write, tmp_path, capsys):
    run = recipe(load_config(write(tmp_path))[0], Printer())
    try:
        run.setup_data()
    finally:
        run.release()
    err = capsys.readouterr().err
    assert "memory: estimated peak" in err and "on a GPU" in err


@pytest.mark.parametrize("write", [preference_config, grpo_config])
def test_the_rl_recipes_refuse_before_loading_on_a_gpu_too_small(write, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("magistune.train.preflight.pick_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=10 * 2**20))
    assert cli.main(["train", str(write(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "error: memory: estimated peak" in err and "more than the GPU has" in err and "Traceback" not in err
