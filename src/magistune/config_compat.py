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
}

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
    "fsdp": "multi-GPU (FSDP2) is not implemented yet",
    "fsdp_config": "multi-GPU (FSDP2) is not implemented yet",
    "fsdp_version": "multi-GPU (FSDP2) is not implemented yet",
    "ddp_timeout": "multi-GPU is not implemented yet",
    "chat_template": "magistune tokenises with mistral-common only; chat templates are not used",
    "chat_template_jinja": "magistune tokenises with mistral-common only; chat templates are not used",
    "special_tokens": "special tokens come from the tokenizer file (tekken.json)",
    "tokens": "adding tokens is not supported; the tokenizer file is used as is",
    "tokenizer_type": "the tokenizer is always mistral-common's",
    "model_type": "the model class comes from the model's config.json",
    "rl": "preference training (DPO, ORPO, KTO, GRPO) is not implemented",
    "reward_model": "reward models are not implemented",
    "relora_steps": "ReLoRA is not implemented",
    "lora_modules_to_save": "modules_to_save is not implemented; use a full fine-tune with unfrozen_parameters",
    "loraplus_lr_ratio": "LoRA+ is not implemented",
    "neftune_noise_alpha": "NEFTune is not implemented",
    "torch_compile": "torch.compile is not implemented yet",
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
    "shuffle_merged_datasets": "datasets are always shuffled with seed",
    "test_datasets": "not implemented; use val_set_size",
    "liger_rope": "Liger kernels are not active yet",
    "liger_rms_norm": "Liger kernels are not active yet",
    "liger_glu_activation": "Liger kernels are not active yet",
    "liger_fused_linear_cross_entropy": "Liger kernels are not active yet",
    "unsloth_lora_mlp": "Unsloth kernels are not supported",
    "activation_offloading": "activation offloading is not active yet",
}

# Keys whose feature arrives with a later issue: accepted and reported as "not active yet".
LATER_ISSUE_KEYS: dict[str, str] = {
    "sample_packing": "the throughput issue adds packing",
    "cut_cross_entropy": "the throughput issue adds the memory-efficient loss",
}
