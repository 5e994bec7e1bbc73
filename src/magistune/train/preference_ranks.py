"""The forwards of preference tuning on one of N ranks (dpo_distributed.py), all through the FSDP / DDP root.

- `preference_forward` is the root's forward (sharding.LossModule around it), so that the engines' hooks run
  (FSDP2 gathers embeddings, norm and lm_head in the root's pre-forward hook). An adapter run's reference is the
  same root call with the adapters off inside it, under no_grad, before the policy's forward (PEFT's
  disable_adapter() flips a flag on the LoRA layers; FSDP2's shards are untouched).
- `RankForwards` holds what a micro-batch's losses need: the root, the data, the precomputed reference table.
  KTO's z₀ is the step's over every rank's examples: Σ (policy − reference) over the mismatched rows and their
  count all-reduced, z₀ = max(0, Σ / n), as one process computes it. The table (full fine-tune of DPO/IPO/KTO,
  preference_ref.py's file): every rank runs the same forwards over the whole data through the root (FSDP2 needs
  all ranks in every forward); rank 0 writes the file.
- `eval_groups`: eval micro-batch i goes to rank i % N; a rank left one short repeats the last batch and drops
  its result. `summed`: a step's or an eval's totals over the ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from magistune.config import REFERENCE_LOSSES, Config
from magistune.data.build import resolve_tokenizer_file
from magistune.data.cache import cache_key
from magistune.train.checkpoint import CheckpointError
from magistune.train.distributed import Ranks
from magistune.train.preference_ref import load_table, model_key, save_table, table_path
from magistune.train.preference_step import (PairLogps, PreferenceTotals, collate_kto, collate_pairs,
                                             disabled_adapters, example_loss, kto_kl_rows, pair_logps, pair_loss,
                                             sample_logps)

def preference_forward(model, batch, kto: bool, cce: bool, policy: bool = True, reference: bool = False):
    """The root's forward: (policy, reference) summed log-probs of a micro-batch, None where not asked. Pairs:
    PairLogps; KTO rows: a (B,) tensor. The reference is the model with its adapters off, under no_grad, computed
    first: the forward whose graph the backward follows is the engine's last."""
    logps = sample_logps if kto else pair_logps
    ref = out = None
    if reference:
        with torch.no_grad(), disabled_adapters(model):
            ref = logps(model, batch, cce)
        ref = ref[0] if kto else ref.detach()
    if policy:
        out = logps(model, batch, cce)
        out = out[0] if kto else out
    return out, ref


def eval_groups(n: int, micro_batch_size: int, ranks: Ranks) -> list[tuple[list[int], bool]]:
    """This rank's eval micro-batches as (indices, counted): batch i goes to rank i % N; a rank left one short
    repeats the last batch, uncounted, so that every rank runs the same number of forwards."""
    groups = [list(range(i, min(i + micro_batch_size, n))) for i in range(0, n, micro_batch_size)]
    mine = [(g, True) for g in groups[ranks.rank::ranks.world]]
    if groups and len(mine) < -(-len(groups) // ranks.world):
        mine.append((groups[-1], False))
    return mine


def summed(ranks: Ranks, totals: PreferenceTotals) -> PreferenceTotals:
    """`totals` summed over the ranks (its seconds are this rank's)."""
    keys = [k for k in totals.to_dict() if k != "seconds"]
    values = ranks.sum([float(getattr(totals, k)) for k in keys])
    return PreferenceTotals(**{k: type(getattr(totals, k))(v) for k, v in zip(keys, values)}, seconds=totals.seconds)


class RankForwards:
    """One rank's forwards through `root` (the FSDP / DDP module around preference_forward) over `data`'s splits:
    a micro-batch's losses, KTO's z₀ over all ranks, and the reference table (load_reference)."""

    def __init__(self, cfg: Config, ranks: Ranks, model: torch.nn.Module, root: torch.nn.Module, data,
                 pad_id: int, image_encoder, device: torch.device, autocast: Callable):
        self.cfg, self.ranks, self.model, self.data = cfg, ranks, model, data
        self.pad_id, self.image_encoder, self.device, self.autocast = pad_id, image_encoder, device, autocast
        self.kto = cfg.rl == "kto"
        self.needs_ref = cfg.rl in REFERENCE_LOSSES  # DPO, IPO, KTO
        self.logps = lambda batch, **kw: root(batch, kto=self.kto, cce=cfg.use_cce, **kw)  # noqa: E731
        self.kl_rows = {"train": kto_kl_rows(data.train), "eval": kto_kl_rows(data.eval) if data.eval else []} \
            if self.kto else None
        self.table: dict[str, torch.Tensor] | None = None

    def load_reference(self, model_dir: Path, dtype: torch.dtype, resumed: bool, say: Callable) -> None:
        """The precomputed reference table (preference_ref.py's file), read by every rank or computed by all."""
        cfg, data, ranks = self.cfg, self.data, self.ranks
        if not cfg.precompute_ref_log_probs:
            return
        data_key = cache_key(cfg, resolve_tokenizer_file(cfg))
        mkey = model_key(model_dir, cfg, dtype)
        path, counts = table_path(cfg.prepared_dir, data_key, mkey), {"train": len(data.train), "eval": len(data.eval)}
        table = load_table(path, counts)
        if not ranks.any(table is None):
            say(f"reference log-probs: reused {path}")
            self.table = table
            return
        if resumed and cfg.adapter is None:
            raise CheckpointError(f"{path}: the precomputed reference log-probs are gone, and a resumed full "
                                  "fine-tune can no longer compute them; start again from step 0 in a new output_dir")
        unit = "examples" if self.kto else "pairs"
        say(f"reference log-probs: one pass over {sum(counts.values())} {unit} on every rank before step 1 …")
        table = {}
        for name, samples in (("train", data.train), ("eval", data.eval)):
            if samples:
                table.update({f"{name}.{k}": v for k, v in self.reference_split(samples).items()})
        if ranks.is_main:
            save_table(path, table, counts, {"data_key": data_key, "model_key": mkey})
            say(f"reference log-probs: saved {path}")
        ranks.barrier()
        self.table = table

    @torch.no_grad()
    def reference_split(self, samples: list) -> dict[str, torch.Tensor]:
        """preference_ref.compute_split through the root: the same micro-batches on every rank, fp32 on the CPU."""
        mbs, adapter = self.cfg.micro_batch_size, self.cfg.adapter is not None
        parts = (("logps", samples), ("kl", kto_kl_rows(samples))) if self.kto else (("pairs", samples),)
        out: dict[str, list[torch.Tensor]] = {}
        self.model.eval()
        try:
            for name, rows in parts:
                for i in range(0, len(rows), mbs):
                    batch = (collate_kto if self.kto else collate_pairs)(rows[i:i + mbs], self.pad_id, self.image_encoder)
                    with self.autocast():
                        policy, ref = self.logps(batch.to(self.device), policy=not adapter, reference=adapter)
                    lp = ref if adapter else policy
                    if self.kto:
                        out.setdefault(name, []).append(lp.float().cpu())
                    else:
                        out.setdefault("chosen", []).append(lp.chosen.float().cpu())
                        out.setdefault("rejected", []).append(lp.rejected.float().cpu())
        finally:
            self.model.train()
        return {k: torch.cat(v) for k, v in out.items()}

    def micro_loss(self, split: str, idx: list[int], batch, kl: torch.Tensor | None):
        """The per-pair (KTO: per-example) losses of one micro-batch, with the reference where the loss has one."""
        rows = torch.tensor(idx, dtype=torch.long)
        policy, ref = self.logps(batch, reference=self.needs_ref and self.table is None)
        device = policy.device if self.kto else policy.chosen.device
        if self.kto:
            if self.table is not None:
                ref = self.table[f"{split}.logps"][rows].to(device)
            samples = self.data.train if split == "train" else self.data.eval
            desirable = torch.tensor([samples[i].label for i in idx], device=device)
            return example_loss(self.cfg, policy, ref, desirable, kl)
        if self.needs_ref and self.table is not None:
            ref = PairLogps(self.table[f"{split}.chosen"][rows].to(device),
                            self.table[f"{split}.rejected"][rows].to(device), None, None)
        return pair_loss(self.cfg, policy, ref)

    @torch.no_grad()
    def step_kl(self, split: str, groups: list[tuple[list[int], bool]]) -> torch.Tensor | None:
        """KTO's z₀ over every rank's examples (their mismatched rows): Σ (policy − reference) and the row count
        all-reduced, z₀ = max(0, Σ / n), detached. `groups`: this rank's (indices, counted) micro-batches."""
        if not self.kto:
            return None
        total, n = 0.0, 0
        for idx, counted in groups:
            batch = collate_kto([self.kl_rows[split][i] for i in idx], self.pad_id, self.image_encoder).to(self.device)
            with self.autocast():
                policy, ref = self.logps(batch, reference=self.table is None)
            if self.table is not None:
                ref = self.table[f"{split}.kl"][torch.tensor(idx, dtype=torch.long)].to(policy.device)
            if counted:
                total, n = total + float((policy.float() - ref.float()).double().sum()), n + len(idx)
        total, n = self.ranks.sum([total, float(n)])
        return torch.tensor(max(total / n, 0.0), dtype=torch.float32, device=self.device)


__all__ = ["RankForwards", "eval_groups", "preference_forward", "summed"]
