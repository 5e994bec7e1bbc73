"""Benchmarks only: Magistral Small's real shapes, and a random-weight model built straight from a config.

The benchmark scripts import it as `random_model` (python puts bench/ on the path when they run); the tests
in tests/bench add bench/ to the path.

load_model() is the path for real checkpoints (from_pretrained + BitsAndBytesConfig). Writing 47 GB of random
bf16 weights to disk only to read them back would cost minutes per benchmark, so this builds the model on the
device in bf16 and, for QLoRA, swaps each decoder nn.Linear for a bitsandbytes Linear4bit quantised from its
own weights: the same NF4 + double quantisation + skip list that load_model() configures, layer by layer, so
the bf16 copy of one linear (at most 32768 × 5120 × 2 B = 335 MB) is freed before the next is quantised.
Peak while building Magistral Small: 47.1 GB of bf16 weights; after quantisation 14.2 GB stay.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig, PretrainedConfig

from magistune.config import Config
from magistune.model.load import ModelInfo, model_info, resolve_attn, resolve_dtype
from magistune.model.parts import model_class, outside_decoder
from magistune.model_files.tiny import magistral_text_config, tiny_special_ids


def magistral_small_config() -> MistralConfig:
    """Magistral Small 2506's language model: 40 layers, 5120 wide, 23.6B parameters.

    embed + lm_head: 2 x 131072 x 5120 = 1.34B. A layer: q,o 5120x4096 (21.0M each), k,v 5120x1024 (5.2M
    each), gate,up,down 3 x 5120x32768 (503M) = 555.7M; 40 of them = 22.2B. Total 23.57B = 47.1 GB in bf16.
    """
    return magistral_text_config(
        tiny_special_ids(),  # the tiny Tekken file has the real v13 control-token ranks
        hidden_size=5120,
        intermediate_size=32768,
        num_hidden_layers=40,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,  # 32 x 128 = 4096 != 5120: q_proj maps 5120 -> 4096, o_proj maps it back
        max_position_embeddings=40960,
    )


def magistral_small_vision_config(num_layers: int | None = None) -> Mistral3Config:
    """Magistral Small 2509: Pixtral (24 layers, 1024 wide, 0.4B) + projector + the 2506 language model.

    num_layers cuts the language model (e.g. 4 for a one-GPU benchmark that keeps the real widths).
    """
    text = magistral_small_config()
    text.max_position_embeddings = 131072
    if num_layers is not None:
        text.num_hidden_layers = num_layers
    vision = PixtralVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,  # head_dim 1024 / 16 = 64
        image_size=1540,
        patch_size=14,
    )
    return Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=tiny_special_ids().img,
        spatial_merge_size=2,
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def _quantise_linear(linear: nn.Linear, compute_dtype: torch.dtype, quant_storage: torch.dtype = torch.uint8) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                          quant_storage=quant_storage, device=linear.weight.device)
    q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                 quant_type="nf4", quant_storage=quant_storage,
                                 module=q).to(linear.weight.device)  # .to() quantises on CUDA and CPU
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return q


def random_model(config: PretrainedConfig, cfg: Config, device: torch.device, seed: int = 0) -> tuple[nn.Module, ModelInfo]:
    """The model `config` describes with random weights on `device`, quantised to NF4 when cfg.load_in_4bit
    (packed into tensors of the compute dtype with cfg.fsdp, as load_model does: FSDP2 shards them like bf16)."""
    device = torch.device(device)
    dtype = resolve_dtype(cfg, device)
    config._attn_implementation = resolve_attn(cfg, device, training=True)  # benchmarks train
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class(config)._from_config(config, dtype=dtype)
    if cfg.load_in_4bit:
        skip = tuple(outside_decoder(model))
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and not any(name == s or name.startswith(s + ".") for s in skip):
                parent_name, _, child = name.rpartition(".")
                storage = dtype if cfg.fsdp else torch.uint8
                setattr(model.get_submodule(parent_name), child, _quantise_linear(module, dtype, storage))
                del module
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model.is_loaded_in_4bit = True  # what from_pretrained sets; PEFT reads it
    return model, model_info(model)
