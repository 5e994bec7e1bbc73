"""The demo configs of examples/, copied with their data into tmp_path so that caches and reports stay there."""

import shutil
from pathlib import Path

import pytest
import yaml

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def demo(tmp_path):
    """demo("demo-tiny.yaml", bad_lines=[...], **keys) → the config copied into tmp_path, output_dir there; bad_lines
    are appended to its first dataset (numbered after the good ones)."""

    def make(name: str, bad_lines: list[str] = (), **keys) -> Path:
        if not (tmp_path / "data").exists():
            shutil.copytree(EXAMPLES / "data", tmp_path / "data")
        shutil.copy(EXAMPLES / "rewards.py", tmp_path)
        cfg = yaml.safe_load((EXAMPLES / name).read_text(encoding="utf-8"))
        cfg.update({"output_dir": "out"}, **keys)
        data = tmp_path / cfg["datasets"][0]["path"]
        with open(data, "a", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in bad_lines)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        return path

    return make
