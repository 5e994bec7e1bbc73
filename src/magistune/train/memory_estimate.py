"""The peak GPU memory a training config will need, from the model's config.json alone (no weight is read).

    peak = weights + trained parameters' (values + gradients + optimizer state) + activations

Weights. QLoRA: every linear layer of the decoder in NF4, 0.5 byte a weight + 1/64 byte of absmax per 64-weight
block (bitsandbytes' double quantisation) = 0.516 B; embed_tokens, lm_head and the norms stay bf16 (2 B).
Otherwise 2 B (bf16) or 4 B (fp32) a weight. Magistral Small: 22.2B linear weights × 0.516 + 1.34B × 2 = 13.2 GiB.

Trained parameters. LoRA matrices are fp32: r × (in + out) each, 4 B value + 4 B gradient + the optimizer's state
(AdamW: 2 moments in the parameter's dtype, 8 B; the 8-bit AdamWs: 2 B). r=32 on all 7 projections of
Magistral Small: 185M × 10 B (8-bit) = 1.7 GiB. A full fine-tune: every weight's gradient and moments, in the
model's dtype (bf16: 2 + 4 B). FSDP2 on N GPUs: 1/N of weights and trained state, plus the root (embeddings,
lm_head) gathered for the step, two gathered layers and one layer's fp32 gradient.

Activations per token, in bytes (h hidden, I the MLP width, q / kv the query / key-value widths, L layers):
    checkpoint   2h per layer: the bf16 layer input that gradient checkpointing keeps (0 with activation_offloading:
                 it waits in CPU memory)
    layer        one layer's working set while it is recomputed and differentiated:
                 attention 24h + 8(2q + 2kv) (norms in fp32, q/k/v/o and their gradients; 12h less with
                 liger_rms_norm, 10h less with lora_dropout 0: PEFT's dropout copies), MLP 9I (gate, up, SiLU,
                 product and gradients, bf16); tiled_mlp: the MLP part ÷ its shards
    loss         without Cut Cross Entropy, one chunk of ≤ 1,024 trained positions' logits: bf16 out of lm_head,
                 fp32 copy and its gradient = 10 B × vocab each (1.25 GiB for Magistral's 131,072), while every
                 layer's checkpoint is alive; Cut Cross Entropy keeps no logits
The peak is the larger of (checkpoints + loss chunk) at the start of backward and (checkpoints + one layer) during
it. Without checkpointing every layer's working set stays alive (L × layer).

Calibrated (all constants above except the byte sizes of the dtypes) on 1 H200, Magistral Small (random weights),
QLoRA r=32 on the 7 projections, 8-bit AdamW, checkpointing, bf16; measured torch.cuda.max_memory_allocated:
    seq 2,048 mbs 1: 16.6 GiB (estimate 16.9)      seq 2,048 mbs 2: 18.7 (18.4)     seq 8,192 + CCE: 21.8 (21.8)
    seq 32,768 + CCE + offload + tiled (7): 22.4 (22.4)     seq 65,536, the same: 29.8 (30.0)
    seq 65,536 + CCE + offload + tiled (8) + liger: 26.2 (26.3); the same with lora_dropout 0: 23.1 (23.1)
and a full fine-tune, FSDP2 on 2 H200s, seq 2,048, fused AdamW (README): 97.9 GiB per GPU (estimate 96.5).
tests/train/test_train_memory_estimate.py holds these points to ±10%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from magistune.config import Config, ConfigError
from magistune.model.fused import tiled_shards

GiB = 2**30
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BYTES = 0.5 + 1 / 64  # 4 bits + one 8-bit absmax per block of 64 (double quantisation)
LOGIT_CHUNK = 1024  # loss.CHUNK_TOKENS
MLP_BYTES_PER_UNIT = 9  # measured: see the module docstring
OPTIMIZER_STATE = {"adamw_torch": None, "adamw_torch_fused": None, "adamw_bnb_8bit": 2, "paged_adamw_8bit": 2}


@dataclass(frozen=True)
class Estimate:
    weights: float  # bytes
    trained: float  # trained parameters: values, gradients, optimizer state
    activations: float
    tokens: int  # per micro-batch on one GPU

    @property
    def total(self) -> float:
        return self.weights + self.trained + self.activations

    def line(self, gpu_bytes: int | None = None) -> str:
        of = f" of the GPU's {gpu_bytes / GiB:.1f} GiB" if gpu_bytes else " on a GPU"
        return (f"memory: estimated peak {self.total / GiB:.1f} GiB{of} (weights {self.weights / GiB:.1f}, trained "
                f"parameters + gradients + optimizer {self.trained / GiB:.1f}, activations {self.activations / GiB:.1f}"
                f" for {self.tokens:,} tokens)")


def layer_shapes(text_config) -> dict:
    h, heads = text_config.hidden_size, text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or h // heads
    return {"h": h, "I": text_config.intermediate_size, "q": heads * head_dim,
            "kv": text_config.num_key_value_heads * head_dim, "L": text_config.num_hidden_layers,
            "V": text_config.vocab_size}


def linear_sizes(s: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of one decoder layer."""
    h, i, q, kv = s["h"], s["I"], s["q"], s["kv"]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def lora_targets(cfg: Config) -> list[str]:
    """Which of the 7 projections get LoRA (a regex or unknown names: all 7, the upper bound)."""
    if cfg.lora_target_linear or isinstance(cfg.lora_target_modules, str) or not cfg.lora_target_modules:
        return list(LINEARS)
    named = [n for n in LINEARS if any(str(m).split(".")[-1] == n for m in cfg.lora_target_modules)]
    return named or list(LINEARS)


def vision_weights(model_config) -> int:
    """Weights of a Pixtral tower (frozen, bf16) from its config: L × (4h² + 3hI), roughly."""
    vc = getattr(model_config, "vision_config", None)
    if vc is None:
        return 0
    return vc.num_hidden_layers * (4 * vc.hidden_size ** 2 + 3 * vc.hidden_size * vc.intermediate_size)


def estimate(cfg: Config, model_config, world: int = 1, sp_degree: int = 1, fsdp: bool = False) -> Estimate:
    """Peak bytes on one GPU. `world` GPUs with `fsdp` share weights and trained state; `sp_degree` ranks share
    each row's tokens (sequence parallelism)."""
    s = layer_shapes(model_config.get_text_config())
    h, L = s["h"], s["L"]
    per_layer = sum(i * o for i, o in linear_sizes(s).values())
    linear, other = L * per_layer, 2 * s["V"] * h + (2 * L + 1) * h  # embeddings, lm_head, norms
    wide = 2 if cfg.bf16 is not False else 4  # bf16 "auto" is bf16 on every GPU that runs Magistral
    weights = (linear * NF4_BYTES + other * 2 if cfg.load_in_4bit else (linear + other) * wide)
    weights += vision_weights(model_config) * 2
    if cfg.adapter:  # fp32 LoRA matrices: value + gradient + state (the values are not among the weights)
        sizes = linear_sizes(s)
        n_trained, value = L * sum(cfg.lora_r * sum(sizes[n]) for n in lora_targets(cfg)), 4
        trained = n_trained * (2 * value + (OPTIMIZER_STATE.get(cfg.optimizer) or 2 * value))
    else:  # a full fine-tune: the weights are the values; gradient + state
        trained = (linear + other) * (wide + (OPTIMIZER_STATE.get(cfg.optimizer) or 2 * wide))
    if fsdp and world > 1:  # 1/N of everything, plus what FSDP2 holds whole: the root (embeddings, lm_head) for the
        # whole step, a layer and the prefetched next one, and a layer's fp32 gradient before its reduce-scatter
        layer = per_layer * (NF4_BYTES if cfg.load_in_4bit else wide)
        weights = weights / world + other * (2 if cfg.load_in_4bit else wide) + 2 * layer
        trained = trained / world + (0 if cfg.adapter else per_layer * 4)
    tokens = math.ceil(cfg.micro_batch_size * cfg.sequence_len / sp_degree)
    return Estimate(weights, trained, activation_bytes(cfg, s, tokens), tokens)


def activation_bytes(cfg: Config, s: dict, tokens: int) -> float:
    h, L = s["h"], s["L"]
    attention = 24 * h + 8 * (2 * s["q"] + 2 * s["kv"])
    if cfg.liger_rms_norm:  # no fp32 copies of the hidden states in the norms: measured -11.7h at 64k
        attention -= 12 * h
    if cfg.adapter and cfg.lora_dropout == 0:  # PEFT's dropout(x) copies for q, k, v (bf16): measured -9.8h at 64k
        attention -= 10 * h
    mlp = MLP_BYTES_PER_UNIT * s["I"]
    if cfg.tiled_mlp:
        mlp /= tiled_shards(cfg, h)
    layer = tokens * (attention + mlp)
    loss = 0 if cfg.use_cce else min(tokens, LOGIT_CHUNK) * s["V"] * 10
    if not cfg.gradient_checkpointing:
        return L * layer + loss
    checkpoints = 0 if cfg.activation_offloading else tokens * L * 2 * h
    return checkpoints + max(layer, loss)


# --- the check before the model loads -------------------------------------------------------------------------

def fixes(cfg: Config, model_config, limit: float, **kw) -> list[str]:
    """Single changes that bring the estimate under `limit`, cheapest in speed first; else the smallest
    sequence_len that fits with all of them."""
    tries = [("cut_cross_entropy: true", {"cut_cross_entropy": True}),
             ("gradient_checkpointing: true", {"gradient_checkpointing": True}),
             ("activation_offloading: true", {"activation_offloading": True, "gradient_checkpointing": True}),
             ("tiled_mlp: true", {"tiled_mlp": True})]
    found = []
    for text, keys in tries:
        if any(getattr(cfg, k) != v for k, v in keys.items()) and estimate(cfg.model_copy(update=keys), model_config,
                                                                             **kw).total <= limit:
            found.append(text)
    for mbs in range(cfg.micro_batch_size - 1, 0, -1):
        if estimate(cfg.model_copy(update={"micro_batch_size": mbs}), model_config, **kw).total <= limit:
            found.append(f"micro_batch_size: {mbs} (gradient_accumulation_steps × {cfg.micro_batch_size}/{mbs} keeps "
                         "the step)")
            break
    if found:
        return found
    every = cfg.model_copy(update={k: v for _, keys in tries for k, v in keys.items()} | {"micro_batch_size": 1})
    seq = cfg.sequence_len
    while seq > 256 and estimate(every.model_copy(update={"sequence_len": seq}), model_config, **kw).total > limit:
        seq //= 2
    if estimate(every.model_copy(update={"sequence_len": seq}), model_config, **kw).total > limit:
        return []
    return [f"all of cut_cross_entropy, activation_offloading, tiled_mlp, micro_batch_size: 1 and sequence_len: {seq}"]


def check_memory(cfg: Config, model_config, gpu_bytes: int | None, **kw) -> str:
    """The preflight line; ConfigError when the estimate exceeds a known GPU memory (unless skip_memory_check)."""
    est = estimate(cfg, model_config, **kw)
    line = est.line(gpu_bytes)
    if gpu_bytes is None or cfg.skip_memory_check or est.total <= gpu_bytes:
        return line
    options = fixes(cfg, model_config, gpu_bytes, **kw)
    advice = ("; it would fit with " + " or ".join(options)) if options else \
        "; no option of magistune's makes it fit on this GPU: use more GPUs (fsdp: true, sequence_parallel_degree)"
    raise ConfigError(f"{line}: more than the GPU has{advice}. The estimate is ±10% "
                      "(docs/config.md); skip_memory_check: true trains anyway")


def preflight_memory(cfg: Config, model_dir, device, **kw) -> str:
    """check_memory for the model in `model_dir` (its config.json) on `device`: refuses only on CUDA."""
    import torch

    from magistune.model.load import check_model_dir

    model_config = check_model_dir(model_dir, trust_remote_code=cfg.trust_remote_code)
    gpu_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    return check_memory(cfg, model_config, gpu_bytes, **kw)


__all__ = ["Estimate", "check_memory", "estimate", "fixes", "preflight_memory"]
