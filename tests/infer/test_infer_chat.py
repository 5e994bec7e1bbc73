"""`magistune chat`: streaming, thinking shown apart, the commands, multi-line input; in process and as a CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from adapter_helpers import save_adapter
from infer_helpers import ANSWER_TEXT, THINKING_TEXT
from magistune.cli import main
from magistune.infer.chat import DIM, RESET, Session, Style, read_message, run_chat
from magistune.infer.sampling import SamplingOptions

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


class Recorder:
    """A stdout that remembers every write and every flush."""

    def __init__(self):
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        self.flushes += 1

    @property
    def text(self) -> str:
        return "".join(self.writes)


def lines(*items: str):
    queue = list(items)

    def read(prompt: str) -> str:
        if not queue:
            raise EOFError
        return queue.pop(0)

    return read


def test_multi_line_input():
    assert read_message(lines("one \\", "two \\", "three")) == "one \ntwo \nthree"
    assert read_message(lines('"""', "a", "", "b", '"""', "after")) == "a\n\nb"
    assert read_message(lines()) is None


def test_streams_thinking_dimmed_then_the_answer(scripted):
    out = Recorder()
    run_chat(scripted, SamplingOptions(seed=0), Style(color=True), read_line=lines("Hi"), out=out)
    text = out.text
    assert f"{DIM}{THINKING_TEXT}{RESET}\n{ANSWER_TEXT}\n" in text
    # Streaming: each token of the answer is its own write, flushed as it comes.
    answer_writes = out.writes[out.writes.index(f"{RESET}\n") + 1:]
    assert "".join(answer_writes).startswith(ANSWER_TEXT)
    assert len([w for w in answer_writes if w.strip()]) >= 2
    assert out.flushes >= len(out.writes) - 2


def test_hide_thinking_and_plain_markers(scripted):
    out = Recorder()
    run_chat(scripted, SamplingOptions(seed=0), Style(color=False, hide_thinking=True), read_line=lines("Hi"), out=out)
    assert "[thinking… 3 tokens]\n" + ANSWER_TEXT in out.text  # "Let me think" is 3 tokens
    assert THINKING_TEXT not in out.text and DIM not in out.text
    out = Recorder()
    run_chat(scripted, SamplingOptions(seed=0), Style(color=False), read_line=lines("Hi"), out=out)
    assert f"--- thinking ---\n{THINKING_TEXT}\n--- answer ---\n{ANSWER_TEXT}" in out.text


def test_commands_change_the_session(scripted):
    session = Session()
    out = Recorder()
    script = lines("Hi", "/system Be brief.", "Again", "/system", "/bogus", "/reset", "/help", "/quit", "never read")
    assert run_chat(scripted, SamplingOptions(seed=0), Style(color=False), out=out, read_line=script, session=session) == 0
    assert session.history == [] and session.system is None
    for expected in ("system prompt set: Be brief.", "system prompt removed", "unknown command /bogus",
                     "conversation reset", "/reset"):
        assert expected in out.text


def test_history_keeps_answers_without_thinking(scripted):
    session = Session(system="S")
    run_chat(scripted, SamplingOptions(seed=0), Style(color=False), read_line=lines("Q1", "Q2"), out=Recorder(),
             session=session)
    assert session.history == [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": ANSWER_TEXT},
                               {"role": "user", "content": "Q2"}, {"role": "assistant", "content": ANSWER_TEXT}]


def test_unclosed_thinking_turn_is_not_kept(scripted):
    session, out = Session(), Recorder()
    run_chat(scripted, SamplingOptions(max_tokens=3), Style(color=False), read_line=lines("Hi"), out=out, session=session)
    assert "[thinking unclosed]" in out.text and "[stopped: max_tokens reached]" in out.text
    assert session.history == []


def test_chat_cli_with_the_adapter_in_output_dir(scripted_dir, tmp_path):
    """The CLI end to end: a config whose output_dir holds an adapter; stdin piped; every command used."""
    save_adapter(str(scripted_dir), tmp_path / "out", random_b=False)  # B = 0: the script is unchanged
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"base_model": str(scripted_dir), "datasets": [{"path": "unused.jsonl"}],
                                   "adapter": "lora", "lora_target_linear": True, "output_dir": "out",
                                   "system_prompt": "You are terse."}), encoding="utf-8")
    stdin = "\n".join(["Hello", "/system Be brief.", "two \\", "lines", '"""', "a block", '"""', "/reset",
                       "/quit", "not reached"]) + "\n"
    proc = subprocess.run([sys.executable, "-m", "magistune", "chat", str(cfg), "--color", "never", "--seed", "1",
                           "--max-tokens", "20"], input=stdin, capture_output=True, text=True, env=ENV, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert f"adapter {tmp_path / 'out'}" in out
    assert out.count(f"--- thinking ---\n{THINKING_TEXT}\n--- answer ---\n{ANSWER_TEXT}") == 3
    assert "system prompt set: Be brief." in out and "conversation reset" in out
    assert "not reached" not in out


def test_chat_cli_missing_adapter_or_model_fails_before_loading(tmp_path, capsys):
    assert main(["chat", "--model", "tiny-random", "--adapter", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "--adapter" in err and "folder not found" in err and "loading" not in err
    assert main(["chat", "--model", str(tmp_path / "no-model")]) == 2
    assert "model folder not found" in capsys.readouterr().err
