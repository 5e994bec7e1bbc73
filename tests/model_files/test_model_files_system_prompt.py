"""The default system prompt: SYSTEM_PROMPT.txt of the model folder, and what overrides it."""

from __future__ import annotations

import pytest

from magistune.config import ConfigError, parse_config
from magistune.model_files import system_prompt as sp
from magistune.model_files.system_prompt import resolve_system_prompt, system_message

# The shape of Magistral Small 2509's SYSTEM_PROMPT.txt: text, a [THINK]…[/THINK] template, text.
MAGISTRAL_LIKE = "First draft your thinking.\n\nTemplate:[THINK]Your thoughts.[/THINK]Here, the answer."


def cfg_for(base_model, tmp_path, **keys):
    return parse_config({"base_model": str(base_model), "datasets": [{"path": "x"}], **keys},
                        config_dir=tmp_path)[0]


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "SYSTEM_PROMPT.txt").write_text(MAGISTRAL_LIKE + "\n", encoding="utf-8")
    return folder


def test_the_model_folder_supplies_the_default(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sp, "_noted", set())
    assert resolve_system_prompt(cfg_for(model_dir, tmp_path)) == MAGISTRAL_LIKE
    assert resolve_system_prompt(cfg_for("model", tmp_path)) == MAGISTRAL_LIKE  # relative to the config's folder
    err = capsys.readouterr().err
    assert err.count("note: system prompt:") == 1 and "SYSTEM_PROMPT.txt" in err  # one line, once


def test_explicit_choices_win(model_dir, tmp_path):
    assert resolve_system_prompt(cfg_for(model_dir, tmp_path, system_prompt="")) is None  # "" turns it off
    assert resolve_system_prompt(cfg_for(model_dir, tmp_path, system_prompt="Be brief.")) == "Be brief."
    (tmp_path / "p.txt").write_text("From a file.\n", encoding="utf-8")
    assert resolve_system_prompt(cfg_for(model_dir, tmp_path, system_prompt_file="p.txt")) == "From a file."
    with pytest.raises(ConfigError, match="system_prompt_file: .*nope.txt not found"):
        resolve_system_prompt(cfg_for(model_dir, tmp_path, system_prompt_file="nope.txt"))


def test_no_file_no_prompt(tmp_path):
    assert resolve_system_prompt(cfg_for("tiny-random", tmp_path)) is None
    assert resolve_system_prompt(cfg_for(tmp_path, tmp_path)) is None
    assert resolve_system_prompt(cfg_for("mistralai/NotInTheCache-1", tmp_path)) is None


def test_inference_folders_come_first(model_dir, tmp_path):
    trained = tmp_path / "out"
    trained.mkdir()
    (trained / "SYSTEM_PROMPT.txt").write_text("Kept with the adapter.", encoding="utf-8")
    cfg = cfg_for(model_dir, tmp_path)
    assert resolve_system_prompt(cfg, [trained, model_dir]) == "Kept with the adapter."
    assert resolve_system_prompt(cfg, [None, model_dir]) == MAGISTRAL_LIKE


def test_system_message_splits_the_think_template():
    """As Mistral's model card sends it: text, a closed thinking part, text (so [THINK] is the control token)."""
    assert system_message(MAGISTRAL_LIKE, supports_thinking=True)["content"] == [
        {"type": "text", "text": "First draft your thinking.\n\nTemplate:"},
        {"type": "thinking", "thinking": "Your thoughts.", "closed": True},
        {"type": "text", "text": "Here, the answer."},
    ]
    assert system_message(MAGISTRAL_LIKE, supports_thinking=False)["content"] == MAGISTRAL_LIKE
    assert system_message("Be brief.", supports_thinking=True) == {"role": "system", "content": "Be brief."}
