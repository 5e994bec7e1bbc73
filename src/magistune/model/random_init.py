"""A random-weight model straight from a config, for benchmarks on real shapes with no checkpoint on disk.

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
from transformers import PretrainedConfig

from magistune.config import Config
from magistune.model.load import ModelInfo, model_info, resolve_attn, resolve_dtype
from magistune.model.parts import model_class, outside_decoder


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
