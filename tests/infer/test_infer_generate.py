"""`magistune generate`: batched rows with thinking parsed on ids; bad rows reported with file:line."""

from __future__ import annotations

import json

from infer_helpers import ANSWER_TEXT, THINKING_TEXT
from magistune.cli import main

GOOD = {"messages": [{"role": "user", "content": "Hi"}]}


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def read_rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_generate_file_with_bad_rows(scripted_dir, tmp_path, capsys):
    src = write_rows(tmp_path / "prompts.jsonl", [
        {"id": 1, **GOOD},
        "{not json",
        "",  # blank lines are skipped, and still counted in line numbers
        {"id": 4, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"id": 5, "answer": "reference", "messages": [{"role": "system", "content": "S"},
                                                      {"role": "user", "content": "Longer question, padded left?"}]},
        {"id": 6, "messages": "oops"},
        {"id": 7, **GOOD},
    ])
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--model", str(scripted_dir), "--input", str(src), "--output", str(out),
               "--batch-size", "2", "--seed", "0"])
    assert rc == 1  # some rows failed; the others ran
    rows = read_rows(out)
    assert [r.get("id") for r in rows] == [1, None, 4, 5, 6, 7]
    for r in (rows[0], rows[3], rows[5]):
        assert (r["thinking"], r["answer"], r["finish_reason"], r["thinking_unclosed"]) == \
            (THINKING_TEXT, ANSWER_TEXT, "stop", False)
        assert r["tokens"] == 1 + 3 + 1 + 2 + 1  # [THINK] Let me think [/THINK] Hello world </s>
    assert rows[3]["input_answer"] == "reference" and rows[3]["messages"][0]["content"] == "S"
    assert rows[1]["source"] == f"{src}:2" and rows[1]["error"].startswith("bad_json")
    assert rows[2]["source"] == f"{src}:4" and rows[2]["error"].startswith("last_not_user")
    assert rows[4]["source"] == f"{src}:6" and rows[4]["error"].startswith("no_messages")
    err = capsys.readouterr().err
    assert f"{src}:2: bad_json" in err and f"{src}:4: last_not_user" in err and "3 failed" in err


def test_unclosed_thinking_at_max_tokens(scripted_dir, tmp_path):
    src = write_rows(tmp_path / "p.jsonl", [GOOD])
    out = tmp_path / "o.jsonl"
    assert main(["generate", "--model", str(scripted_dir), "--input", str(src), "--output", str(out),
                 "--max-tokens", "3", "--temperature", "0"]) == 0
    (row,) = read_rows(out)
    assert (row["thinking"], row["answer"], row["finish_reason"], row["thinking_unclosed"], row["tokens"]) == \
        ("Let me", "", "length", True, 3)


def test_missing_paths_fail_before_loading(tmp_path, capsys):
    src = write_rows(tmp_path / "p.jsonl", [GOOD])
    assert main(["generate", "--model", str(tmp_path / "none"), "--input", str(src), "--output", "x"]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny-random", "--input", str(tmp_path / "none.jsonl"), "--output", "x"]) == 2
    assert "--input" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base_model: tiny-random\ndatasets: [{path: d.jsonl}]\nadapter: lora\nlora_target_linear: true\n"
                   "output_dir: empty\n", encoding="utf-8")
    assert main(["generate", str(cfg), "--input", str(src), "--output", "x"]) == 2
    assert "holds no trained model" in capsys.readouterr().err


def test_invalid_utf8_line_is_one_bad_row_and_bom_is_fine(scripted_dir, tmp_path, capsys):
    src = tmp_path / "prompts.jsonl"
    good = json.dumps({"id": 1, **GOOD}).encode()
    bad = b'{"id": 2, "messages": [{"role": "user", "content": "caf\xe9"}]}'
    src.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + bad + b"\n" + json.dumps({"id": 3, **GOOD}).encode() + b"\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(scripted_dir), "--input", str(src), "--output", str(out),
                 "--temperature", "0"]) == 1
    rows = read_rows(out)
    assert [r.get("id") for r in rows] == [1, None, 3]  # the BOM line ran
    assert rows[0]["answer"] == ANSWER_TEXT and rows[2]["answer"] == ANSWER_TEXT
    assert rows[1]["source"] == f"{src}:2" and rows[1]["error"].startswith("invalid_utf8: not valid UTF-8")
    assert f"{src}:2: invalid_utf8" in capsys.readouterr().err


def test_output_may_not_be_the_input(tmp_path, capsys):
    src = write_rows(tmp_path / "p.jsonl", [GOOD])
    before = src.read_bytes()
    (tmp_path / "sub").mkdir()
    for output in (str(src), str(tmp_path / "sub" / ".." / "p.jsonl")):
        assert main(["generate", "--model", "tiny-random", "--input", str(src), "--output", output]) == 2
        assert "is the --input file" in capsys.readouterr().err
    (tmp_path / "link.jsonl").symlink_to(src)
    assert main(["generate", "--model", "tiny-random", "--input", str(src), "--output", str(tmp_path / "link.jsonl")]) == 2
    assert "is the --input file" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny-random", "--input", str(src), "--output", str(tmp_path / "sub")]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_utf16_input_refused_before_loading(tmp_path, capsys):
    src = tmp_path / "p.jsonl"
    src.write_bytes((json.dumps(GOOD) + "\n").encode("utf-16"))
    assert main(["generate", "--model", str(tmp_path / "none"), "--input", str(src), "--output", str(tmp_path / "o")]) == 2
    assert "the file is UTF-16" in capsys.readouterr().err
