"""The YAML config: Axolotl's keys, helpful errors, notes for what is accepted but not active."""

import textwrap
from pathlib import Path

import pytest

from magistune.config import ConfigError, load_config, parse_config

MINIMAL = {"base_model": "tiny-random", "datasets": [{"path": "data.jsonl"}]}

# Axolotl's examples/magistral/magistral-small-qlora.yaml, unchanged.
AXOLOTL_QLORA = """\
base_model: mistralai/Magistral-Small-2506

# Enable to use mistral-common tokenizer
tokenizer_use_mistral_common: true

# Automatically upload checkpoint and final model to HF
# hub_model_id: username/custom_model_name

load_in_8bit: false
load_in_4bit: true

datasets:
  - path: fozziethebeat/alpaca_messages_2k_test
    type: chat_template

dataset_prepared_path: last_run_prepared
val_set_size: 0.1
output_dir: ./outputs/lora-out

adapter: qlora
lora_model_dir:

sequence_len: 2048
sample_packing: true
pad_to_sequence_len: true

lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
lora_target_modules:
  - gate_proj
  - down_proj
  - up_proj
  - q_proj
  - v_proj
  - k_proj
  - o_proj

wandb_project:
wandb_entity:
wandb_watch:
wandb_name:
wandb_log_model:

gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 1
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 0.0002

bf16: auto
tf32: false

gradient_checkpointing: true
resume_from_checkpoint:
logging_steps: 1
flash_attention: true

warmup_ratio: 0.1
evals_per_epoch: 1
saves_per_epoch: 1

# save_first_step: true  # uncomment this to validate checkpoint saving works with your config
"""

# Axolotl's examples/magistral/think/magistral-small-think-qlora.yaml, unchanged.
AXOLOTL_THINK = """\
base_model: mistralai/Magistral-Small-2507

# Enable to use mistral-common tokenizer
tokenizer_use_mistral_common: true

# Automatically upload checkpoint and final model to HF
# hub_model_id: username/custom_model_name

plugins:
  - axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin

load_in_8bit: false
load_in_4bit: true

datasets:
  - path: Nanobit/text-think-2k-test
    type: chat_template

dataset_prepared_path: last_run_prepared
val_set_size: 0
output_dir: ./outputs/lora-out

adapter: qlora
lora_model_dir:

sequence_len: 2048
sample_packing: true

lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
lora_target_modules:
  - gate_proj
  - down_proj
  - up_proj
  - q_proj
  - v_proj
  - k_proj
  - o_proj

wandb_project:
wandb_entity:
wandb_watch:
wandb_name:
wandb_log_model:

gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 1
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 0.0002

bf16: auto
tf32: false

gradient_checkpointing: true
resume_from_checkpoint:
logging_steps: 1
attn_implementation: flash_attention_2

warmup_ratio: 0.1
evals_per_epoch: 1
saves_per_epoch: 1

# save_first_step: true  # uncomment this to validate checkpoint saving works with your config
"""


def _load(tmp_path: Path, text: str):
    path = tmp_path / "config.yml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_config(path)


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text)
    return str(e.value)


def test_axolotl_magistral_qlora_example(tmp_path):
    cfg, notes = _load(tmp_path, AXOLOTL_QLORA)
    assert cfg.base_model == "mistralai/Magistral-Small-2506"
    assert cfg.adapter == "qlora" and cfg.load_in_4bit and not cfg.load_in_8bit
    assert [(d.path, d.type) for d in cfg.datasets] == [("fozziethebeat/alpaca_messages_2k_test", "chat_template")]
    assert cfg.val_set_size == 0.1 and cfg.sequence_len == 2048
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (32, 16, 0.05)
    assert cfg.lora_target_modules == ["gate_proj", "down_proj", "up_proj", "q_proj", "v_proj", "k_proj", "o_proj"]
    assert cfg.lora_model_dir is None and cfg.resume_from_checkpoint is None
    assert (cfg.micro_batch_size, cfg.gradient_accumulation_steps, cfg.num_epochs) == (2, 4, 1)
    assert cfg.optimizer == "adamw_bnb_8bit" and cfg.learning_rate == 0.0002 and cfg.bf16 == "auto"
    assert cfg.flash_attention and cfg.warmup_ratio == 0.1
    assert cfg.evals_per_epoch == 1 and cfg.saves_per_epoch == 1
    # paths resolve against the config file's folder
    assert cfg.prepared_dir == tmp_path / "last_run_prepared"
    assert cfg.out_dir == tmp_path / "outputs" / "lora-out"
    # packing is active (no "not active yet" note); empty wandb keys are ignored with a note
    assert cfg.sample_packing and not any("not active yet" in n for n in notes), notes
    for key in ("wandb_project", "wandb_entity", "wandb_watch", "wandb_name", "wandb_log_model"):
        assert any(n.startswith(f"{key}: ignored") for n in notes), notes


def test_axolotl_magistral_think_example(tmp_path):
    cfg, notes = _load(tmp_path, AXOLOTL_THINK)
    assert cfg.base_model == "mistralai/Magistral-Small-2507"
    assert cfg.attn_implementation == "flash_attention_2"
    assert cfg.val_set_size == 0
    assert cfg.use_cce and not cfg.cut_cross_entropy  # the plugin line alone turns CCE on
    assert cfg.sample_packing and not any("not active yet" in n for n in notes), notes


def test_minimal_config_defaults(tmp_path):
    cfg, notes = parse_config(dict(MINIMAL), config_dir=tmp_path)
    assert notes == []
    assert cfg.datasets[0].type == "chat_template" and cfg.datasets[0].split == "train"
    assert cfg.on_bad_record == "error" and cfg.excess_length_strategy == "drop"
    assert cfg.prepared_dir == tmp_path / "outputs" / "prepared"


@pytest.mark.parametrize("key,suggestion", [
    ("learning_rat", "learning_rate"),
    ("sequence_length", "sequence_len"),
    ("micro_batchsize", "micro_batch_size"),
])
def test_unknown_top_level_key_suggests(tmp_path, key, suggestion):
    msg = _error(tmp_path, f"""\
        base_model: tiny-random
        datasets: [{{path: data.jsonl}}]
        {key}: 1
        """)
    assert f"{key}: unknown key; did you mean '{suggestion}'?" in msg
    assert str(tmp_path / "config.yml") in msg


def test_unknown_key_without_a_close_match(tmp_path):
    msg = _error(tmp_path, "base_model: tiny-random\ndatasets: [{path: data.jsonl}]\nzzqx: 1\n")
    assert "zzqx: unknown key" in msg and "did you mean" not in msg


def test_unknown_dataset_key_suggests(tmp_path):
    msg = _error(tmp_path, """\
        base_model: tiny-random
        datasets:
          - path: a.jsonl
          - path: b.jsonl
            field_message: conversations
        """)
    assert "datasets[1].field_message: unknown key; did you mean 'field_messages'?" in msg
    assert "datasets[0]" not in msg


def test_every_error_is_listed(tmp_path):
    msg = _error(tmp_path, """\
        base_model: tiny-random
        datasets: [{path: a.jsonl, splt: test}]
        learning_rat: 1
        deepspeed: ds.json
        """)
    assert "datasets[0].splt" in msg and "learning_rat" in msg and "deepspeed" in msg


@pytest.mark.parametrize("line,key", [
    ("deepspeed: deepspeed_configs/zero2.json", "deepspeed"),
    ("wandb_project: foo", "wandb_project"),
    ("hub_model_id: me/my-model", "hub_model_id"),
    ("chat_template_jinja: abc", "chat_template_jinja"),
    ("torch_compile: true", "torch_compile"),
    ("reward_model: foo", "reward_model"),
])
def test_unimplemented_axolotl_key_with_a_value(tmp_path, line, key):
    msg = _error(tmp_path, f"base_model: tiny-random\ndatasets: [{{path: data.jsonl}}]\n{line}\n")
    assert f"{key}: Axolotl's key is not implemented in magistune" in msg


@pytest.mark.parametrize("line", ["deepspeed:", "wandb_project:", "wandb_project: ''", "torch_compile: false", "hub_model_id: null"])
def test_unimplemented_axolotl_key_empty_is_accepted(tmp_path, line):
    cfg, notes = _load(tmp_path, f"base_model: tiny-random\ndatasets: [{{path: data.jsonl}}]\n{line}\n")
    key = line.split(":")[0]
    assert any(n.startswith(f"{key}: ignored") for n in notes), notes


def test_noop_keys_are_accepted_with_a_note(tmp_path):
    cfg, notes = _load(tmp_path, "base_model: tiny-random\ndatasets: [{path: data.jsonl}]\nstrict: false\n"
                                 "save_safetensors: true\n")
    assert any(n.startswith("strict: ignored") for n in notes)
    assert any(n.startswith("save_safetensors: ignored") for n in notes)


def test_cut_cross_entropy_key_is_active(tmp_path):
    cfg, notes = _load(tmp_path, "base_model: tiny-random\ndatasets: [{path: data.jsonl}]\ncut_cross_entropy: true\n")
    assert cfg.use_cce and notes == []


def test_activation_offloading_turns_checkpointing_on(tmp_path):
    cfg, notes = _load(tmp_path, "base_model: tiny-random\ndatasets: [{path: data.jsonl}]\nactivation_offloading: true\n")
    assert cfg.activation_offloading and cfg.gradient_checkpointing
    assert any(n.startswith("activation_offloading: turns gradient_checkpointing on") for n in notes), notes
    cfg, notes = _load(tmp_path, "base_model: tiny-random\ndatasets: [{path: data.jsonl}]\nactivation_offloading: true\n"
                                 "gradient_checkpointing: true\n")
    assert cfg.gradient_checkpointing and notes == []


@pytest.mark.parametrize("line,key", [
    ("lora_r: 0", "lora_r"),
    ("optimizer: sgd", "optimizer"),
    ("lora_target_modules: '(q_proj|v_proj'", "lora_target_modules"),
    ("lora_dropout: 1.5", "lora_dropout"),
    ("sequence_len: 8", "sequence_len"),
    ("learning_rate: -1", "learning_rate"),
    ("on_bad_record: ignore", "on_bad_record"),
    ("excess_length_strategy: wrap", "excess_length_strategy"),
    ("val_set_size: -0.1", "val_set_size"),
    ("micro_batch_size: two", "micro_batch_size"),
    ("max_grad_norm: -1", "max_grad_norm"),
    ("max_grad_norm: 0", "max_grad_norm"),
    ("max_image_pixels: 0", "max_image_pixels"),
    ("max_image_pixels: 200000000", "max_image_pixels"),
    ("allow_image_paths_outside_dataset: /data/images", "allow_image_paths_outside_dataset"),
])
def test_bad_values_name_the_key(tmp_path, line, key):
    msg = _error(tmp_path, f"base_model: tiny-random\ndatasets: [{{path: data.jsonl}}]\n{line}\n")
    assert f"\n  {key}: " in msg, msg


def test_bad_regex_says_so(tmp_path):
    msg = _error(tmp_path, "base_model: tiny-random\ndatasets: [{path: data.jsonl}]\nlora_target_modules: '(q_proj'\n")
    assert "lora_target_modules: Value error, not a valid regular expression" in msg


def test_bad_dataset_value_names_the_entry(tmp_path):
    msg = _error(tmp_path, "base_model: tiny-random\ndatasets: [{path: a.jsonl}, {path: b.jsonl, train_on: everything}]\n")
    assert "datasets.1.train_on: " in msg
    msg = _error(tmp_path, "base_model: tiny-random\ndatasets: [{type: chat_template}]\n")
    assert "datasets.0.path: Field required" in msg


@pytest.mark.parametrize("text,needle", [
    ("datasets: [{path: a.jsonl}]\n", "base_model: Field required"),
    ("base_model: tiny-random\n", "datasets: Field required"),
    ("base_model: tiny-random\ndatasets: []\n", "datasets: List should have at least 1 item"),
    ("base_model: tiny-random\ndatasets: [{path: a.jsonl}]\nadapter: qlora\n", "adapter: qlora needs load_in_4bit: true"),
    ("base_model: tiny-random\ndatasets: [{path: a.jsonl}]\nload_in_8bit: true\n", "load_in_8bit (bitsandbytes LLM.int8 base weights) is not implemented"),
    ("base_model: tiny-random\ndatasets: [{path: a.jsonl}]\nwarmup_steps: 10\nwarmup_ratio: 0.1\n",
     "set warmup_steps or warmup_ratio, not both"),
    ("base_model: tiny-random\ndatasets: [{path: a.jsonl}]\nsystem_prompt: a\nsystem_prompt_file: b.txt\n",
     "set system_prompt or system_prompt_file, not both"),
])
def test_missing_and_inconsistent_keys(tmp_path, text, needle):
    assert needle in _error(tmp_path, text)


def test_invalid_yaml(tmp_path):
    msg = _error(tmp_path, "base_model: tiny-random\ndatasets: [{path: a.jsonl}\n  bad: : :\n")
    assert msg.startswith(f"{tmp_path / 'config.yml'}: not valid YAML")


def test_yaml_that_is_not_a_mapping(tmp_path):
    assert "must be a YAML mapping" in _error(tmp_path, "- base_model: tiny-random\n")


def test_empty_file(tmp_path):
    msg = _error(tmp_path, "")
    assert "base_model: Field required" in msg and "datasets: Field required" in msg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_zero_is_not_an_empty_value_for_unsupported_keys():
    import pytest as _pytest
    from magistune.config import ConfigError, parse_config

    with _pytest.raises(ConfigError, match="deepspeed"):
        parse_config({"base_model": "tiny-random", "datasets": [{"path": "d.jsonl"}], "deepspeed": 0})


def test_every_config_key_is_documented():
    """docs/config.md documents every key of the schema (top level and datasets[])."""
    from pathlib import Path

    from magistune.config import Config, DatasetConfig, TRLConfig

    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    keys = [k for k in Config.model_fields if k != "config_dir"] + list(DatasetConfig.model_fields)
    keys += list(TRLConfig.model_fields)
    missing = [k for k in keys if f"`{k}`" not in doc]
    assert not missing, f"undocumented config keys: {missing}"


def test_max_grad_norm_off_is_null(tmp_path):
    msg = _error(tmp_path, "base_model: tiny-random\ndatasets: [{path: data.jsonl}]\nmax_grad_norm: -1\n")
    assert "max_grad_norm: Value error, must be > 0, got -1; null turns gradient clipping off" in msg
    cfg, _ = _load(tmp_path, "base_model: tiny-random\ndatasets: [{path: data.jsonl}]\nmax_grad_norm: null\n")
    assert cfg.max_grad_norm is None


def test_image_path_keys(tmp_path):
    cfg, _ = _load(tmp_path, "base_model: tiny-random\ndatasets: [{path: data.jsonl}]\n")
    assert cfg.max_image_pixels == 50_000_000 and cfg.allow_image_paths_outside_dataset is False
    cfg, _ = _load(tmp_path, "base_model: tiny-random\ndatasets: [{path: data.jsonl}]\n"
                             "allow_image_paths_outside_dataset: [../images, /srv/pictures]\n")
    assert cfg.allow_image_paths_outside_dataset == ["../images", "/srv/pictures"]


# --- preference tuning (rl) -------------------------------------------------------------------------------------

BASE = "base_model: tiny-random\ndatasets: [{path: data.jsonl}]\n"


def test_rl_keys_and_defaults(tmp_path):
    cfg = _load(tmp_path, BASE + "rl: dpo\n")[0]
    assert (cfg.rl, cfg.rl_beta, cfg.dpo_label_smoothing, cfg.simpo_gamma, cfg.cpo_alpha) == ("dpo", 0.1, 0.0, 0.5, 1.0)
    assert (cfg.kto_desirable_weight, cfg.kto_undesirable_weight) == (1.0, 1.0)
    assert cfg.precompute_ref_log_probs is True  # full fine-tune: no second copy of the model
    assert _load(tmp_path, BASE + "rl: kto\nadapter: lora\n")[0].precompute_ref_log_probs is False  # adapter off = ref
    assert _load(tmp_path, BASE + "rl: orpo\n")[0].precompute_ref_log_probs is False  # no reference model
    assert _load(tmp_path, BASE)[0].rl is None
    cfg = _load(tmp_path, BASE + "rl: simpo\nrl_beta: 2.0\nsimpo_gamma: 1.0\ncpo_alpha: 0\n")[0]
    assert (cfg.rl_beta, cfg.simpo_gamma, cfg.cpo_alpha) == (2.0, 1.0, 0.0)


@pytest.mark.parametrize("text,needle", [
    ("rl: ppo\n", "rl: Input should be 'dpo', 'ipo', 'orpo', 'simpo', 'kto' or 'grpo'"),
    ("rl: dpo\nrl_beta: 0\n", "rl_beta: Input should be greater than 0"),
    ("rl: dpo\ndpo_label_smoothing: 0.5\n", "dpo_label_smoothing: Input should be less than 0.5"),
    ("rl: orpo\nprecompute_ref_log_probs: true\n", "rl: orpo uses no reference model"),
    ("rl: dpo\ndatasets: [{path: d.jsonl, type: messages}]\n", "datasets[0].type: messages is the SFT messages format"),
    ("rl: dpo\ndatasets: [{path: d.jsonl, train_on_inputs: true}]\n", "datasets[0].train_on_inputs: not used with rl: dpo"),
    ("rl: dpo\nsample_packing: true\n", "sample_packing: not supported with rl yet"),
    ("rl: orpo\nactivation_offloading: true\n", "activation_offloading: not supported with rl yet"),
    ("rl: kto\nprecompute_ref_log_probs: false\n", "a full fine-tune with rl: kto has no other reference"),
])
def test_rl_errors(tmp_path, text, needle):
    base = "base_model: tiny-random\n" + ("" if "datasets" in text else "datasets: [{path: data.jsonl}]\n")
    assert needle in _error(tmp_path, base + text)


# --- RL with verifiable rewards (rl: grpo, trl:) -----------------------------------------------------------------

def test_grpo_defaults_are_magistrals_recipe(tmp_path):
    trl = _load(tmp_path, BASE + "rl: grpo\n")[0].trl
    assert (trl.num_generations, trl.max_completion_length, trl.temperature, trl.top_p) == (8, 1024, 0.7, 0.95)
    assert (trl.num_iterations, trl.epsilon, trl.epsilon_high, trl.beta) == (1, 0.2, 0.28, 0.0)
    assert (trl.loss_type, trl.reward_scaling, trl.mask_truncated_completions) == ("magistral", "minibatch", False)
    trl = _load(tmp_path, BASE + "rl: grpo\ntrl: {loss_type: dr_grpo, scale_rewards: false}\n")[0].trl
    assert trl.reward_scaling == "none"
    assert _load(tmp_path, BASE + "rl: grpo\ntrl: {loss_type: grpo}\n")[0].trl.reward_scaling == "group"


@pytest.mark.parametrize("text,needle", [
    ("rl: grpo\ntrl: {num_generatons: 4}\n", "trl.num_generatons: unknown key; did you mean 'num_generations'?"),
    ("trl: {temperature: 1.0}\n", "trl: holds GRPO's settings; set rl: grpo"),
    ("rl: grpo\ntrl: {scale_rewards: group}\n", "loss_type magistral normalises the advantages"),
    ("rl: grpo\ntrl: {loss_type: grpo, beta: 0.1}\n", "trl.beta > 0 needs adapter: lora or qlora"),
    ("rl: grpo\ntrl: {epsilon_high: 0.1}\n", "epsilon_high (0.1) must be >= epsilon (0.2)"),
    ("rl: grpo\ntrl: {num_generations: 1}\n", "trl.num_generations: Input should be greater than or equal to 2"),
    ("rl: grpo\ntrl: {reward_funcs: [a.b, c.d], reward_weights: [1]}\n", "reward_weights has 1 values for 2"),
    ("rl: grpo\ntrl: {loss_type: ppo}\n", "trl.loss_type: Input should be 'magistral', 'grpo', 'dr_grpo' or 'dapo'"),
    ("rl: grpo\nactivation_offloading: true\n", "activation_offloading: not applied with rl: grpo (its checkpointed "
                                                "layer inputs stay on the GPU); remove it"),
])
def test_grpo_errors(tmp_path, text, needle):
    assert needle in _error(tmp_path, BASE + text)
