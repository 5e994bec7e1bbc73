import json
import math

from magistune.train.metrics import MetricsLogger, plot_losses, read_metrics


def test_resume_cuts_rows_after_the_checkpoint_and_torn_lines(tmp_path):
    log = MetricsLogger(tmp_path, start_step=0, total_steps=5, show_progress=False)
    for step in range(1, 5):
        log.log_train(step, loss=1.0 / step, lr=0.1)
    log.log_eval(2, 0.5, 10)
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss"')  # a run killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 2]

    log = MetricsLogger(tmp_path, start_step=2, total_steps=5, show_progress=False)  # resumed at checkpoint-2
    log.log_train(3, loss=float("nan"), lr=0.1)
    log.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], "eval_loss" in r) for r in rows] == [(1, False), (2, False), (2, True), (3, False)]
    assert rows[-1]["loss"] is None  # NaN is not JSON: null
    assert rows[2]["eval_ppl"] == math.exp(0.5)
    assert all(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())


def test_fresh_start_replaces_old_rows_and_plots(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9}\n')
    log = MetricsLogger(tmp_path, start_step=0, total_steps=2, show_progress=False)
    log.log_train(1, loss=3.0)
    log.log_train(2, loss=2.0)
    log.close()
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [3.0, 2.0]
    png = plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
