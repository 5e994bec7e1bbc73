"""Ulysses sequence parallelism on 2 CPU processes (gloo) equals the one-process full-sequence run.

sp_worker.py computes, on 2 ranks that each hold half of every row, the summed loss and the LoRA gradients of a
tiny checkpointed model (unpacked rows of odd length, padded; a packed row of 3 samples), sums them over the group
and writes them; this test computes the same with the whole rows in one process (loss.token_loss_sum). Tolerance:
fp32 throughout, the only differences are summation orders (attention over a gathered sequence, the loss split in
two sums): rtol 1e-4, atol 1e-6 on values of order 1e-3…1.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sp_worker  # noqa: E402


@pytest.fixture(scope="module")
def sp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "sp_worker.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {name: load_file(str(out / f"{name}.safetensors")) for name in ("plain", "packed")}


@pytest.mark.parametrize("name", ["plain", "packed"])
def test_two_slices_give_the_one_process_loss_and_gradients(sp_results, name):
    from magistune.train.loss import token_loss_sum

    model = sp_worker.make_model()
    batch = sp_worker.make_batches()[name]
    loss_sum = token_loss_sum(model, batch)
    (loss_sum / batch.n_trained).backward()
    got = sp_results[name]
    torch.testing.assert_close(got["loss_sum"][0], loss_sum.detach(), rtol=1e-4, atol=1e-6)
    grads = sp_worker.trainable(model)
    assert {f"grad.{n}" for n in grads} == set(got) - {"loss_sum"}
    for n, p in grads.items():
        assert p.grad.abs().max() > 0  # a gradient that can differ
        torch.testing.assert_close(got[f"grad.{n}"], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
