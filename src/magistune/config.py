"""The YAML config: one pydantic schema, Axolotl's key names where the concept is the same.

load_config() reads a YAML file and returns a validated `Config`. Errors name the key and the reason;
unknown keys suggest the closest valid one, and Axolotl keys we do not implement say so (config_compat.py).
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from magistune.config_compat import (
    ACCEPTED_NOOP_KEYS, AXOLOTL_DEFAULT_VALUES, UNSUPPORTED_AXOLOTL_KEYS, axolotl_default_value, normalise_axolotl_fsdp,
)
from magistune.config_checks import (  # noqa: F401 (REFERENCE_LOSSES: re-exported)
    REFERENCE_LOSSES, check_base_fp8, check_fsdp, check_grpo, check_lora_kernels, check_preference,
)
from magistune.config_sections import DatasetConfig, TRLConfig, _Strict


class ConfigError(ValueError):
    """A bad config: the message names the file, the key and the reason."""


class Config(_Strict):
    # --- model and tokenizer -------------------------------------------------------------------
    base_model: str
    tokenizer_path: str | None = None  # default: <model dir>/tekken.json
    tokenizer_use_mistral_common: bool = True  # false: the Hugging Face tokenizer.json and chat template (hf_tokenizer.py)
    # --- token edits (Axolotl's keys; docs/config.md): mistral-common files via tokenizer_edit.py, Hugging Face
    # tokenizers via hf_tokenizer.py. Named tokens encode as one id wherever text holds them.
    added_tokens_overrides: dict[int, str] | None = None  # {reserved slot id: new name}: renames, same vocab size
    tokens: list[str] | None = None  # new tokens: free reserved slots, else the vocabulary grows
    special_tokens: dict[str, str] | None = None  # Axolotl's bos/eos/pad/unk_token
    trust_remote_code: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] | None = None
    flash_attention: bool = False  # Axolotl's switch: same as attn_implementation: flash_attention_2

    # --- data ----------------------------------------------------------------------------------
    datasets: list[DatasetConfig] = Field(min_length=1)
    sequence_len: int = Field(default=2048, ge=16)
    excess_length_strategy: Literal["drop", "truncate"] = "drop"
    val_set_size: float = Field(default=0.0, ge=0)  # < 1: a fraction; >= 1: a number of samples
    dataset_prepared_path: str | None = None
    system_prompt: str | None = None
    system_prompt_file: str | None = None
    on_bad_record: Literal["error", "skip"] = "error"
    allow_image_urls: bool = False  # fetch http(s) image URLs (with image_fetch_timeout seconds)
    image_fetch_timeout: float = Field(default=10.0, gt=0)
    max_image_pixels: int = Field(default=50_000_000, ge=1, le=178_956_970)  # width × height, checked before decoding
    allow_image_paths_outside_dataset: bool | list[str] = False  # true, or folders allowed besides the dataset's
    max_images_per_sample: int | None = Field(default=None, ge=1)
    max_image_tokens_per_sample: int | None = Field(default=None, ge=1)
    sample_packing: bool = False
    eval_sample_packing: bool | None = None
    # --- Axolotl's data keys (issue 19; docs/from-axolotl.md) ---
    shuffle_merged_datasets: bool = True  # False: the merged datasets keep their order; eval is the last samples
    train_on_inputs: bool | None = None  # Axolotl's top-level default for every dataset that does not set it
    chat_template_kwargs: dict[str, Any] | None = None  # the same, for every dataset that does not set its own
    pad_to_sequence_len: bool = False

    # --- adapters and precision ----------------------------------------------------------------
    adapter: Literal["lora", "qlora"] | None = None  # None: full fine-tuning
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    lora_model_dir: str | None = None
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: float = Field(default=16, gt=0)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    lora_target_modules: list[str] | str | None = None
    lora_target_linear: bool = False
    peft_use_dora: bool = False
    peft_use_rslora: bool = False
    unfrozen_parameters: list[str] | None = None
    train_vision_tower: bool = False  # Magistral 2509: the Pixtral tower stays frozen unless asked
    train_projector: bool = False  # … and so does the multimodal projector
    bf16: bool | Literal["auto"] = "auto"
    fp16: bool = False
    tf32: bool = False
    gradient_checkpointing: bool = False
    activation_offloading: bool = False  # checkpointed layer inputs wait in CPU memory (turns checkpointing on)

    # --- optimisation --------------------------------------------------------------------------
    micro_batch_size: int = Field(default=1, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    num_epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1)
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit"] = "adamw_torch"
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    learning_rate: float = Field(default=2e-4, gt=0)
    warmup_steps: int | None = Field(default=None, ge=0)
    warmup_ratio: float | None = Field(default=None, ge=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0)
    seed: int = 42

    # --- loss and throughput ------------------------------------------------------------------
    cut_cross_entropy: bool = False  # Cut Cross Entropy on CUDA when installed, else the chunked loss
    plugins: list[str] | None = None
    tiled_mlp: bool = False  # the MLP runs over the sequence in checkpointed shards (long sequences)
    tiled_mlp_num_shards: int | None = Field(default=None, ge=2)  # default ceil(sequence_len / hidden_size)
    liger_glu_activation: bool = False  # SiLU(gate)·up in liger's Triton kernel (CUDA)
    liger_rms_norm: bool = False  # RMSNorm in liger's Triton kernel (CUDA)
    lora_qkv_kernel: bool = False  # LoRA q,k,v as one fused autograd Function (model/lora_kernels.py)
    lora_o_kernel: bool = False  # LoRA o_proj through the same Function
    lora_mlp_kernel: bool = False  # LoRA gate,up (one Function) and down
    base_fp8: bool = False  # LoRA/QLoRA: the frozen base's products in FP8 (e4m3, rowwise scales; GPUs >= sm 8.9)
    skip_memory_check: bool = False  # train although the memory estimate exceeds the GPU's memory

    # --- preference tuning (issue 13): TRL's meanings and defaults, Axolotl's key names ---------
    rl: Literal["dpo", "ipo", "orpo", "simpo", "kto", "grpo"] | None = None  # None: supervised fine-tuning
    rl_beta: float = Field(default=0.1, gt=0)  # DPO/IPO/KTO β; ORPO's λ; SimPO's β
    dpo_label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)  # conservative DPO (also SimPO)
    simpo_gamma: float = Field(default=0.5, ge=0)  # SimPO's target reward margin γ
    cpo_alpha: float = Field(default=1.0, ge=0)  # weight of the chosen answer's NLL term (ORPO, SimPO/CPO)
    kto_desirable_weight: float = Field(default=1.0, gt=0)
    kto_undesirable_weight: float = Field(default=1.0, gt=0)
    precompute_ref_log_probs: bool | None = None  # None: true for a full fine-tune of DPO/IPO/KTO, else false
    trl: TRLConfig | None = None  # rl: grpo's settings (issue 14); None with grpo: every default

    # --- multi-GPU: torchrun, one process per GPU (docs/multi-gpu.md) --------------------------
    fsdp: bool = False  # FSDP2: weights, gradients and optimizer state sharded over the GPUs (Axolotl's list form too)
    fsdp_cpu_offload: bool = False  # the shards (and the optimizer step) live in CPU memory
    fsdp_reshard_after_forward: bool = True  # free gathered layers after forward (False: keep them until backward)
    fsdp_version: Literal[1, 2] = 2  # Axolotl's key; magistune always runs FSDP2
    fsdp_config: dict[str, Any] | None = None  # Axolotl's FSDP settings, mapped onto the keys above
    ddp: bool = False  # DistributedDataParallel: a whole model on every GPU (small models, LoRA)
    ddp_timeout: int = Field(default=1800, ge=1)  # seconds a collective may wait for the other ranks
    sequence_parallel_degree: int = Field(default=1, ge=1)  # Ulysses: each row split over this many processes
    context_parallel_size: int | None = Field(default=None, ge=1)  # Axolotl's newer name for the same

    # --- evaluation, checkpoints, logging ------------------------------------------------------
    eval_steps: int | None = Field(default=None, ge=1)
    evals_per_epoch: int | None = Field(default=None, ge=1)
    save_steps: int | None = Field(default=None, ge=1)
    saves_per_epoch: int | None = Field(default=None, ge=1)
    save_total_limit: int | None = Field(default=None, ge=1)
    resume_from_checkpoint: str | None = None  # "auto" or a checkpoint path
    resume_ignore_config_changes: bool = False  # resume although data/model/adapter/schedule keys changed
    overwrite_output_dir: bool = False  # delete an earlier run's files in output_dir and start again
    logging_steps: int = Field(default=1, ge=1)
    output_dir: str = "./outputs"
    # --- Axolotl's loss watchdog (issue 19): stop when the loss stays above a threshold ---
    loss_watchdog_threshold: float | None = Field(default=None, gt=0)  # stop when the loss exceeds it …
    loss_watchdog_patience: int = Field(default=3, ge=1)  # … for this many optimizer steps in a row

    # Where the config file lives; relative paths resolve against it. Not a YAML key.
    config_dir: Path = Field(default=Path("."), exclude=True)

    @field_validator("max_grad_norm")
    @classmethod
    def _clip_positive(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:  # -1 / 0 "meaning off" hides a typo; off is spelled null
            raise ValueError(f"must be > 0, got {v:g}; null turns gradient clipping off")
        return v

    @field_validator("allow_image_paths_outside_dataset", mode="before")
    @classmethod
    def _bool_or_folders(cls, v: Any) -> Any:
        if isinstance(v, bool) or (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            return v
        raise ValueError(f"must be true, false or a list of folders (e.g. [images]), got {v!r}")

    @field_validator("lora_target_modules")
    @classmethod
    def _regex_compiles(cls, v: list[str] | str | None) -> list[str] | str | None:
        if isinstance(v, str):
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return v

    @model_validator(mode="before")
    @classmethod
    def _axolotl_fsdp(cls, data: Any) -> Any:
        return normalise_axolotl_fsdp(dict(data)) if isinstance(data, dict) else data

    @model_validator(mode="before")
    @classmethod
    def _context_parallel_size(cls, data: Any) -> Any:
        """Axolotl's newer name: context_parallel_size: N alone means sequence_parallel_degree: N."""
        if isinstance(data, dict) and isinstance(data.get("context_parallel_size"), int) \
                and "sequence_parallel_degree" not in data:
            data = {**data, "sequence_parallel_degree": data["context_parallel_size"]}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.adapter == "qlora" and not self.load_in_4bit:
            raise ValueError("adapter: qlora needs load_in_4bit: true")
        if self.load_in_4bit and self.adapter != "qlora":
            raise ValueError("load_in_4bit: true needs adapter: qlora (4-bit weights cannot be trained in full)")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are exclusive")
        if self.load_in_8bit:
            raise ValueError("load_in_8bit (bitsandbytes LLM.int8 base weights) is not implemented in magistune; the "
                             "nearest option is adapter: qlora with load_in_4bit: true (NF4 base weights, LoRA on top)")
        bad = sorted(set(self.special_tokens or {}) - {"bos_token", "eos_token", "pad_token", "unk_token"})
        if bad:
            raise ValueError(f"special_tokens: {bad[0]!r} is not one of bos_token, eos_token, pad_token, unk_token "
                             "(add other tokens with tokens:)")
        for key in ("train_on_inputs", "chat_template_kwargs"):  # Axolotl's top-level defaults for the datasets
            if getattr(self, key) is not None:
                for ds in self.datasets:
                    if key not in ds.model_fields_set:
                        setattr(ds, key, getattr(self, key))
        if self.fp16:
            raise ValueError("fp16 is not implemented in magistune: use bf16 (every GPU that runs Magistral has it)")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        if self.eval_steps is not None and self.evals_per_epoch is not None:
            raise ValueError("set eval_steps or evals_per_epoch, not both")
        if self.save_steps is not None and self.saves_per_epoch is not None:
            raise ValueError("set save_steps or saves_per_epoch, not both")
        if self.system_prompt is not None and self.system_prompt_file is not None:
            raise ValueError("set system_prompt or system_prompt_file, not both")
        if self.unfrozen_parameters and self.adapter:
            raise ValueError("unfrozen_parameters limits a full fine-tune; remove it or remove adapter")
        check_fsdp(self)
        if self.resume_from_checkpoint == "":
            self.resume_from_checkpoint = None
        if self.activation_offloading and not self.gradient_checkpointing:
            self.gradient_checkpointing = True  # what is offloaded are the checkpointed layer inputs
        if self.context_parallel_size not in (None, self.sequence_parallel_degree):
            raise ValueError(f"context_parallel_size ({self.context_parallel_size}) and sequence_parallel_degree "
                             f"({self.sequence_parallel_degree}) are the same setting; set one of them")
        if self.sequence_parallel_degree > 1 and self.rl is not None:
            raise ValueError(f"sequence_parallel_degree: not implemented with rl: {self.rl} (supervised "
                             "fine-tuning only)")
        check_preference(self)
        if self.rl == "grpo" and self.trl is None:
            self.trl = TRLConfig()  # rl: grpo with every default
        check_grpo(self)
        check_base_fp8(self)
        check_lora_kernels(self)
        return self

    # --- derived values ------------------------------------------------------------------------
    def resolve(self, path: str | None) -> Path | None:
        """A path from the config, relative to the config file's folder."""
        if path is None:
            return None
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.config_dir / p)

    @property
    def out_dir(self) -> Path:
        return self.resolve(self.output_dir)  # type: ignore[return-value]

    @property
    def prepared_dir(self) -> Path:
        if self.dataset_prepared_path:
            return self.resolve(self.dataset_prepared_path)  # type: ignore[return-value]
        return self.out_dir / "prepared"

    @property
    def use_cce(self) -> bool:
        return self.cut_cross_entropy or any("CutCrossEntropy" in p for p in self.plugins or [])


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def _check_keys(raw: dict[str, Any], model: type[BaseModel], where: str, notes: list[str]) -> list[str]:
    """Unknown, unsupported and no-op keys, before pydantic sees them. Returns error lines."""
    errors = []
    valid = [k for k in model.model_fields if k != "config_dir"]
    for key in list(raw):
        value = raw[key]
        empty = value is None or value is False or (isinstance(value, (str, list, dict)) and not value)
        if key in valid:
            _empty_means_default(raw, key, model, where, notes)
            continue
        if key in AXOLOTL_DEFAULT_VALUES:
            error = axolotl_default_value(key, value)
            if error:
                errors.append(f"{where}{key}: {error}")
            else:
                notes.append(f"{where}{key}: {value!r} accepted ({AXOLOTL_DEFAULT_VALUES[key]})")
                raw.pop(key)
        elif key in ACCEPTED_NOOP_KEYS or (key in UNSUPPORTED_AXOLOTL_KEYS and empty):
            notes.append(f"{where}{key}: ignored ({ACCEPTED_NOOP_KEYS.get(key, 'empty')})")
            raw.pop(key)
        elif key in UNSUPPORTED_AXOLOTL_KEYS:
            errors.append(f"{where}{key}: Axolotl's key is not implemented in magistune: {UNSUPPORTED_AXOLOTL_KEYS[key]}")
        else:
            errors.append(f"{where}{key}: unknown key{_closest(key, valid)}")
    return errors


def _empty_means_default(raw: dict[str, Any], key: str, model: type[BaseModel], where: str, notes: list[str]) -> None:
    """`key:` left empty, as Axolotl's examples do (`fp16:`, `gradient_checkpointing:`): the default, as in Axolotl.
    Only where null is not itself a value of the key; output_dir gets Axolotl's default ./model-out."""
    field = model.model_fields[key]
    if raw[key] is not None or field.is_required() or type(None) in typing.get_args(field.annotation):
        return
    if model is Config and key == "output_dir":
        raw[key] = "./model-out"
        notes.append("output_dir: empty: Axolotl's default ./model-out")
        return
    raw.pop(key)
    notes.append(f"{where}{key}: empty: as if unset (default {field.default!r})")


def parse_config(raw: dict[str, Any], source: str = "<config>", config_dir: Path | None = None) -> tuple[Config, list[str]]:
    """Validate a config dict. Returns the config and notes (ignored keys, features not active yet)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a YAML mapping of keys to values")
    raw = dict(raw)
    notes: list[str] = []
    errors = _check_keys(raw, Config, "", notes)
    datasets = raw.get("datasets")
    if isinstance(datasets, list):
        raw["datasets"] = datasets = [dict(d) if isinstance(d, dict) else d for d in datasets]
        for i, d in enumerate(datasets):
            if isinstance(d, dict):
                errors += _check_keys(d, DatasetConfig, f"datasets[{i}].", notes)
    if isinstance(raw.get("trl"), dict):
        raw["trl"] = dict(raw["trl"])
        errors += _check_keys(raw["trl"], TRLConfig, "trl.", notes)
    if errors:
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(errors))
    try:
        cfg = Config(**raw, config_dir=config_dir or Path("."))
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(config)"
            lines.append(f"{key}: {err['msg']}")
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(lines)) from None
    if raw.get("activation_offloading") and not raw.get("gradient_checkpointing"):
        notes.append("activation_offloading: turns gradient_checkpointing on (the checkpointed layer inputs are "
                     "what it offloads)")
    if cfg.loss_watchdog_threshold is not None and cfg.rl == "grpo":
        notes.append("loss_watchdog_threshold: not used with rl: grpo (its loss is a policy-gradient surrogate, not a "
                     "quantity that should stay low)")
    if cfg.fsdp_version == 1:
        notes.append("fsdp_version: 1: magistune runs FSDP2 (fully_shard); the FSDP1 settings are mapped onto it")
    return cfg, notes


def load_config(path: str | Path) -> tuple[Config, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_config(raw or {}, source=str(path), config_dir=path.resolve().parent)
