"""The config's nested sections: a dataset entry (`datasets:` / `test_datasets:`) and the `trl:` block.

Split from config.py (the top-level schema) to keep each file readable; config.py re-exports both classes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetConfig(_Strict):
    """One entry of `datasets:`."""

    path: str
    type: Literal["chat_template", "mistral", "messages", "sharegpt"] = "chat_template"  # sharegpt: an alias (below)
    split: str = "train"
    name: str | None = None  # HF dataset config name
    data_files: str | list[str] | None = None
    field_messages: str = "messages"
    field_tools: str = "tools"
    max_samples: int | None = Field(default=None, ge=1)  # cap, applied after shuffling with `seed`
    mix_weight: float = Field(default=1.0, gt=0)  # 2.0 repeats the dataset twice, 0.5 keeps half
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    train_thinking: bool = True
    train_on_inputs: bool = False
    excess_length_strategy: Literal["drop", "truncate"] | None = None  # None: the top-level value
    system_prompt: str | None = None
    # --- Axolotl's chat_template dataset options (issue 19; docs/from-axolotl.md) ---
    message_property_mappings: dict[str, str] | None = None  # our message key → the record's key, e.g. role: from
    roles: dict[str, list[str]] | None = None  # our role → the record's role names; None: Axolotl's defaults
    message_field_training: str | None = None  # a message key holding true/false: train that assistant message
    roles_to_train: list[str] = ["assistant"]  # [] trains only messages flagged by message_field_training
    train_on_eos: Literal["turn", "last", "all", "none"] = "turn"  # which assistant </s> tokens are trained
    field_thinking: str = "reasoning_content"  # the message key holding the reasoning trace
    drop_system_message: bool = False  # drop a leading system message (the system_prompt option still applies)
    ds_type: Literal["json", "jsonl", "parquet"] | None = None  # the file's format when its suffix does not say
    shards: int | None = Field(default=None, ge=1)  # keep one of `shards` contiguous pieces of the records …
    shards_idx: int = Field(default=0, ge=0)  # … this one (datasets.Dataset.shard's meaning)
    chat_template_kwargs: dict[str, Any] | None = None  # {reasoning_effort: …}: mistral-common's model setting (v15)

    @model_validator(mode="before")
    @classmethod
    def _sharegpt(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") == "sharegpt":  # Axolotl's old type, read as chat_template
            data = {"field_messages": "conversations", "message_property_mappings": {"role": "from", "content": "value"},
                    **{k: v for k, v in data.items() if v is not None}}
        return data

    @model_validator(mode="after")
    def _axolotl_options(self) -> "DatasetConfig":
        wrong = [r for r in self.roles_to_train if r != "assistant"]
        if wrong:
            raise ValueError(f"roles_to_train: {wrong[0]!r} cannot be trained: mistral-common's fine-tuning format "
                             "trains assistant messages only (FinetuningAssistantMessage carries the weight; "
                             f"{wrong[0]} messages are the prompt); use [assistant] or []")
        unknown = sorted(set(self.chat_template_kwargs or {}) - {"reasoning_effort"})
        if unknown:
            raise ValueError(f"chat_template_kwargs: {unknown[0]!r} cannot apply: mistral-common has no chat template; "
                             "its only request setting is reasoning_effort (tokenizers v15 on)")
        if self.shards is not None and self.shards_idx >= self.shards:
            raise ValueError(f"shards_idx: {self.shards_idx} must be below shards ({self.shards})")
        if self.train_on_inputs and self.train_on_eos != "turn":
            raise ValueError("train_on_eos: train_on_inputs trains every token, every </s> included")
        return self


class TRLConfig(_Strict):
    """`trl:` (with `rl: grpo`): TRL's GRPOConfig key names and meanings; loss_type `magistral` (the default) is
    the Magistral paper's recipe (train/grpo_loss.py)."""

    num_generations: int = Field(default=8, ge=2)  # G completions per prompt
    max_completion_length: int = Field(default=1024, ge=1)  # new tokens per completion, thinking and </s> included
    temperature: float = Field(default=0.7, gt=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    num_iterations: int = Field(default=1, ge=1)  # μ: optimizer steps on each batch of rollouts
    epsilon: float = Field(default=0.2, gt=0, lt=1)  # ratio clipped below at 1 − ε
    epsilon_high: float | None = 0.28  # … and above at 1 + ε_high (clip-higher); None: ε
    beta: float = Field(default=0.0, ge=0)  # KL weight; 0: no reference model
    loss_type: Literal["magistral", "grpo", "dr_grpo", "dapo"] = "magistral"
    scale_rewards: Literal["group", "batch", "none"] | bool | None = None  # None: "group" (not with magistral)
    mask_truncated_completions: bool = False  # completions without </s> are not trained
    reward_funcs: list[str] = Field(default_factory=lambda: ["magistral_format", "boxed_math"], min_length=1)
    reward_weights: list[float] | None = None  # None: 1 each
    overlong_cache: int | None = Field(default=None, ge=1)  # overlong_penalty's L_cache (None: max_completion_length // 5)

    @model_validator(mode="after")
    def _consistent(self) -> "TRLConfig":
        if self.epsilon_high is not None and self.epsilon_high < self.epsilon:
            raise ValueError(f"epsilon_high ({self.epsilon_high}) must be >= epsilon ({self.epsilon})")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} "
                             "reward_funcs")
        if self.loss_type == "magistral" and self.scale_rewards is not None:
            raise ValueError("scale_rewards: loss_type magistral normalises the advantages over the minibatch itself; "
                             "remove scale_rewards (or pick loss_type grpo, dr_grpo or dapo)")
        if self.loss_type == "magistral" and self.beta > 0:
            raise ValueError("beta: loss_type magistral has no KL term (beta: 0); pick loss_type grpo, dr_grpo or "
                             "dapo for a KL penalty")
        return self

    @property
    def reward_scaling(self) -> str:
        """"group", "batch" or "none" (TRL's True/False spelled out); magistral: "minibatch"."""
        if self.loss_type == "magistral":
            return "minibatch"
        if self.scale_rewards is None or self.scale_rewards is True:
            return "group"
        return "none" if self.scale_rewards is False else self.scale_rewards
