"""One rank of the sequence-parallel check (test_sequence_parallel.py): a tiny LoRA model's loss and gradients on
slices of the rows, summed over the group, written for the test to compare with the one-process run.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed/sp_worker.py OUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_model():
    """tiny-random with LoRA on every linear layer, checkpointed; the adapters set to seeded random values (LoRA's
    B starts at 0, which would leave A's gradients 0)."""
    from magistune.config import parse_config
    from magistune.model import build_model

    cfg, _ = parse_config({"base_model": "tiny-random", "datasets": [{"path": "x.jsonl"}], "adapter": "lora",
                           "lora_target_linear": True, "lora_r": 4, "gradient_checkpointing": True, "bf16": False})
    model, _, _ = build_model(cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainable(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.train()
    return model


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def make_batches():
    """An unpacked batch (rows of 13 and 9 tokens: padded, odd lengths) and a packed one (3 samples in a row)."""
    from magistune.data.sample import IGNORE_INDEX
    from magistune.train.batches import Batch

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 5000, (2, 13), generator=gen)
    ids[1, 9:] = 11  # padding
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX  # a prompt
    labels[1, 9:] = IGNORE_INDEX
    mask = (torch.arange(13) < torch.tensor([[13], [9]])).long()
    plain = Batch(ids, labels, mask, ["a", "b"])
    pids = torch.randint(1000, 5000, (1, 17), generator=gen)
    plabels = pids.clone()
    plabels[0, [0, 1, 7, 12]] = IGNORE_INDEX
    pos = torch.cat([torch.arange(7), torch.arange(5), torch.arange(5)])[None]
    packed = Batch(pids, plabels, torch.ones_like(pids), ["p"], position_ids=pos)
    return {"plain": plain, "packed": packed}


def main() -> int:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from magistune.train import sequence_parallel as sp_mod

    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sp = sp_mod.new_groups(rank, world, world)
    model = make_model()
    sp_mod.use_ulysses(model)
    for name, batch in make_batches().items():
        model.zero_grad()
        loss_sum = sp_mod.slice_loss_sum(model, batch, sp, pad_id=11)
        (loss_sum / batch.n_trained).backward()
        tensors = {f"grad.{n}": p.grad.detach().clone() for n, p in trainable(model).items()}
        tensors["loss_sum"] = loss_sum.detach().reshape(1)
        for t in tensors.values():
            dist.all_reduce(t, group=sp.group)  # the row's gradient is the sum of the slices' (module docstring)
        if rank == 0:
            save_file(tensors, str(out / f"{name}.safetensors"))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
