"""Which recipe `magistune train` runs, and how `--nproc N` starts torchrun.

    no torchrun (or torchrun with 1 process and neither fsdp nor ddp)  →  sft.py, one process (dpo.py with rl:)
    torchrun                                                            →  sft_distributed.py (FSDP2 or DDP;
                                                                           dpo_distributed.py with rl:)

Nothing here starts a process group; it reads the environment that torchrun sets.
"""

from __future__ import annotations

import os
import sys

from magistune.config import Config


def torchrun_env() -> dict | None:
    """RANK, WORLD_SIZE, LOCAL_RANK as torchrun sets them, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return {"rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"]),
            "local_rank": int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))}


def distributed_mode(cfg: Config, env: dict | None) -> str | None:
    """"fsdp" or "ddp" for a torchrun process, None for the one-process recipe. Several processes with neither key
    set: DDP, as Axolotl does (sft_distributed says so in a note)."""
    if env is None:
        return None
    if cfg.fsdp:
        return "fsdp"
    if cfg.ddp or env["world"] > 1:
        return "ddp"
    return None


def single_process_notes(cfg: Config) -> list[str]:
    """What the one-process recipe says about multi-GPU keys it ignores."""
    if not (cfg.fsdp or cfg.ddp):
        return []
    return [f"{'fsdp' if cfg.fsdp else 'ddp'}: true, but not launched by torchrun: training in this one process; "
            "use `magistune train CONFIG --nproc N` for N GPUs"]


def launch_command(config: str, nproc: int, extra: list[str] | None = None) -> list[str]:
    """`magistune train CONFIG --nproc N` → torchrun on this machine with N processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            *(extra or []), "-m", "magistune", "train", config]


__all__ = ["distributed_mode", "launch_command", "single_process_notes", "torchrun_env"]
