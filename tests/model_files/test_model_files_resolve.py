from __future__ import annotations

import uuid

import pytest
from magistune.model_files import ModelError, materialize_tiny, resolve_model_dir


def test_tiny_names_resolve_to_model_folders():
    for name in ("tiny-random", "tiny-random-vision"):
        d = resolve_model_dir(name)
        assert d == materialize_tiny(name) and (d / "config.json").is_file()


def test_local_folder_relative_to_the_config(tmp_path, text_dir):
    (tmp_path / "cfgdir").mkdir()
    (tmp_path / "cfgdir" / "m").symlink_to(text_dir, target_is_directory=True)
    assert resolve_model_dir("m", config_dir=tmp_path / "cfgdir") == tmp_path / "cfgdir" / "m"
    assert resolve_model_dir(str(text_dir)) == text_dir


@pytest.mark.parametrize("name", ["/nonexistent/magistune/model", "./missing-model", "a/b/c"])
def test_missing_folder(name, tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        resolve_model_dir(name, config_dir=tmp_path)


def test_folder_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=r"no config\.json") as e:
        resolve_model_dir(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_native_mistral_layout_without_weights_is_refused_clearly(tmp_path):
    (tmp_path / "params.json").write_text("{}")  # a broken native folder: no usable params or weights
    (tmp_path / "consolidated.safetensors").write_bytes(b"")
    with pytest.raises(Exception, match="no tekken.json") as e:
        resolve_model_dir(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_hub_id_not_in_local_cache():
    repo = f"magistune-test/absent-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ModelError, match="not in the local Hugging Face cache.*no hub access.*local model folder") as e:
        resolve_model_dir(repo)
    assert repo in str(e.value)


def test_hub_id_found_in_local_cache(tmp_path, monkeypatch, text_dir):
    from huggingface_hub import constants

    # The cache layout huggingface_hub itself writes: models--<owner>--<name>/{refs/main, snapshots/<commit>/}.
    commit = "0" * 40
    snap = tmp_path / "models--someone--tiny" / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text(commit)
    (snap / "config.json").write_bytes((text_dir / "config.json").read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_model_dir("someone/tiny").resolve() == snap.resolve()
