"""bench/report.py: the three-side table (magistune, the stock stack, Unsloth), its versions line and its ratio
arithmetic, on rows in the format train_step.py and unsloth_step.py write."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from report import label, ratio, ratio_lines, table, versions_line  # noqa: E402

BASE = {"image_px": None, "layers": 40, "attn": "sdpa", "packing": False, "random_lengths": False,
        "packing_efficiency": None, "padding_share": None, "cce": False, "offload": False, "dropout": 0.05,
        "liger": False, "compile": False, "tiled_mlp": 0, "no_ckpt": 0, "profiled": False, "steps": 3,
        "weights_gib": 13.18, "build_s": 2.0, "gpu": "NVIDIA H200", "torch": "2.11.0+cu130",
        "transformers": "5.17.0", "peft": "0.21.0", "bitsandbytes": "0.50.2", "date": "2026-12-02"}


def row(side, tok_s, peak, mbs=2, accum=4, seq=2048, **kw):
    return {**BASE, "side": side, "tokens_per_s": tok_s, "peak_gib": peak, "mbs": mbs, "accum": accum, "seq": seq,
            **kw}


def three_sides():
    u = {"unsloth": "2026.10.9", "unsloth_zoo": "2026.10.9", "trl": "1.15.0", "datasets": "4.8.5"}
    return [row("magistune", 3000.0, 18.0, magistune="0.1.0+abc1234"), row("reference", 2400.0, 22.5),
            row("unsloth", 3750.0, 17.0, **u), row("unsloth", 4000.0, 16.0, dropout=0.0, **u),
            row("magistune", 3200.0, 18.0, magistune="0.1.0+abc1234"),  # a repeat: means are compared
            row("magistune", 2000.0, 16.0, mbs=1, accum=1), row("reference", 2500.0, 20.0, mbs=1, accum=1)]


def test_ratio_is_the_quotient_of_means():
    mine = [row("magistune", 3000.0, 18.0), row("magistune", 3200.0, 18.5)]
    theirs = [row("reference", 2400.0, 22.5)]
    a, b, x, m = ratio(mine, theirs)
    assert (a, b) == (3100.0, 2400.0)
    assert x == pytest.approx(3100 / 2400) and m == pytest.approx(18.25 / 22.5)
    assert ratio([row("magistune", 10.0, None)], theirs)[3] is None  # a CPU row has no peak


def test_ratio_lines_per_shape_against_stock_and_each_unsloth():
    lines = ratio_lines(three_sides()).strip().splitlines()[1:]
    assert lines == [
        "- seq 2048, 2 × 4, 40 layers: magistune / stock = 1.29× tok/s (3,100 / 2,400), peak 0.80×",
        "- seq 2048, 2 × 4, 40 layers: magistune / unsloth = 0.83× tok/s (3,100 / 3,750), peak 1.06×",
        "- seq 2048, 2 × 4, 40 layers: magistune / unsloth dropout 0.0 = 0.78× tok/s (3,100 / 4,000), peak 1.12×",
        "- seq 2048, 1 × 1, 40 layers: magistune / stock = 0.80× tok/s (2,000 / 2,500), peak 0.80×",
    ]


def test_ratio_lines_leave_out_other_kinds_of_rows():
    rows = [row("magistune", 3000.0, 18.0, packing=True, random_lengths=True, packing_efficiency=0.99),
            row("reference", 2400.0, 22.5), row("magistune", 3000.0, 18.0, seq=4096)]
    assert ratio_lines(rows) == ""  # packed rows are not the fixed-length shape; a lone shape has nothing to divide


def test_versions_name_each_side_s_packages():
    line = versions_line(three_sides())
    assert "magistune: magistune 0.1.0+abc1234, torch 2.11.0+cu130" in line
    assert "stock: transformers 5.17.0, peft 0.21.0, bitsandbytes 0.50.2" in line
    assert "unsloth: unsloth 2026.10.9, unsloth_zoo 2026.10.9, transformers 5.17.0" in line and "trl 1.15.0" in line
    assert versions_line([row("reference", 1.0, 1.0)]).startswith("Versions: stock: ")


def test_table_has_every_row_the_ratios_and_the_unsloth_note():
    md = table(three_sides())
    assert md.count("\n| unsloth") == 2 and "| unsloth dropout 0.0 | 2048 | 2 × 4 | 4,000 | 16.0 |" in md
    assert "Ratios" in md and "*unsloth*:" in md and "Versions:" in md
    assert label(three_sides()[3]) == "unsloth dropout 0.0"
