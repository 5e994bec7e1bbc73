"""Which weights to use after training, checked before any of them loads, then loaded for inference.

    magistune chat cfg.yaml               the run's output_dir: its adapter on the base model (4-bit again when
                                          the run was QLoRA), or the full model a full fine-tune saved there
    magistune chat cfg.yaml --adapter D   that adapter (a checkpoint-N/ folder works too) on the base model
    magistune chat cfg.yaml --base        the base model alone, as it was before training
    magistune chat --model D [--adapter A]  any model folder (a merged one, or tiny-random), no config needed

What output_dir holds decides, not the config's `adapter:` key: adapter_config.json there means an adapter,
config.json a full model. Every path, the model's config class, its weight files and the adapter's files are
checked first, so a typo fails in a second rather than after minutes of loading a 24B model.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from magistune.config import Config, ConfigError, parse_config
from magistune.hf_tokenizer import model_tokenizer_file, tokenizer_file_in
from magistune.tokenizer import SpecialIds


@dataclass(frozen=True)
class ModelSource:
    cfg: Config  # loading settings (precision, attention, 4-bit) and the system prompt
    model_dir: Path
    adapter_dir: Path | None
    tokenizer_file: Path
    load_in_4bit: bool

    def describe(self) -> str:
        base = f"{self.model_dir}" + (" (4-bit NF4, as trained)" if self.load_in_4bit else "")
        return base + (f" + adapter {self.adapter_dir}" if self.adapter_dir else "")


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object  # MistralTokenizer in test (inference) mode
    special: SpecialIds
    source: ModelSource
    device: torch.device
    dtype: torch.dtype

    def autocast(self):
        """The same autocast as training: bf16 where the weights are bf16, nothing in fp32."""
        from magistune.train.preflight import autocast_for

        return autocast_for(self.device, self.dtype)()


def bare_config(model: str, **keys) -> Config:
    """A config for `--model` without a YAML file: only the loading keys matter."""
    cfg, _ = parse_config({"base_model": model, "datasets": [{"path": "-"}], **keys}, source="--model")
    return cfg


def check_adapter_dir(path: Path, what: str = "--adapter") -> Path:
    """`path` holds a saved PEFT adapter; `what` names where the path came from in the error."""
    if not path.is_dir():
        raise ConfigError(f"{what}: {path}: folder not found")
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"{what}: {path}: no adapter_config.json; not a saved PEFT adapter")
    if not any(path.glob("adapter_model.*")):
        raise ConfigError(f"{what}: {path}: no adapter_model.safetensors (or .bin) next to adapter_config.json")
    return path


def resolve_source(cfg: Config | None, model: str | None = None, adapter: str | None = None,
                   base_only: bool = False) -> ModelSource:
    """Decide what to load (see the module docstring) and check it. Raises ConfigError (a ModelError is one)."""
    from magistune.model.load import check_model_dir
    from magistune.model_files import resolve_model_dir

    if cfg is None and model is None:
        raise ConfigError("give a config file, or --model DIR")
    adapter_dir = check_adapter_dir(Path(adapter).expanduser()) if adapter else None
    if model is not None:  # an explicit model folder: the config (if any) still gives precision and prompts
        cfg = cfg or bare_config(model)
        model_dir = resolve_model_dir(model, Path.cwd())
        four_bit = False
    else:
        assert cfg is not None
        model_dir = resolve_model_dir(cfg.base_model, cfg.config_dir)
        four_bit = cfg.load_in_4bit
        out = cfg.out_dir
        if adapter_dir is None and not base_only:
            if (out / "adapter_config.json").is_file():
                adapter_dir = check_adapter_dir(out, "output_dir")
            elif (out / "config.json").is_file():  # a full fine-tune saved the whole model there
                model_dir, four_bit = out, False
            else:
                raise ConfigError(
                    f"output_dir: {out} holds no trained model (no adapter_config.json or config.json): "
                    "train first, pass --adapter DIR (e.g. a checkpoint-N folder), or --base for the base model alone")
    check_model_dir(model_dir, trust_remote_code=cfg.trust_remote_code)
    if adapter_dir is not None:
        _note_other_base(adapter_dir, model_dir)
    # The trained folder's own tokenizer first: training copied the run's tokenizer there (with the config's
    # added_tokens_overrides / tokens applied), so the new names encode and decode as trained.
    use_mc = cfg.tokenizer_use_mistral_common
    trained = adapter_dir or (model_dir if model is None and not base_only else None)
    tok = tokenizer_file_in(trained, use_mc) if trained is not None else None
    if tok is None:
        tok = cfg.resolve(cfg.tokenizer_path) if cfg.tokenizer_path else model_tokenizer_file(model_dir, use_mc)
    if not tok.is_file():
        raise ConfigError(f"tokenizer_path: {tok} not found")
    # 4-bit only under a QLoRA adapter: the base alone (--base) loads as the config would load a full model.
    return ModelSource(cfg, model_dir, adapter_dir, tok, four_bit and adapter_dir is not None)


def _note_other_base(adapter_dir: Path, model_dir: Path) -> None:
    """A note (not an error: folders move) when the adapter was trained on a different base folder."""
    try:
        trained_on = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError):
        raise ConfigError(f"{adapter_dir / 'adapter_config.json'}: not valid JSON") from None
    if trained_on and Path(trained_on).is_dir() and Path(trained_on).resolve() != model_dir.resolve():
        print(f"note: the adapter was trained on {trained_on}; loading it on {model_dir}", file=sys.stderr)


def load_for_inference(source: ModelSource, device: torch.device | None = None) -> Loaded:
    """Load the model (+ adapter) in eval mode, and the tokenizer in inference mode."""
    from magistune.infer.prompts import load_chat_tokenizer
    from magistune.model import load_adapter, load_model, pick_device, resolve_dtype

    device = device or pick_device()
    tokenizer = load_chat_tokenizer(source.tokenizer_file)
    # The config's training-only keys must not change how a finished model loads: no freezing, and 4-bit
    # only for a QLoRA adapter on its own base.
    cfg = source.cfg.model_copy(update={"unfrozen_parameters": None, "load_in_4bit": source.load_in_4bit,
                                        "adapter": "qlora" if source.load_in_4bit else None,
                                        "tokenizer_path": str(source.tokenizer_file)})
    model, _ = load_model(cfg, source.model_dir, device, tokenizer=tokenizer)
    if source.adapter_dir is not None:
        model = load_adapter(model, source.adapter_dir, is_trainable=False)
    model.eval()
    return Loaded(model, tokenizer, SpecialIds.of(tokenizer), source, device, resolve_dtype(cfg, device))
