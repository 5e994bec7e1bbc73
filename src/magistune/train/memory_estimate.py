"""The peak GPU memory a training config will need, from the model's config.json alone (no weight is read).

    peak = weights + trained parameters' (values + gradients + optimizer state) + max(activations, GRPO's rollout)

Weights. QLoRA: every linear layer of the decoder in NF4, 0.5 byte a weight + 1/64 byte of absmax per 64-weight
block (bitsandbytes' double quantisation) = 0.516 B; embed_tokens, lm_head and the norms stay bf16 (2 B).
Otherwise 2 B (bf16) or 4 B (fp32) a weight. Magistral Small: 22.2B linear weights × 0.516 + 1.34B × 2 = 13.2 GiB.

Trained parameters. LoRA matrices are fp32: r × (in + out) each, 4 B value + 4 B gradient + the optimizer's state
(AdamW: 2 moments in the parameter's dtype, 8 B; the 8-bit AdamWs: 2 B). r=32 on all 7 projections of
Magistral Small: 185M × 10 B (8-bit) = 1.7 GiB. A full fine-tune: every weight's gradient and moments, in the
model's dtype (bf16: 2 + 4 B). FSDP2 on N GPUs: 1/N of weights and trained state, plus the root (embeddings,
lm_head) gathered for the step, two gathered layers and one layer's fp32 gradient.

Activations per token, in bytes (h hidden, I the MLP width, q / kv the query / key-value widths, L layers):
    checkpoint   2h per layer: the bf16 layer input that gradient checkpointing keeps (0 with activation_offloading,
                 which only SFT applies: it waits in CPU memory)
    layer        one layer's working set while it is recomputed and differentiated:
                 attention 14h + 8(2q + 2kv) (norms in fp32, q/k/v/o and their gradients; 12h less with
                 liger_rms_norm), plus lora_dropout > 0's copies: PEFT saves a bf16 dropout(x) and its bool mask
                 for each attention LoRA projection, 3 B × its input (q, k, v: 3 × 3h; o: 3q); lora_qkv_kernel
                 draws one for the three (3h). MLP 9I (gate, up, SiLU, product, gradients and the MLP's dropout copies,
                 bf16); tiled_mlp: the MLP part ÷ its shards
    loss         without Cut Cross Entropy, one chunk of ≤ 1,024 trained positions' logits: bf16 out of lm_head,
                 fp32 copy and its gradient = 10 B × vocab each (1.25 GiB for Magistral's 131,072), while every
                 layer's checkpoint is alive; Cut Cross Entropy keeps no logits
The peak is the larger of (checkpoints + loss chunk) at the start of backward and (checkpoints + one layer) during
it. Without checkpointing every layer's working set stays alive (L × layer).

Rows of the other recipes (rough; one measured point each, below). Tokens = micro_batch_size × the longest row:
    DPO/IPO/ORPO/SimPO  one row per pair, the prompt once + chosen + rejected (preference_step.collate_pairs); the
                        recipe passes its data's longest, else each side ≤ sequence_len: 2 × sequence_len − 1.
                        The row has a (B, 1, T, T) bool mask (rejected blind to chosen), alive for the step, which
                        SDPA turns into a bf16 bias in each attention (3 B × B·T² in all), and with a mask on CUDA
                        transformers expands k and v to the query heads (repeat_kv: 8q more a token)
    KTO                 prompt + completion, ≤ sequence_len; the mask when rows are padded (micro_batch_size > 1)
    GRPO                the longest prompt + trl.max_completion_length (≤ sequence_len); the mask as KTO's
    reference           adapters off under no_grad, before (dpo_distributed) or after (dpo) the policy's forward:
                        one forward-only layer at a time, under the backward's peak: adds nothing; the precomputed
                        table is filled before the first step, without gradients or optimizer state: nothing
    GRPO's rollout      before the training forwards, freed after: micro_batch_size × gradient_accumulation_steps
                        completions sampled at once (static_generation): KV cache L × 2 × kv × rows × (prompt +
                        max_completion_length) × 2 B, and the prefill of the prompts, one layer at a time: SDPA
                        with a mask and grouped key/value heads has no fused kernel on CUDA, and torch's math
                        kernel computes bf16 in fp32: scores and softmax 8 B × heads per (prompt token, cache
                        column) pair, + the mask 3 B; fp32 q 4q a prompt token, fp32 k and v at the query heads 8q
                        a column; a layer's hidden and MLP 2(h + 3I) a prompt token. The optimizer state (and the
                        gradients, counted too: rough) are alive then

Calibrated (all constants above except the byte sizes of the dtypes) on 1 H200, Magistral Small (random weights),
QLoRA r=32 on the 7 projections, 8-bit AdamW, checkpointing, bf16; measured torch.cuda.max_memory_allocated:
    seq 2,048 mbs 1: 16.6 GiB (estimate 16.9)      seq 2,048 mbs 2: 18.7 (18.4)     seq 8,192 + CCE: 21.8 (21.9)
    seq 32,768 + CCE + offload + tiled (7): 22.4 (22.7)     seq 65,536, the same: 29.8 (30.4)
    seq 65,536 + CCE + offload + tiled (8) + liger: 26.2 (26.3); the same with lora_dropout 0: 23.1 (22.8), or
    with lora_qkv/o/mlp_kernel (dropout 0.05): 24.4 (24.5); seq 131,072, the same + tiled (16), dropout 0: 28.7 (28.4)
and a full fine-tune, FSDP2 on 2 H200s, seq 2,048, fused AdamW (README): 97.9 GiB per GPU (estimate 96.5);
DPO, one row of 1,024 prompt + 2 × 1,024 answer tokens: 17.96 (17.6); GRPO, 8 completions of 256 + 512 tokens in
one micro-batch, lora_dropout 0: 19.51 (20.0), during the rollout 16.25 (16.8) (bench/results/*_step_2026-12-02).
tests/train/test_train_memory_estimate.py holds these points to ±10%.
"""

from __future__ import annotations

import importlib.util
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
PAIR_LOSSES = ("dpo", "ipo", "orpo", "simpo")  # one shared-prompt row per pair, with its own attention mask
LONG_SEQUENCE = 16384  # from here on, more GPUs through sequence_parallel_degree are worth naming
MAX_SP_DEGREE = 8  # the GPUs of one host


@dataclass(frozen=True)
class Estimate:
    weights: float  # bytes
    trained: float  # trained parameters: values, gradients, optimizer state
    activations: float
    tokens: int  # per micro-batch on one GPU
    rollout: float = 0.0  # GRPO's sampling: KV cache + prefill, before (not during) the training forwards
    rollout_shape: tuple[int, int] = (0, 0)  # (completions, cache columns)

    @property
    def total(self) -> float:
        return self.weights + self.trained + max(self.activations, self.rollout)

    def line(self, gpu_bytes: int | None = None) -> str:
        of = f" of the GPU's {gpu_bytes / GiB:.1f} GiB" if gpu_bytes else " on a GPU"
        rollout = (f"; the rollout before them {self.rollout / GiB:.1f}: KV cache of {self.rollout_shape[0]} "
                   f"completions × {self.rollout_shape[1]:,} tokens + prefill" if self.rollout else "")
        return (f"memory: estimated peak {self.total / GiB:.1f} GiB{of} (weights {self.weights / GiB:.1f}, trained "
                f"parameters + gradients + optimizer {self.trained / GiB:.1f}, activations {self.activations / GiB:.1f}"
                f" for {self.tokens:,} tokens{rollout})")


def cce_installed() -> bool:
    """Whether cut_cross_entropy can be found: the suggestions offer it only then."""
    return importlib.util.find_spec("cut_cross_entropy") is not None


def layer_shapes(text_config) -> dict:
    h, heads = text_config.hidden_size, text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or h // heads
    return {"h": h, "I": text_config.intermediate_size, "q": heads * head_dim, "heads": heads,
            "kv": text_config.num_key_value_heads * head_dim, "kv_heads": text_config.num_key_value_heads,
            "L": text_config.num_hidden_layers, "V": text_config.vocab_size}


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


def forward_row(cfg: Config, row: int | None = None, prompt: int | None = None) -> int:
    """Tokens of the longest row one forward holds: `row` from the data where the recipe knows it (capped by the
    config's bound), else the bound (module docstring); GRPO: the longest `prompt` + trl.max_completion_length."""
    if cfg.rl == "grpo":
        new = cfg.trl.max_completion_length
        return (cfg.sequence_len - new if prompt is None else prompt) + new
    bound = 2 * cfg.sequence_len - 1 if cfg.rl in PAIR_LOSSES else cfg.sequence_len
    return min(row, bound) if row else bound


def estimate(cfg: Config, model_config, world: int = 1, sp_degree: int = 1, fsdp: bool = False,
             row: int | None = None, prompt: int | None = None) -> Estimate:
    """Peak bytes on one GPU. `world` GPUs with `fsdp` share weights and trained state; `sp_degree` ranks share
    each row's tokens (sequence parallelism); `row` / `prompt`: the longest row / GRPO prompt of the data."""
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
    length = forward_row(cfg, row, prompt)
    tokens = math.ceil(cfg.micro_batch_size * length / sp_degree)
    rollout, shape = (rollout_bytes(cfg, s, length - cfg.trl.max_completion_length, wide) if cfg.rl == "grpo"
                      else (0.0, (0, 0)))
    return Estimate(weights, trained, activation_bytes(cfg, s, tokens, length), tokens, rollout, shape)


def dropout_bytes(cfg: Config, s: dict) -> int:
    """Per token: the bf16 dropout(x) + bool mask (3 B a feature) saved for each attention LoRA projection's input;
    lora_qkv_kernel draws one for q, k and v together (model/lora_kernels.py)."""
    if not cfg.adapter or not cfg.lora_dropout:
        return 0
    targets = lora_targets(cfg)
    qkv = sum(n in targets for n in ("q_proj", "k_proj", "v_proj"))
    return 3 * s["h"] * (min(qkv, 1) if cfg.lora_qkv_kernel else qkv) + (3 * s["q"] if "o_proj" in targets else 0)


def masked(cfg: Config) -> bool:
    """Whether the forward gets a (B, 1, T, T) attention mask: a pair's row always, padded rows of KTO and GRPO.
    (SFT drops its padding mask: right padding is exact under the causal rule, loss.token_loss_sum.)"""
    return cfg.rl in PAIR_LOSSES or (cfg.rl in ("kto", "grpo") and cfg.micro_batch_size > 1)


def activation_bytes(cfg: Config, s: dict, tokens: int, row: int) -> float:
    h, L = s["h"], s["L"]
    attention = 14 * h + 8 * (2 * s["q"] + 2 * s["kv"]) + dropout_bytes(cfg, s)
    if cfg.liger_rms_norm:  # no fp32 copies of the hidden states in the norms: measured -11.7h at 64k
        attention -= 12 * h
    mask = cfg.micro_batch_size * row ** 2 if masked(cfg) else 0  # bool, alive for the whole step
    if mask:  # k and v repeated to the query heads, and their gradients (bf16)
        attention += 8 * s["q"]
    mlp = MLP_BYTES_PER_UNIT * s["I"]
    if cfg.tiled_mlp:
        mlp /= tiled_shards(cfg, h)
    layer = tokens * (attention + mlp) + 2 * mask  # + SDPA's bf16 bias made from the bool mask
    loss = 0 if cfg.use_cce else min(tokens, LOGIT_CHUNK) * s["V"] * 10
    if not cfg.gradient_checkpointing:
        return L * layer + loss + mask
    offloaded = cfg.activation_offloading and cfg.rl is None  # config refuses it with rl: (preference and GRPO)
    checkpoints = 0 if offloaded else tokens * L * 2 * h
    return checkpoints + mask + max(layer, loss)


def rollout_bytes(cfg: Config, s: dict, prompt: int, wide: int) -> tuple[float, tuple[int, int]]:
    """GRPO's sampling (static_generation): the KV cache and the prefill's largest layer (module docstring)."""
    rows = cfg.micro_batch_size * cfg.gradient_accumulation_steps
    columns = prompt + cfg.trl.max_completion_length
    cache = s["L"] * 2 * s["kv"] * rows * columns * wide
    pairs = prompt * columns * (8 * s["heads"] + 3)  # math SDPA: fp32 scores + softmax per head, the mask
    prefill = rows * (pairs + prompt * (2 * (s["h"] + 3 * s["I"]) + 4 * s["q"]) + columns * 8 * s["q"])
    return cache + prefill, (rows, columns)


# --- the check before the model loads -------------------------------------------------------------------------

def options(cfg: Config) -> list[tuple[str, dict]]:
    """The single-GPU options that lower the estimate, cheapest in speed first, that this recipe can use."""
    tries = [("cut_cross_entropy: true", {"cut_cross_entropy": True})] if cce_installed() else []
    tries.append(("gradient_checkpointing: true", {"gradient_checkpointing": True}))
    if cfg.rl is None:  # the preference and GRPO recipes refuse it
        tries.append(("activation_offloading: true", {"activation_offloading": True, "gradient_checkpointing": True}))
    return tries + [("tiled_mlp: true", {"tiled_mlp": True})]


def smaller_batch(cfg: Config, mbs: int) -> Config:
    """micro_batch_size `mbs` with the step's size kept (GRPO samples micro_batch_size × accumulation at once)."""
    accum = math.ceil(cfg.gradient_accumulation_steps * cfg.micro_batch_size / mbs)
    return cfg.model_copy(update={"micro_batch_size": mbs, "gradient_accumulation_steps": accum})


def fixes(cfg: Config, model_config, limit: float, **kw) -> list[str]:
    """Single changes that bring the estimate under `limit`, cheapest in speed first; else the smallest
    sequence_len (GRPO: trl.max_completion_length) that fits with all of them, and, for a long sequence_len, the
    sequence_parallel_degree that does."""
    fits = lambda c, **more: estimate(c, model_config, **(kw | more)).total <= limit  # noqa: E731
    tries, found = options(cfg), []
    for text, keys in tries:
        if any(getattr(cfg, k) != v for k, v in keys.items()) and fits(cfg.model_copy(update=keys)):
            found.append(text)
    for mbs in range(cfg.micro_batch_size - 1, 0, -1):
        if fits(smaller_batch(cfg, mbs)):
            found.append(f"micro_batch_size: {mbs} (gradient_accumulation_steps × {cfg.micro_batch_size}/{mbs} keeps "
                         "the step)")
            break
    if found:
        return found
    every = smaller_batch(cfg.model_copy(update={k: v for _, keys in tries for k, v in keys.items()}), 1)
    names = ", ".join(text.split(":")[0] for text, _ in tries if text != "gradient_checkpointing: true")
    out = [shorter(cfg, every, fits, names)] + [sequence_parallel(cfg, model_config, every, limit, names, kw)]
    return [o for o in out if o]


def shorter(cfg: Config, every: Config, fits, names: str) -> str | None:
    """All the options with the longest sequence_len (GRPO: max_completion_length) that fits, halving; or None."""
    if cfg.rl == "grpo":
        def at(n: int) -> Config:
            return every.model_copy(update={"trl": every.trl.model_copy(update={"max_completion_length": n})})
        key, n, floor = "trl.max_completion_length", cfg.trl.max_completion_length, 64
    else:
        def at(n: int) -> Config:
            return every.model_copy(update={"sequence_len": n})
        key, n, floor = "sequence_len", cfg.sequence_len, 256
    while n > floor and not fits(at(n)):
        n //= 2
    return f"all of {names}, micro_batch_size: 1 and {key}: {n}" if fits(at(n)) else None


def sequence_parallel(cfg: Config, model_config, every: Config, limit: float, names: str, kw: dict) -> str | None:
    """The smallest sequence_parallel_degree (SFT, long sequence_len) that fits with all the options, or None."""
    if cfg.rl is not None or cfg.sequence_len < LONG_SEQUENCE:
        return None
    s = layer_shapes(model_config.get_text_config())
    for d in range(max(2, cfg.sequence_parallel_degree * 2), MAX_SP_DEGREE + 1):
        if s["heads"] % d or s["kv_heads"] % d:
            continue
        sp = kw | {"world": max(kw.get("world", 1), d), "sp_degree": d}
        if estimate(every, model_config, **sp).total <= limit:
            return (f"all of {names}, micro_batch_size: 1 and sequence_parallel_degree: {d} on {d} GPUs "
                    f"(`magistune train CONFIG --nproc {d}`: Ulysses context parallelism, each GPU holds 1/{d} of "
                    "every row's tokens)")
    return None


def check_memory(cfg: Config, model_config, gpu_bytes: int | None, **kw) -> str:
    """The preflight line; ConfigError when the estimate exceeds a known GPU memory (unless skip_memory_check)."""
    est = estimate(cfg, model_config, **kw)
    line = est.line(gpu_bytes)
    if gpu_bytes is None or cfg.skip_memory_check or est.total <= gpu_bytes:
        return line
    found = fixes(cfg, model_config, gpu_bytes, **kw)
    more = ("fewer completions per step (micro_batch_size × gradient_accumulation_steps) or shorter prompts"
            if cfg.rl == "grpo" else "use more GPUs (fsdp: true)")
    advice = ("; it would fit with " + " or ".join(found)) if found else \
        f"; no option of magistune's makes it fit on this GPU: {more}"
    raise ConfigError(f"{line}: more than the GPU has{advice}. The estimate is ±10% "
                      "(docs/config.md); skip_memory_check: true trains anyway")


def preflight_memory(cfg: Config, model_dir, device, **kw) -> str:
    """check_memory for the model in `model_dir` (its config.json) on `device`: refuses only on CUDA."""
    import torch

    from magistune.model.load import check_model_dir

    model_config = check_model_dir(model_dir, trust_remote_code=cfg.trust_remote_code)
    gpu_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    return check_memory(cfg, model_config, gpu_bytes, **kw)


def longest_row(samples) -> int | None:
    """The longest row a preference forward holds for these samples: a pair's prompt once + both answers
    (preference_step.collate_pairs), a KTO example's prompt + completion; None without samples."""
    rows = [len(s.chosen_input_ids) + len(s.rejected_input_ids) - s.prompt_len if hasattr(s, "chosen_input_ids")
            else len(s) for s in samples]
    return max(rows, default=None)


__all__ = ["Estimate", "check_memory", "estimate", "fixes", "longest_row", "preflight_memory"]
