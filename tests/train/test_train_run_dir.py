"""output_dir belongs to one run: the lock (released by the OS on a crash), an earlier run refused or replaced,
the user's own config.yaml never overwritten (issue 12, items 2, 3 and 7)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from magistune.config import Config, ConfigError
from magistune.train import run_dir
from magistune.train.preflight import preflight


def cfg(tmp_path: Path, **kw) -> Config:
    (tmp_path / "d.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                      '{"role": "assistant", "content": "yo"}]}\n')
    return Config(base_model="tiny-random", datasets=[{"path": "d.jsonl"}], config_dir=tmp_path,
                  output_dir=str(tmp_path / "out"), **kw)


def test_a_second_lock_is_refused_with_the_first_runs_pid(tmp_path):
    first = run_dir.lock_output_dir(tmp_path)
    with pytest.raises(ConfigError, match=rf"in use by another magistune run \(pid {os.getpid()} on .*, started "):
        run_dir.lock_output_dir(tmp_path)
    first.release()
    run_dir.lock_output_dir(tmp_path).release()


def test_the_lock_of_a_killed_run_is_released_by_the_os(tmp_path):
    code = (f"from pathlib import Path; from magistune.train.run_dir import lock_output_dir; "
            f"lock = lock_output_dir(Path({str(tmp_path)!r})); print('locked', flush=True); import time; time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match=f"pid {proc.pid}"):
        run_dir.lock_output_dir(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir.lock_output_dir(tmp_path).release()


def test_preflight_locks_only_in_the_main_process(tmp_path):
    c = cfg(tmp_path)
    pre = preflight(c)
    with pytest.raises(ConfigError, match="in use by another magistune run"):
        preflight(c)
    preflight(c, main=False)  # torchrun's other ranks: no lock, so no rank is refused or waits
    pre.release()
    preflight(c).release()


def test_an_earlier_run_is_listed(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "config.yaml").write_text(run_dir.CONFIG_HEADER + ": ...\nbase_model: x\n")
    (out / "notes.txt").write_text("the user's own file")
    assert [p.name for p in run_dir.earlier_run(out)] == ["checkpoint-4", "config.yaml", "metrics.jsonl"]
    with pytest.raises(ConfigError, match="holds an earlier run .*resume_from_checkpoint: auto.*overwrite_output_dir"):
        run_dir.claim_output_dir(cfg(tmp_path))
    notes = run_dir.claim_output_dir(cfg(tmp_path, overwrite_output_dir=True))
    assert "deleted the earlier run's checkpoint-4, config.yaml, metrics.jsonl" in notes[0]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_resume_and_overwrite_together_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="set one of them"):
        run_dir.claim_output_dir(cfg(tmp_path, overwrite_output_dir=True, resume_from_checkpoint="auto"))
