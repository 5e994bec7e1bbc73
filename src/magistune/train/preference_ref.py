"""Precomputed reference log-probs: one pass of the reference model over the training and eval data before step 1.

When. A full fine-tune (adapter: none) of DPO, IPO or KTO has no frozen copy of the weights to ask later: the
model it trains is the reference only before its first step. So the reference log-probs of every answer are
computed then, once, and kept (`precompute_ref_log_probs`, true by default for a full fine-tune). With an adapter
the reference is the same model with its adapters off (preference_step.reference_pair_logps), unless
precompute_ref_log_probs: true asks for the table anyway (it is then computed with the adapters off too).

What. For pairs, each sample's chosen and rejected summed log-probs; for KTO each example's, and each of its KL
row's (the mismatched prompt/completion row of data.preference.kto_mismatched, over the split in file order).
2 × 4 bytes a pair: a million pairs are 8 MB.

Where. Beside the data cache: `<prepared dir>/<data key[:16]>.ref-<model key[:16]>.safetensors`, its tensors
named `<split>.<what>` (train.chosen, eval.kl, …), and a JSON file of the same name with the keys and the
counts. The data key is data.cache.cache_key (the samples); the model key hashes the model folder's file names,
sizes and modification times, the dtype and the quantisation. A resumed run finds the table and reuses it, so
a full fine-tune resumed from a checkpoint (whose weights are no longer the reference) still compares with the
original model; if the table is gone by then, the run stops and says so.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from magistune.train.checkpoint import CheckpointError
from magistune.train.preference_step import (collate_kto, collate_pairs, disabled_adapters, kto_kl_rows, pair_logps,
                                             sample_logps)

TABLE_VERSION = 1


def model_key(model_dir: Path, cfg, dtype: torch.dtype) -> str:
    h = hashlib.sha256(f"ref v{TABLE_VERSION} {model_dir.resolve()} {dtype} 4bit={cfg.load_in_4bit} "
                       f"8bit={cfg.load_in_8bit}\n".encode())
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".json", ".bin")):
            st = f.stat()
            h.update(f"{f.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def table_path(prepared_dir: Path, data_key: str, model_key_: str) -> Path:
    return prepared_dir / f"{data_key[:16]}.ref-{model_key_[:16]}.safetensors"


def _context(model: torch.nn.Module):
    import contextlib

    return disabled_adapters(model) if hasattr(model, "disable_adapter") else contextlib.nullcontext()


@torch.no_grad()
def compute_split(model, samples: list, kto: bool, pad_id: int, micro_batch_size: int, device, autocast,
                  image_encoder=None, cce: bool = False) -> dict[str, torch.Tensor]:
    """The reference log-probs of one split: {chosen, rejected} for pairs, {logps, kl} for KTO, fp32 on the CPU."""
    out: dict[str, list[torch.Tensor]] = {}
    was_training = model.training
    model.eval()
    try:
        with _context(model):
            if kto:
                for name, rows in (("logps", samples), ("kl", kto_kl_rows(samples))):
                    for i in range(0, len(rows), micro_batch_size):
                        batch = collate_kto(rows[i:i + micro_batch_size], pad_id, image_encoder).to(device)
                        with autocast():
                            out.setdefault(name, []).append(sample_logps(model, batch, cce)[0].float().cpu())
            else:
                for i in range(0, len(samples), micro_batch_size):
                    batch = collate_pairs(samples[i:i + micro_batch_size], pad_id, image_encoder).to(device)
                    with autocast():
                        lp = pair_logps(model, batch, cce)
                    out.setdefault("chosen", []).append(lp.chosen.float().cpu())
                    out.setdefault("rejected", []).append(lp.rejected.float().cpu())
    finally:
        model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}


def load_table(path: Path, counts: dict[str, int]) -> dict[str, torch.Tensor] | None:
    """The table at `path` if it is there and holds `counts` rows per split; None if absent."""
    meta = path.with_suffix(".json")
    if not path.is_file() or not meta.is_file():
        return None
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        tensors = load_file(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: the reference log-probs cannot be read ({e}); delete it and its .json to "
                              "compute them again (only before the first step of a full fine-tune)") from None
    if info.get("counts") != counts or any(t.shape[0] != counts[k.split(".")[0]] for k, t in tensors.items()):
        raise CheckpointError(f"{path}: the reference log-probs were computed for {info.get('counts')} samples, "
                              f"the data now has {counts}")
    return tensors


def save_table(path: Path, tensors: dict[str, torch.Tensor], counts: dict[str, int], keys: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    meta = path.with_suffix(".json")
    meta_tmp = meta.with_name(meta.name + f".tmp{os.getpid()}")
    meta_tmp.write_text(json.dumps({"version": TABLE_VERSION, "counts": counts, **keys}, indent=1), encoding="utf-8")
    os.replace(meta_tmp, meta)
    os.replace(tmp, path)  # the tensors last: a table without its .json is never read


def reference_table(model, splits: dict[str, list], kto: bool, path: Path, keys: dict, resumed: bool, say,
                    **compute) -> dict[str, torch.Tensor]:
    """Load the table at `path`, or compute and save it (not on a resumed full fine-tune: its weights moved)."""
    counts = {name: len(s) for name, s in splits.items()}
    table = load_table(path, counts)
    if table is not None:
        say(f"reference log-probs: reused {path}")
        return table
    if resumed and not hasattr(model, "disable_adapter"):
        raise CheckpointError(f"{path}: the precomputed reference log-probs are gone, and a resumed full fine-tune "
                              "can no longer compute them (its weights are not the reference any more); start again "
                              "from step 0 in a new output_dir")
    say(f"reference log-probs: one pass over {sum(counts.values())} samples before step 1 …")
    table = {}
    for name, samples in splits.items():
        if samples:
            table.update({f"{name}.{k}": v for k, v in compute_split(model, samples, kto, **compute).items()})
    save_table(path, table, counts, keys)
    say(f"reference log-probs: saved {path}")
    return table


__all__ = ["compute_split", "load_table", "model_key", "reference_table", "save_table", "table_path"]
