"""Optimizers and learning-rate schedules.

Memory of the optimizer state per trained parameter: AdamW keeps two fp32 moments = 8 bytes; the 8-bit
bitsandbytes AdamW keeps two uint8 moments (+ a small block-wise scale) ≈ 2 bytes. For a full fine-tune
of 23.6B parameters that is 189 GB vs 47 GB; for a rank-32 LoRA of Magistral Small (~92M parameters) it is
0.74 GB vs 0.18 GB. The paged variant lets the state spill to CPU memory under pressure (CUDA only).

Weight decay pulls weights towards 0; it is not applied to biases and norm scales (1-D parameters), whose
natural value is not 0 (an RMSNorm scale of 0 would silence its layer).

Schedules are factors of the peak learning rate, as a function of the number of optimizer steps done
(`LambdaLR` calls them with 0 before the first step). They follow Hugging Face transformers' definitions so
that configs carried over from Axolotl behave the same: with 100 steps and warmup_ratio 0.1, warmup is
ceil(0.1 × 100) = 10 steps at lr × 0/10, 1/10, …, 9/10, then the decay from lr down to 0 at step 100.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit")


class OptimizerError(ValueError):
    """An optimizer that cannot run on this machine; the message says what to use instead."""


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases and norm scales (and any other 1-D parameter) are not decayed."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: decayed, and not decayed. Frozen ones are left out."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if no_decay(name, p) else decay).append(p)
    if not decay and not keep:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def check_optimizer(name: str, device: torch.device) -> str | None:
    """Before any weight loads: an error for an optimizer that cannot run here, or a note (None: fine)."""
    if name in ("adamw_bnb_8bit", "paged_adamw_8bit"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise OptimizerError(f"optimizer: {name} needs bitsandbytes ({e}); pip install bitsandbytes, "
                                 "or use optimizer: adamw_torch") from None
    if name == "paged_adamw_8bit" and device.type != "cuda":
        return ("optimizer: paged_adamw_8bit pages its state to CPU memory only on CUDA; on the CPU bitsandbytes "
                "runs it as adamw_bnb_8bit (same updates, no paging)")
    return None


def build_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer of `cfg.optimizer`, betas (0.9, 0.999), eps 1e-8, decay as `param_groups` splits it."""
    groups = param_groups(model, cfg.weight_decay)
    lr = cfg.learning_rate
    if cfg.optimizer == "adamw_torch":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if cfg.optimizer == "adamw_torch_fused":
        # One kernel for all parameters instead of a loop of small ones; torch has it for CUDA and CPU tensors.
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    import bitsandbytes as bnb

    if cfg.optimizer == "adamw_bnb_8bit":
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if cfg.optimizer == "paged_adamw_8bit":
        import warnings

        # On the CPU bitsandbytes warns at the first step of every parameter; check_optimizer's note said it once.
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        return bnb.optim.PagedAdamW8bit(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    raise OptimizerError(f"optimizer: unknown '{cfg.optimizer}'; expected one of {', '.join(OPTIMIZERS)}")


def warmup_steps(cfg, total_steps: int) -> int:
    """warmup_steps as given, or ceil(warmup_ratio × total steps), never more than the run."""
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    if cfg.warmup_ratio is not None:
        return min(math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    return 0


def lr_factor(kind: str, step: int, warmup: int, total: int) -> float:
    """The learning rate of optimizer step `step` (0-based) as a fraction of the peak."""
    if step < warmup:
        return step / max(1, warmup)  # linear warmup from 0
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)  # 0 → 1 over the decay
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))  # 1 → 0 (0 at once when warmup fills the run)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # half a cosine wave: 1 → 0
    raise ValueError(f"lr_scheduler: unknown '{kind}'; expected cosine, linear or constant")


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int) -> LambdaLR:
    lr_factor(kind, 0, warmup, total)  # unknown kinds fail here, not at the first step
    return LambdaLR(optimizer, lambda step: lr_factor(kind, step, warmup, total))
