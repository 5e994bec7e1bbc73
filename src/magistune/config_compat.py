"""Axolotl compatibility tables for config.py.

Users bring Axolotl configs. A key we do not know at all is an error with a suggestion; an Axolotl key that
we know but do not implement is an error that says so (unless it is empty, as in Axolotl's own examples);
a few keys are harmless no-ops and are accepted with a note.
"""

# Accepted and ignored, with the reason shown to the user.
ACCEPTED_NOOP_KEYS: dict[str, str] = {
    "strict": "Axolotl's strict-loading switch; magistune always validates strictly",
    "save_first_step": "use save_steps instead",
    "save_safetensors": "checkpoints are always safetensors",
    "dataloader_num_workers": "samples are pre-tokenised; the loader does no work",
    "dataloader_pin_memory": "samples are pre-tokenised; the loader does no work",
    "dataloader_prefetch_factor": "samples are pre-tokenised; the loader does no work",
    "group_by_length": "not used; sample_packing is the way to fill batches",
    "early_stopping_patience": "not used",
    "auto_resume_from_checkpoints": "use resume_from_checkpoint: auto",
    "debug": "not used",
    # Axolotl keys from its Magistral / Mistral examples (issue 19; docs/from-axolotl.md)
    "processor_type": "images are encoded by mistral-common's image encoder from the tokenizer file",
    "skip_prepare_dataset": "samples are always tokenised ahead and cached (images included); that is fast here",
    "remove_unused_columns": "records are read whole; only the messages and tools fields are used",
    "dataset_num_proc": "tokenising is one process (1,000 conversations take 3-4 s)",
    **{k: "the fused LoRA kernels are not wired in yet; LoRA runs through PEFT's layers (same result, slower)"
       for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")},
}

# Axolotl keys accepted when they hold Axolotl's default, which is what magistune does; other values are an error.
AXOLOTL_DEFAULT_VALUES: dict[str, str] = {
    "chat_template": "mistral-common encodes the conversations: the tokenizer's own format, as tokenizer_default means",
    "eot_tokens": "empty: mistral-common ends each assistant turn with </s>, trained per train_on_eos",
}


def axolotl_default_value(key: str, value) -> str | None:
    """Why `value` of an AXOLOTL_DEFAULT_VALUES key cannot be honoured, or None when it is accepted."""
    if key == "chat_template":
        if value is None or value == "tokenizer_default" or str(value).startswith("tokenizer_default_fallback_"):
            return None
        return (f"{value!r} is not supported: magistune encodes with mistral-common (ids equal to "
                "encode_chat_completion), never a jinja template; use tokenizer_default or remove the key")
    if key == "eot_tokens":
        return None if not value else (
            "mistral-common's end-of-turn tokens are fixed by the tokenizer version ([/INST] closes the user turn, "
            "</s> the assistant's); they cannot be changed; remove the key (train_on_eos picks which </s> train)")
    raise KeyError(key)

# Axolotl keys that magistune does not implement (an error unless the value is empty).
UNSUPPORTED_AXOLOTL_KEYS: dict[str, str] = {
    **{k: "Weights & Biases logging is not built in; metrics.jsonl and TensorBoard events are written"
       for k in ("wandb_project", "wandb_entity", "wandb_watch", "wandb_name", "wandb_log_model", "wandb_mode",
                 "wandb_run_id")},
    **{k: "MLflow / Comet logging is not built in; metrics.jsonl and TensorBoard events are written"
       for k in ("mlflow_tracking_uri", "mlflow_experiment_name", "use_mlflow", "comet_api_key", "use_comet")},
    "hub_model_id": "pushing to the Hugging Face Hub is not built in (no hub access)",
    "hub_strategy": "pushing to the Hugging Face Hub is not built in (no hub access)",
    "push_dataset_to_hub": "pushing to the Hugging Face Hub is not built in (no hub access)",
    "deepspeed": "DeepSpeed is not supported; multi-GPU uses FSDP2 through torchrun",
    "chat_template_jinja": "magistune tokenises with mistral-common only; chat templates are not used",
    "tokenizer_type": "the tokenizer is always mistral-common's",
    "model_type": "the model class comes from the model's config.json",
    "reward_model": "reward models are not implemented",
    "relora_steps": "ReLoRA is not implemented",
    "lora_modules_to_save": "modules_to_save is not implemented; use a full fine-tune with unfrozen_parameters",
    "loraplus_lr_ratio": "LoRA+ is not implemented",
    "neftune_noise_alpha": "NEFTune is not implemented",
    "torch_compile": "not offered: compiling each decoder layer measured slower on Magistral Small QLoRA (2,441 vs "
                     "2,632 tok/s on an H200, bench/results/train_step_experiments_2026-11-29.md)",
    "xformers_attention": "xformers is not supported; use attn_implementation: sdpa",
    "s2_attention": "S2 attention is not supported",
    "lr_quadratic_warmup": "not implemented; warmup is linear",
    "cosine_min_lr_ratio": "not implemented; cosine decays to 0",
    "eval_table_size": "not implemented",
    "do_bench_eval": "not implemented",
    "gptq": "GPTQ models are not supported; use load_in_4bit (bitsandbytes NF4)",
    "adam_beta1": "not implemented; AdamW uses betas (0.9, 0.999)",
    "adam_beta2": "not implemented; AdamW uses betas (0.9, 0.999)",
    "adam_epsilon": "not implemented; AdamW uses eps 1e-8",
    "message_field_training_detail": "character-offset masks inside a message are not implemented; split the "
                                     "message, or use message_field_training per message",
    "train_on_eot": "mistral-common's turns end with </s> (assistant) or [/INST] (user); use train_on_eos",
    "test_datasets": "not implemented; use val_set_size",
    "liger_rope": "not implemented (RoPE is applied inside transformers' attention function; magistune does not patch it)",
    "liger_fused_linear_cross_entropy": "not implemented; use cut_cross_entropy: true (the same job, Apple's kernels)",
    "unsloth_lora_mlp": "Unsloth kernels are not supported",
    # from Axolotl's other Mistral examples (Mixtral, Mistral 4, DPO/ORPO; docs/from-axolotl.md)
    "quantize_moe_experts": "mixture-of-experts models (Mixtral, Mistral 4) are not supported; Magistral is dense",
    "use_sonicmoe": "mixture-of-experts models (Mixtral, Mistral 4) are not supported; Magistral is dense",
    "use_kernels": "kernels from the Hugging Face kernel hub are not used (no hub access); see liger_glu_activation, "
                   "liger_rms_norm and cut_cross_entropy",
    "model_config": "overriding the model's config.json is not supported",
    "orpo_alpha": "ORPO's λ is rl_beta here (TRL's name `beta`): use rl: orpo with rl_beta",
    "field_chosen": "preference records use TRL's fields: prompt / chosen / rejected (docs/config.md, Preference tuning)",
    "field_rejected": "preference records use TRL's fields: prompt / chosen / rejected (docs/config.md, Preference tuning)",
}

# Axolotl's FSDP settings → magistune's keys (docs/multi-gpu.md). Axolotl spells them as `fsdp: [full_shard,
# auto_wrap, offload]` (FSDP1 style) or `fsdp_version: 2` + `fsdp_config: {offload_params: …}`, with or without the
# `fsdp_` prefix inside fsdp_config. magistune always runs FSDP2 with each decoder layer as a unit.
FSDP_LIST_WORDS = {"full_shard": {}, "auto_wrap": {}, "offload": {"fsdp_cpu_offload": True},
                   "shard_grad_op": {"fsdp_reshard_after_forward": False}}
FSDP_CONFIG_KEYS = {  # fsdp_config key (prefix stripped) → magistune key, or None: always so here, accepted
    "offload_params": "fsdp_cpu_offload",
    "reshard_after_forward": "fsdp_reshard_after_forward",
    "activation_checkpointing": "gradient_checkpointing",
    "version": "fsdp_version",
    "sharding_strategy": None,  # FULL_SHARD / SHARD_GRAD_OP, mapped below
    "auto_wrap_policy": None,  # every decoder layer is one FSDP unit
    "transformer_layer_cls_to_wrap": None,
    "state_dict_type": None,  # checkpoints are sharded, the final output is consolidated
    "cpu_ram_efficient_loading": None,  # rank 0 loads, the others receive their shards
    "sync_module_states": None,
    "use_orig_params": None,
    "limit_all_gathers": None,
    "forward_prefetch": None,
    "backward_prefetch": None,
}


def normalise_axolotl_fsdp(raw: dict) -> dict:
    """Axolotl's FSDP keys in `raw` (a config dict) mapped onto fsdp / fsdp_cpu_offload / fsdp_reshard_after_forward.
    Raises ValueError naming the key for what cannot be mapped."""
    for key in ("fsdp", "fsdp_config", "fsdp_version", "fsdp_cpu_offload", "fsdp_reshard_after_forward", "ddp",
                "ddp_timeout"):
        if key in raw and raw[key] is None:  # `fsdp:` left empty, as in Axolotl's examples: the default
            del raw[key]
    derived: dict = {}
    fsdp = raw.get("fsdp")
    if isinstance(fsdp, str):
        fsdp = fsdp.split()
    if isinstance(fsdp, list):
        unknown = [w for w in fsdp if w not in FSDP_LIST_WORDS]
        if unknown:
            raise ValueError(f"fsdp: {unknown[0]!r} is not supported (magistune shards fully with FSDP2: "
                             f"use fsdp: true, or Axolotl's words {sorted(FSDP_LIST_WORDS)}; ddp: true replicates)")
        for w in fsdp:
            derived.update(FSDP_LIST_WORDS[w])
        raw["fsdp"] = bool(fsdp)
    config = raw.get("fsdp_config")
    if isinstance(config, dict) and config:
        for key, value in config.items():
            short = key.removeprefix("fsdp_")
            if short not in FSDP_CONFIG_KEYS:
                raise ValueError(f"fsdp_config.{key}: unknown; magistune maps {sorted(FSDP_CONFIG_KEYS)}")
            if short == "sharding_strategy":
                strategy = str(value).upper().removeprefix("SHARDINGSTRATEGY.")
                if strategy not in ("FULL_SHARD", "SHARD_GRAD_OP"):
                    raise ValueError(f"fsdp_config.{key}: {value} is not supported; FULL_SHARD or SHARD_GRAD_OP "
                                     "(ddp: true replicates instead)")
                derived["fsdp_reshard_after_forward"] = strategy == "FULL_SHARD"
            elif FSDP_CONFIG_KEYS[short] is not None:
                derived[FSDP_CONFIG_KEYS[short]] = value
        if raw.get("fsdp") is None:
            raw["fsdp"] = True  # Axolotl: fsdp_config (with fsdp_version: 2) turns FSDP on
    for key, value in derived.items():
        if key in raw and raw[key] != value and key != "fsdp_version":
            raise ValueError(f"{key}: {raw[key]!r} contradicts the Axolotl FSDP setting that means {key}: {value!r}")
        raw[key] = value
    return raw
