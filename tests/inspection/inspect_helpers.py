"""Helpers shared by the inspect tests."""

import json
from html.parser import HTMLParser
from pathlib import Path

import yaml


def first_record(config: Path) -> dict:
    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    with open(config.parent / cfg["datasets"][0]["path"], encoding="utf-8") as f:
        return json.loads(f.readline())


def assistant_text(record: dict) -> str:
    """What the first assistant message of a demo record trains: its thinking, its text, then </s>."""
    m = next(m for m in record["messages"] if m["role"] == "assistant")
    thinking = f"[THINK]{m['reasoning_content']}[/THINK]" if m.get("reasoning_content") else ""
    return thinking + m["content"] + "</s>"


class Dom(HTMLParser):
    """What the test reads: the body's attributes, the samples with their tokens, the rejected rows, #shown."""

    def __init__(self, html: str):
        super().__init__()
        self.body, self.samples, self.rejected, self.shown = {}, [], [], ""
        self._stack: list[tuple[str, dict]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "body":
            self.body = a
        elif tag == "div" and "sample" in classes:
            self.samples.append({"source": a["data-source"], "hidden": "hidden" in a, "tokens": [], "seqs": [],
                                 "images": 0})
        elif tag == "div" and "seq" in classes:
            self.samples[-1]["seqs"].append(a["data-name"])
        elif tag == "img" and self.samples:
            self.samples[-1]["images"] += 1
        elif tag == "tr" and "rejected" in classes:
            self.rejected.append(a["data-source"])
        elif tag == "span" and "data-id" in a and self.samples:
            self.samples[-1]["tokens"].append([classes, ""])
        if tag not in ("br", "img", "input", "meta", "rect", "path"):
            self._stack.append((tag, a))

    def handle_endtag(self, tag):
        if self._stack:
            self._stack.pop()

    def handle_data(self, data):
        if not self._stack:
            return
        tag, a = self._stack[-1]
        if tag == "span" and "data-id" in a:
            self.samples[-1]["tokens"][-1][1] += data
        elif a.get("id") == "shown":
            self.shown += data
