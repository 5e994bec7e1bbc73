"""Cross-key checks of the top-level config: FSDP, preference tuning, GRPO, base_fp8, the fused LoRA kernels.

Split from config.py (the schema) to keep each file readable; Config's model validator calls these in order.
Each takes the Config (not imported: this module sits below config.py) and raises ValueError naming the key.
"""

from __future__ import annotations

from typing import Any

REFERENCE_LOSSES = ("dpo", "ipo", "kto")  # the rl losses that compare with a frozen reference model


def check_fsdp(cfg: Any) -> None:
    if cfg.fsdp and cfg.ddp:
        raise ValueError("set fsdp (shard the model over the GPUs) or ddp (a copy on each GPU), not both")
    if cfg.fsdp_cpu_offload and not cfg.fsdp:
        raise ValueError("fsdp_cpu_offload offloads FSDP's shards; it needs fsdp: true")
    if cfg.fsdp and cfg.optimizer in ("adamw_bnb_8bit", "paged_adamw_8bit"):
        raise ValueError(f"optimizer: {cfg.optimizer} cannot update FSDP's sharded (DTensor) parameters; use "
                         "adamw_torch or adamw_torch_fused (the AdamW state is sharded over the GPUs as well), "
                         "or ddp: true")
    if cfg.fsdp and (cfg.train_vision_tower or cfg.train_projector):
        raise ValueError("fsdp cannot train the vision tower or projector (a micro-batch without images leaves "
                         "them without gradients on that GPU); use ddp: true, or train the language model only")


def check_preference(cfg: Any) -> None:
    """Dataset options that have no meaning for preference data, and the reference model's default."""
    if cfg.rl is None or cfg.rl == "grpo":
        return
    for i, ds in enumerate(cfg.datasets):
        if ds.type != "chat_template":
            raise ValueError(f"datasets[{i}].type: {ds.type} is the SFT messages format; with rl: {cfg.rl} use "
                             "type: chat_template (TRL's conversational preference records)")
        for key, default in (("train_on", "all_assistant"), ("train_thinking", True), ("train_on_inputs", False),
                             ("roles_to_train", ["assistant"]), ("train_on_eos", "turn"),
                             ("message_field_training", None)):
            if getattr(ds, key) != default:
                raise ValueError(f"datasets[{i}].{key}: not used with rl: {cfg.rl} (the labels cover the final "
                                 "answer whole: its thinking, text, tool calls and </s>)")
    for key in ("sample_packing", "activation_offloading"):
        if getattr(cfg, key):
            raise ValueError(f"{key}: not supported with rl yet (each preference pair is one row of its own)")
    needs_ref = cfg.rl in REFERENCE_LOSSES
    if cfg.precompute_ref_log_probs is None:
        cfg.precompute_ref_log_probs = needs_ref and cfg.adapter is None
    elif cfg.precompute_ref_log_probs and not needs_ref:
        raise ValueError(f"precompute_ref_log_probs: rl: {cfg.rl} uses no reference model")
    elif needs_ref and cfg.adapter is None and not cfg.precompute_ref_log_probs:
        raise ValueError(f"precompute_ref_log_probs: false, but a full fine-tune with rl: {cfg.rl} has no other "
                         "reference (no second copy of the model is kept): leave it unset or true")


def check_grpo(cfg: Any) -> None:
    """rl: grpo trains on its own completions: the SFT label options mean nothing, and `trl:` belongs to it.
    With rl: grpo, cfg.trl is already filled in (Config sets TRLConfig() when it was left out)."""
    if cfg.rl != "grpo":
        if cfg.trl is not None:
            raise ValueError("trl: holds GRPO's settings; set rl: grpo (or remove trl)")
        return
    for i, ds in enumerate(cfg.datasets):
        if ds.type != "chat_template":
            raise ValueError(f"datasets[{i}].type: {ds.type}: rl: grpo reads TRL's prompt records "
                             "({\"prompt\": [messages], ...columns}) with type: chat_template")
        for key, default in (("train_on", "all_assistant"), ("train_thinking", True), ("train_on_inputs", False)):
            if getattr(ds, key) != default:
                raise ValueError(f"datasets[{i}].{key}: not used with rl: grpo (the model's own completions "
                                 "are trained)")
    if cfg.trl.beta > 0 and cfg.adapter is None:
        raise ValueError("trl.beta > 0 needs adapter: lora or qlora (the reference is the model with its adapters "
                         "disabled); a frozen copy for a full fine-tune is not implemented")
    if cfg.sample_packing:
        raise ValueError("sample_packing: not used with rl: grpo (rollouts are padded batches)")
    if cfg.activation_offloading:
        raise ValueError("activation_offloading: not applied with rl: grpo (its checkpointed layer inputs stay on "
                         "the GPU); remove it")


def check_base_fp8(cfg: Any) -> None:
    if not cfg.base_fp8:
        return
    if not cfg.adapter:
        raise ValueError("base_fp8 multiplies the frozen base weights in FP8 and gives them no gradient; "
                         "it needs adapter: lora or qlora")
    if cfg.fsdp:
        raise ValueError("base_fp8 is not wired into the FSDP2 model build yet; drop it, or use ddp: true")
    if cfg.rl == "grpo":
        raise ValueError("base_fp8 is not wired into GRPO's rollouts (CUDA-graph decoding) yet; "
                         "drop it for rl: grpo")


def check_lora_kernels(cfg: Any) -> None:
    keys = [k for k in ("lora_qkv_kernel", "lora_o_kernel", "lora_mlp_kernel") if getattr(cfg, k)]
    if not keys:
        return
    if not cfg.adapter:
        raise ValueError(f"{keys[0]}: the fused LoRA kernels need adapter: lora or qlora")
    if cfg.peft_use_dora:
        raise ValueError(f"{keys[0]}: the fused LoRA kernels compute plain LoRA, not DoRA; "
                         "set peft_use_dora: false or the kernel keys to false")
