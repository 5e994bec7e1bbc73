"""`magistune validate-data`, `preprocess` and `config-schema`, in process (fast) and once as a real command."""

import json
import os
import subprocess
import sys

import pytest

from magistune.cli import main
from magistune.data.encode import ConversationEncoder
from magistune.data.records import RecordOptions, parse_record

pytestmark = pytest.mark.usefixtures("fast_tokenizers")


def conv(q, a, **assistant_keys):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a, **assistant_keys}]}


GOOD = [conv("2+2?", "4"), conv("3+3?", "6", reasoning_content="Three plus three is six, because three doubled is six."), conv("Capital of France?", "Paris.")]
WITH_BAD = [GOOD[0], conv("x", "y", weight=2), GOOD[1], '{"messages": ', GOOD[2]]


def test_validate_data_all_good(tmp_path, write_jsonl, write_config, capsys):
    write_jsonl(tmp_path / "data.jsonl", GOOD)
    assert main(["validate-data", str(write_config())]) == 0
    out = capsys.readouterr().out
    assert "records: 3\nvalid: 3\nrejected: 0\n" in out
    assert "kept samples: 3 (train 3, eval 0)" in out


def test_validate_data_reports_bad_records(tmp_path, write_jsonl, write_config, capsys):
    write_jsonl(tmp_path / "data.jsonl", WITH_BAD)
    code = main(["validate-data", str(write_config(sequence_len=16))])
    out = capsys.readouterr().out
    assert code != 0
    assert "records: 5\nvalid: 3\nrejected: 2\n" in out
    assert "  bad_weight: 1\n" in out and "  invalid_json: 1\n" in out
    assert "data.jsonl:2: bad_weight: messages[1].weight must be 0 or 1, got 2" in out
    assert "data.jsonl:4: invalid_json: invalid JSON" in out
    # one of the good samples is longer than 16 tokens: dropped, and listed with its location
    assert "dropped for length (> 16 tokens or nothing trained after truncation): 1" in out
    assert "data.jsonl:3: " in out
    line = next(ln for ln in out.splitlines() if ln.startswith("tokens: "))
    total, trained = [int(x.replace(",", "")) for x in line.split() if x.replace(",", "").isdigit()][:2]
    assert 0 < trained < total
    assert "length histogram (tokens per valid sample):" in out
    assert "#" in out.split("length histogram")[1]


def test_validate_data_does_not_write_a_cache(tmp_path, write_jsonl, write_config, capsys):
    write_jsonl(tmp_path / "data.jsonl", GOOD)
    main(["validate-data", str(write_config())])
    assert not (tmp_path / "out" / "prepared").exists()


def test_validate_data_unreadable_dataset(tmp_path, write_config, capsys):
    assert main(["validate-data", str(write_config())]) == 2
    assert "error: data.jsonl: dataset file not found" in capsys.readouterr().err


def test_validate_data_corrupt_tokenizer(tmp_path, write_jsonl, write_config, capsys):
    write_jsonl(tmp_path / "data.jsonl", GOOD)
    (tmp_path / "tekken.json").write_text("{", encoding="utf-8")
    assert main(["validate-data", str(write_config(tokenizer_path="tekken.json"))]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'tekken.json'}: not a mistral-common tokenizer file" in err


def test_bad_config_exits_2(tmp_path, write_config, capsys):
    assert main(["validate-data", str(write_config(learning_rat=1))]) == 2
    assert "error: " in capsys.readouterr().err
    assert main(["preprocess", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_notes_go_to_stderr(tmp_path, write_jsonl, write_config, capsys):
    write_jsonl(tmp_path / "data.jsonl", GOOD)
    assert main(["validate-data", str(write_config(activation_offloading=True, wandb_project=None))]) == 0
    err = capsys.readouterr().err
    assert "note: activation_offloading: turns gradient_checkpointing on" in err
    assert "note: wandb_project: ignored" in err


def test_preprocess_writes_the_cache_and_dumps(tmp_path, write_jsonl, write_config, capsys, tiny_tok):
    write_jsonl(tmp_path / "data.jsonl", GOOD)
    cfg = write_config(val_set_size=1)
    dump = tmp_path / "dump.jsonl"
    assert main(["preprocess", str(cfg), "--dump", str(dump)]) == 0
    captured = capsys.readouterr()
    assert "tokenising data.jsonl" in captured.err  # progress
    assert f"cache: {tmp_path / 'out' / 'prepared'} (written)" in captured.out
    assert "kept samples: 3 (train 2, eval 1)" in captured.out
    assert f"dumped 3 samples to {dump}" in captured.out
    entries = [p for p in (tmp_path / "out" / "prepared").iterdir()]
    assert len(entries) == 1 and (entries[0] / "tokens.npz").is_file()

    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert all(set(r) == {"source", "input_ids", "labels"} for r in rows)
    assert sorted(r["source"] for r in rows) == ["data.jsonl:1", "data.jsonl:2", "data.jsonl:3"]
    encoder = ConversationEncoder(tiny_tok)
    for r in rows:
        record = GOOD[int(r["source"].split(":")[1]) - 1]
        ids, labels, _ = encoder.encode(parse_record(record, RecordOptions()))
        assert (r["input_ids"], r["labels"]) == (ids, labels)

    # the second run reuses the cache: no tokenising, same dump
    first_dump = dump.read_text()
    assert main(["preprocess", str(cfg), "--dump", str(dump)]) == 0
    captured = capsys.readouterr()
    assert "(reused)" in captured.out and "tokenising" not in captured.err
    assert dump.read_text() == first_dump


def test_preprocess_with_bad_records(tmp_path, write_jsonl, write_config, capsys):
    write_jsonl(tmp_path / "data.jsonl", WITH_BAD)
    assert main(["preprocess", str(write_config())]) == 1
    err = capsys.readouterr().err
    assert "2 bad record(s)" in err and "data.jsonl:2: bad_weight" in err and "data.jsonl:4: invalid_json" in err
    assert main(["preprocess", str(write_config(on_bad_record="skip"))]) == 0
    captured = capsys.readouterr()
    assert "skipped 2 bad record(s) (bad_weight: 1, invalid_json: 1)" in captured.err
    assert "kept samples: 3" in captured.out
    assert (tmp_path / "out" / "rejects.jsonl").is_file()


def test_config_schema(capsys):
    assert main(["config-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    props = schema["properties"]
    assert {"base_model", "datasets", "sequence_len", "on_bad_record", "lora_r"} <= set(props)
    assert "config_dir" not in props
    assert "base_model" in schema["required"]


def test_command_line_smoke(tmp_path, write_jsonl, write_config):
    write_jsonl(tmp_path / "data.jsonl", WITH_BAD)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "magistune", "validate-data", str(write_config())],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 1, run.stderr
    assert "records: 5\nvalid: 3\nrejected: 2\n" in run.stdout
    assert "data.jsonl:2: bad_weight" in run.stdout
    assert "Traceback" not in run.stderr


# --- the folders preprocess writes; empty datasets -------------------------------------------------------------

def test_preprocess_output_dir_is_a_file(tmp_path, write_jsonl, write_config, capsys):
    write_jsonl(tmp_path / "data.jsonl", GOOD)
    (tmp_path / "out").write_text("not a folder", encoding="utf-8")
    assert main(["preprocess", str(write_config())]) == 2
    err = capsys.readouterr().err
    assert f"error: output_dir: {tmp_path / 'out'} is a file, not a folder" in err and "Traceback" not in err
    assert (tmp_path / "out").read_text(encoding="utf-8") == "not a folder"  # untouched


def test_preprocess_dataset_prepared_path_is_a_file(tmp_path, write_jsonl, write_config, capsys):
    from magistune.config import ConfigError, load_config
    from magistune.data.build import prepare_data

    write_jsonl(tmp_path / "data.jsonl", GOOD)
    (tmp_path / "cache").write_text("x", encoding="utf-8")
    config = write_config(dataset_prepared_path="cache/prepared")
    assert main(["preprocess", str(config)]) == 2
    assert f"error: dataset_prepared_path: {tmp_path / 'cache'} is a file, not a folder" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="dataset_prepared_path: .* is a file"):  # what train's data step meets
        prepare_data(load_config(config)[0], progress=False)


def test_preprocess_output_dir_not_writable(tmp_path, write_jsonl, write_config, capsys):
    write_jsonl(tmp_path / "data.jsonl", GOOD)
    # /proc refuses new folders even to root; a chmod-ed folder does too for anyone else
    assert main(["preprocess", str(write_config(output_dir="/proc/magistune-test/out"))]) == 2
    err = capsys.readouterr().err
    assert "error: output_dir: /proc/magistune-test/out/prepared is not writable" in err and "Traceback" not in err
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o500)
        assert main(["preprocess", str(write_config(output_dir="ro"))]) == 2
        assert f"error: output_dir: {tmp_path / 'ro' / 'prepared'} is not writable" in capsys.readouterr().err


def test_preprocess_dump_path_checked_first(tmp_path, write_jsonl, write_config, capsys):
    write_jsonl(tmp_path / "data.jsonl", GOOD)
    assert main(["preprocess", str(write_config()), "--dump", str(tmp_path / "nowhere" / "d.jsonl")]) == 2
    captured = capsys.readouterr()
    assert "error: --dump: " in captured.err and "its folder does not exist" in captured.err
    assert "tokenising" not in captured.err  # refused before any work


@pytest.mark.parametrize("name,content", [("data.jsonl", ""), ("data.jsonl", "\n  \n\n"), ("data.json", "[]")])
def test_empty_dataset_is_an_error(tmp_path, write_jsonl, write_config, capsys, name, content):
    write_jsonl(tmp_path / "other.jsonl", GOOD)
    (tmp_path / name).write_text(content, encoding="utf-8")
    config = write_config(datasets=[{"path": "other.jsonl"}, {"path": name}])
    assert main(["validate-data", str(config)]) == 2
    assert f"error: {name}: the dataset has no records" in capsys.readouterr().err
    assert main(["preprocess", str(config)]) == 1
    assert f"error: {name}: the dataset has no records" in capsys.readouterr().err


# --- preference data (rl) ---------------------------------------------------------------------------------------

PAIR = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}]}


@pytest.mark.parametrize("rl,records,keys", [
    ("dpo", [PAIR, {"prompt": PAIR["prompt"], "chosen": PAIR["chosen"]}],
     ["source", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"]),
    ("kto", [{"prompt": PAIR["prompt"], "completion": PAIR["chosen"], "label": False}, {"prompt": PAIR["prompt"], "label": True}],
     ["source", "input_ids", "labels", "label"]),
])
def test_validate_and_dump_preference_data(tmp_path, write_jsonl, write_config, capsys, tiny_tok, rl, records, keys):
    write_jsonl(tmp_path / "data.jsonl", records)
    assert main(["validate-data", str(write_config(rl=rl))]) == 1
    out = capsys.readouterr().out
    assert "records: 2\nvalid: 1\nrejected: 1\n" in out and "data.jsonl:2: missing_field: no '" in out
    cfg = write_config(rl=rl, on_bad_record="skip")
    dump = tmp_path / "dump.jsonl"
    assert main(["preprocess", str(cfg), "--dump", str(dump)]) == 0
    (row,) = [json.loads(line) for line in dump.read_text().splitlines()]
    assert list(row) == keys and row["source"] == "data.jsonl:1"
    ids = row.get("chosen_input_ids", row.get("input_ids"))
    labels = row.get("chosen_labels", row.get("labels"))
    assert len(ids) == len(labels) and all(t in (-100, i) for t, i in zip(labels, ids))
    raw = tiny_tok.instruct_tokenizer.tokenizer
    assert raw.decode([t for t in labels if t != -100]) == "4"  # the answer and </s> only
    if rl == "kto":
        assert row["label"] is False


@pytest.mark.parametrize("keys", [{"ddp": True}, {}, {"fsdp": True}])
def test_train_with_rl_under_torchrun_runs_the_distributed_preference_recipe(tmp_path, write_jsonl, write_config,
                                                                             monkeypatch, keys):
    """torchrun with 2 processes and rl: → train/dpo_distributed.py (its 2-process runs: tests/distributed)."""
    write_jsonl(tmp_path / "data.jsonl", [PAIR])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    called = {}
    monkeypatch.setattr("magistune.train.dpo_distributed.train",
                        lambda cfg, env, mode: called.update(rl=cfg.rl, mode=mode, world=env["world"]) or 0)
    assert main(["train", str(write_config(rl="dpo", **keys))]) == 0
    assert called == {"rl": "dpo", "mode": "fsdp" if keys.get("fsdp") else "ddp", "world": 2}


def test_evaluate_with_rl_says_not_implemented(tmp_path, write_jsonl, write_config, capsys):
    write_jsonl(tmp_path / "data.jsonl", [PAIR])
    assert main(["evaluate", str(write_config(rl="orpo"))]) == 2
    assert "evaluating on preference data is not implemented yet" in capsys.readouterr().err
