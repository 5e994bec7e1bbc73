"""check_writable_dir: creates what is missing, leaves nothing behind, names the key and the part that is wrong."""

from pathlib import Path

import pytest

from magistune.config import ConfigError
from magistune.paths import check_writable_dir


def test_creates_missing_folders_and_leaves_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    check_writable_dir(target, "output_dir")
    assert target.is_dir() and list(target.iterdir()) == []


def test_a_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("keep", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^output_dir: .*/f is a file, not a folder$"):
        check_writable_dir(tmp_path / "f", "output_dir")
    with pytest.raises(ConfigError, match=r"^dataset_prepared_path: .*/f is a file, not a folder \(needed for .*/f/x/y\)$"):
        check_writable_dir(tmp_path / "f" / "x" / "y", "dataset_prepared_path")
    assert (tmp_path / "f").read_text(encoding="utf-8") == "keep"


def test_unwritable(tmp_path):
    with pytest.raises(ConfigError, match=r"^output_dir: /proc/magistune-x is not writable \("):
        check_writable_dir(Path("/proc/magistune-x"), "output_dir")
