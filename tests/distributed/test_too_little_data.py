"""Fewer training items than processes: a config error on every rank before the model loads, not a crash.

One torchrun launch of 2 CPU processes (gloo) runs worker.py's plan: SFT whose 2 samples pack into 1 row, and DPO
with 1 pair. Each rank must return 2 (train/batches.check_share's ConfigError, printed as "error: …"), having
loaded no model and written no checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")]

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "worker.py"
BASE = {"base_model": "tiny-random", "sequence_len": 512, "val_set_size": 0, "bf16": False, "ddp_timeout": 60}
RUNS = {  # name: (data file, its first n records, keys)
    "sft_packed": ("demo.jsonl", 2, {"sample_packing": True, "fsdp": True}),
    "dpo": ("demo_dpo.jsonl", 1, {"rl": "dpo", "adapter": "lora", "lora_target_linear": True, "ddp": True}),
}


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    root = tmp_path_factory.mktemp("too_little")
    plan = []
    for name, (data, n, keys) in RUNS.items():
        lines = [line for line in (ROOT / "examples" / "data" / data).read_text(encoding="utf-8").splitlines()
                 if line.strip()][:n]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        cfg = {**BASE, **keys, "datasets": [{"path": f"{name}.jsonl"}], "output_dir": f"out_{name}",
               "dataset_prepared_path": f"prepared_{name}"}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
        plan.append({"name": name, "config": str(root / f"{name}.yaml")})
    (root / "plan.json").write_text(json.dumps({"runs": plan, "results": str(root / "results")}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(WORKER), str(root / "plan.json")], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    ranks = [json.loads(f.read_text()) if (f := root / f"results.rank{r}.json").is_file() else None for r in range(2)]
    return {"root": root, "log": proc.stdout + proc.stderr, "rc": proc.returncode, "ranks": ranks}


def test_every_rank_stops_with_a_config_error(launch):
    assert launch["rc"] == 0, launch["log"][-4000:]  # the worker finished its plan: no rank crashed
    assert launch["ranks"] == [{name: 2 for name in RUNS}] * 2, launch["log"][-4000:]
    assert "Traceback" not in launch["log"] and "ZeroDivisionError" not in launch["log"]


@pytest.mark.parametrize("name,message", [
    ("sft_packed", "1 training row after sample packing for 2 processes: each needs at least one per epoch. Add "
                   "training data, run fewer processes (--nproc), or set sample_packing: false or a shorter "
                   "sequence_len (fewer samples per packed row)"),
    ("dpo", "1 training pair for 2 processes: each needs at least one per epoch. Add training pairs, lower "
            "val_set_size, or run fewer processes (--nproc)"),
])
def test_the_message_says_how_many_for_how_many_and_what_to_do(launch, name, message):
    log = launch["log"]
    start = log.index(f"[worker rank 0] run {name} at")
    end = log.find("[worker rank 0] run ", start + 1)
    part = log[start:end if end >= 0 else len(log)]
    assert part.count(f"error: {message}\n") == 2 and f"[rank 1] error: {message}\n" in part, part  # both ranks
    assert "model:" not in part  # stopped before the model loads
    assert not (launch["root"] / f"out_{name}").exists() or not any((launch["root"] / f"out_{name}").glob("checkpoint-*"))
