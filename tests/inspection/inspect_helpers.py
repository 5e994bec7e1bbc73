"""Helpers shared by the inspect tests."""

import json
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
