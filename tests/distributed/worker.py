"""One rank of the 2-process CPU tests: runs a plan of training runs in one process group.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed/worker.py PLAN.json

PLAN.json: {"runs": [{"name": …, "config": path, "overrides": {"<rank>": {key: value}}, "before": [actions]}],
            "results": path}. Every run calls magistune's sft_distributed.train (dpo_distributed.train with rl:) in this process, as `-m magistune train` would;
the process group is created once here (gloo, or NCCL where there are GPUs), so that the plan pays the start-up (imports, tokenizer) once.
Actions run on rank 0 before a run, between barriers: {"copy": [src, dst]}, {"rmtree": path}, {"unlink": path}.
Results: {name: return code} per rank, in PLAN["results"] + ".rank<r>.json".
"""

from __future__ import annotations

import json
import os
import shutil
import time
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


T0 = time.perf_counter()


def main() -> int:
    import torch.distributed as dist

    from magistune import tokenizer as tk
    from magistune.config import load_config
    from magistune.train.launch import distributed_mode, torchrun_env
    from magistune.train import dpo_distributed, sft_distributed

    real, memo = tk.load_tokenizer, {}

    def cached(path):  # a Tekken file takes seconds to load: once per process
        key = str(Path(path).resolve())
        if key not in memo:
            memo[key] = real(path)
        return memo[key]

    tk.load_tokenizer = cached
    import magistune.data.build as build

    build.load_tokenizer = cached

    import torch

    plan = json.loads(Path(sys.argv[1]).read_text())
    if torch.cuda.is_available():  # what magistune's distributed.join would do; it then reuses this group
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("cuda:nccl,cpu:gloo", device_id=device)  # as distributed.join does
        barrier = lambda: dist.barrier(device_ids=[device.index])  # noqa: E731
    else:
        dist.init_process_group("gloo")
        barrier = dist.barrier
    rank = dist.get_rank()
    results = {}
    for run in plan["runs"]:
        if rank == 0:
            for action in run.get("before", []):
                if "copy" in action:
                    shutil.copytree(*action["copy"])
                if "rmtree" in action:
                    shutil.rmtree(action["rmtree"])
                if "unlink" in action:
                    Path(action["unlink"]).unlink()
        barrier()
        cfg, _ = load_config(run["config"])
        overrides = run.get("overrides", {}).get(str(rank))
        if overrides:
            cfg = cfg.model_copy(update=overrides)
        print(f"[worker rank {rank}] run {run['name']} at {time.perf_counter() - T0:.1f}s", file=sys.stderr, flush=True)
        env = torchrun_env()
        train = dpo_distributed.train if cfg.rl is not None else sft_distributed.train  # as cli.cmd_train picks
        results[run["name"]] = train(cfg, env, distributed_mode(cfg, env))
        barrier()
    Path(plan["results"] + f".rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
