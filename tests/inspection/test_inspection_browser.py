"""The HTML report as a person sees it: rendered by headless Chromium (Debian's `chromium`), screenshotted, and its
DOM (after the page's script ran) checked: the samples, sample 1's trained spans, a rejected record's line, search."""

import os
import shutil
import subprocess

import pytest
from inspect_helpers import Dom, assistant_text, first_record
from PIL import Image

from magistune.cli import main

pytestmark = pytest.mark.usefixtures("fast_tokenizers")

BAD = '{"messages": [{"role": "user", "content": "hi"}]}'  # no assistant answer: rejected
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def _find_chromium():
    return next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and os.path.exists(p)), None)


@pytest.fixture(scope="session")
def chromium():
    """Chromium's path; installed with apt-get where missing (scripts/setup.sh does it first in CI, as root)."""
    path = _find_chromium()
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
        if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
            subprocess.run(install, env=env, capture_output=True, check=False)
        path = _find_chromium()
    if path is None:
        pytest.skip("chromium is not installed and could not be installed (needs Debian's apt-get as root)")
    return path


def run_chromium(chromium, tmp_path, *args) -> str:
    out = subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def trained_spans(sample) -> list[str]:
    spans, previous = [], False
    for classes, text in sample["tokens"]:
        trained = classes[0] == "t"
        if trained:
            spans.append(text) if not previous else spans.append(spans.pop() + text)
        previous = trained
    return spans


def test_the_report_in_chromium(demo, chromium, tmp_path, capsys):
    config = demo("demo-tiny.yaml", bad_lines=[BAD])
    report = tmp_path / "report.html"
    assert main(["inspect", str(config), "--html", str(report)]) == 0
    assert "wrote " in capsys.readouterr().out
    shot = tmp_path / "report.png"  # one run: the screenshot, and the DOM after the page's script ran
    dom = Dom(run_chromium(chromium, tmp_path, "--virtual-time-budget=2000", f"--screenshot={shot}",
                           "--window-size=1280,2000", "--dump-dom", report.as_uri()))

    assert dom.body.get("data-ready") == "1"  # the page's script ran
    assert len(dom.samples) == int(dom.body["data-samples"]) == 40 == int(dom.shown)
    assert dom.samples[0]["source"] == "data/demo.jsonl:1"
    assert trained_spans(dom.samples[0]) == [assistant_text(first_record(config))]
    assert dom.rejected == ["data/demo.jsonl:41"]

    # a person's search: a source, then a word (the link fills in the boxes)
    by_source = Dom(run_chromium(chromium, tmp_path, "--virtual-time-budget=2000", "--dump-dom",
                                 report.as_uri() + "#source=demo.jsonl:3"))
    assert [s["source"] for s in by_source.samples if not s["hidden"]] == ["data/demo.jsonl:3"]
    tokyo = [n for n, line in enumerate((config.parent / "data" / "demo.jsonl").read_text().splitlines(), 1)
             if "tokyo" in line.lower() and line != BAD]
    by_text = Dom(run_chromium(chromium, tmp_path, "--virtual-time-budget=2000", "--dump-dom",
                               report.as_uri() + "#q=tokyo"))
    assert [s["source"] for s in by_text.samples if not s["hidden"]] == [f"data/demo.jsonl:{n}" for n in tokyo]
    assert int(by_text.shown) == len(tokyo) > 0

    with Image.open(shot) as img:
        assert img.size == (1280, 2000)
        colours = {c for _, c in img.convert("RGB").getcolors(1 << 20)}
    assert (0xD4, 0xF5, 0xDC) in colours  # the trained tokens' background is on screen
    assert (0x4A, 0x7F, 0xC1) in colours  # and the plots' bars
