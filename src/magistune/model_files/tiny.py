"""`tiny-random` and `tiny-random-vision`: Magistral's shapes, shrunk, written as Hugging Face model folders.

The tiny models keep everything that matters for correctness from the real ones (the 131072-row Tekken
vocabulary, grouped-query attention, an explicit head_dim, untied embeddings, the Pixtral tower with
14-pixel patches and a 2x2 merge) and shrink every width and depth. `materialize_tiny` writes them to disk
as ordinary Hugging Face model folders, so they take exactly the same `from_pretrained` path as a 24B
checkpoint does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, MistralForCausalLM
from transformers import PixtralVisionConfig

from magistune.hf_tokenizer import copy_tokenizer_files, tiny_hf_tokenizer_path
from magistune.tokenizer import (TINY_NAMES, SpecialIds, default_cache_dir, load_tokenizer, tiny_tokenizer_path,
                                 write_tiny_tekken)

_FORMAT = 1  # bump when the way tiny models are written changes; the folder name carries it

# Magistral Small 2506/2507 (and the language model of 2509). Every Magistral uses the v13 Tekken
# vocabulary (2**17 = 131072 rows) and a rotary base of 1e9.
MAGISTRAL_VOCAB = 131072
MAGISTRAL_ROPE_THETA = 1e9


@functools.cache  # loading the 11 MB Tekken file takes a second
def tiny_special_ids() -> SpecialIds:
    """The special ids of the tiny Tekken file (it has the real v13 control-token ranks)."""
    return SpecialIds.of(load_tokenizer(tiny_tokenizer_path()))


def magistral_text_config(ids: SpecialIds, **shape) -> MistralConfig:
    """A MistralConfig with Magistral's vocabulary, rotary base, activation and untied embeddings, and `shape`."""
    return MistralConfig(
        vocab_size=MAGISTRAL_VOCAB,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": MAGISTRAL_ROPE_THETA},
        sliding_window=None,  # Magistral attends to the whole context
        tie_word_embeddings=False,
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
        pad_token_id=ids.pad,
        **shape,
    )


def tiny_text_config() -> MistralConfig:
    """A 2-layer Mistral with the real vocabulary.

    Parameters: embed_tokens and lm_head are 131072 x 64 = 8.39M each (untied, 16.8M together);
    a layer is q,o 64x64 + k,v 64x32 (12.3K) + gate,up,down 3 x 64x128 (24.6K) + 2 norms = 37.0K;
    2 layers + the final norm = 74K. Total 16.85M parameters, 99.6% of them in the two vocabulary matrices.
    """
    return magistral_text_config(
        tiny_special_ids(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,  # 4 heads x head_dim 16 = 64 = hidden_size, like 32 x 128 = 4096 in the real one
        num_key_value_heads=2,  # grouped-query attention: 2 query heads share a key/value head (4 in the real one)
        head_dim=16,
        max_position_embeddings=40960,
    )


def _tiny_vision_tower() -> PixtralVisionConfig:
    # A 1540-pixel image is 1540/14 = 110 patches a side; the 2x2 merge leaves 55 x 55 = 3025 image tokens.
    return PixtralVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 32 / 2 = 16
        image_size=1540,
        patch_size=14,
    )


def tiny_vision_config() -> Mistral3Config:
    """`tiny_text_config` with a tiny Pixtral tower in front, shaped like Magistral Small 2509."""
    ids = tiny_special_ids()
    if ids.img is None:
        raise ValueError("the tiny tokenizer has no [IMG] token")
    return Mistral3Config(
        vision_config=_tiny_vision_tower(),
        text_config=tiny_text_config(),
        image_token_index=ids.img,
        spatial_merge_size=2,
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,
        vision_feature_layer=-1,
        tie_word_embeddings=False,  # Mistral3Config defaults to True; Magistral's lm_head is its own matrix
    )


def tiny_config(name: str) -> MistralConfig | Mistral3Config:
    if name in ("tiny-random", "tiny-random-hf"):  # -hf: the same model, Hugging Face tokenizer files
        return tiny_text_config()
    if name == "tiny-random-vision":
        return tiny_vision_config()
    raise ValueError(f"unknown tiny model '{name}'; expected one of {', '.join(TINY_NAMES)}")


def _fingerprint(config) -> str:
    """A short hash of what the folder depends on: the config (special ids included) and the writer's format."""
    fields = {k: v for k, v in config.to_dict().items() if k != "transformers_version"}
    blob = json.dumps({"config": fields, "format": _FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def materialize_tiny(name: str, root: Path | None = None) -> Path:
    """Write `tiny-random` or `tiny-random-vision` as a Hugging Face model folder (once) and return it.

    The folder is <root>/<name>/<fingerprint>/ with config.json, model.safetensors and tekken.json (for
    `tiny-random-hf`: tokenizer.json, tokenizer_config.json and chat_template.jinja instead, hf_tokenizer.py).
    Weights are stored in bf16, like the real checkpoints: 16.85M params x 2 bytes = 33.7 MB (the vision
    model adds 39.5K tower + 10.3K projector params: 33.8 MB). Loading them as fp32 is exact: every bf16
    value is an fp32 value.
    """
    config = tiny_config(name)
    root = Path(root) if root is not None else default_cache_dir()
    tokenizer = tiny_hf_tokenizer_path() if name == "tiny-random-hf" else None
    tag = _fingerprint(config) + (f"-{tokenizer.parent.name}" if tokenizer else "")  # the template's hash
    target = root / name / tag
    if not (target / "config.json").is_file():
        write_model_dir(config, target, hf_tokenizer=tokenizer)
    return target


def write_model_dir(config: MistralConfig | Mistral3Config, target: Path, hf_tokenizer: Path | None = None) -> bool:
    """Build a seeded random model for `config` and move it into `target`. True if this call's folder won.

    Writers race safely: each builds its own temporary folder next to the target and renames it into place;
    rename(2) onto an existing, non-empty folder fails, so the first writer wins and the others keep its folder.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        cls = Mistral3ForConditionalGeneration if isinstance(config, Mistral3Config) else MistralForCausalLM
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):  # leaves the caller's RNG alone
            torch.manual_seed(0)  # the same weights on every run
            model = cls(config)
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        if hf_tokenizer is None:
            write_tiny_tekken(tmp / "tekken.json")
        else:  # tokenizer.json, tokenizer_config.json, chat_template.jinja: no mistral-common file
            copy_tokenizer_files(hf_tokenizer, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        try:
            os.rename(tmp, target)
            return True
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race: a real failure
                raise
            return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
