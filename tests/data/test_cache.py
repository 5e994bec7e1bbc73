"""The preprocessing cache: reused when nothing changed, rebuilt on any change, written atomically."""

import json

import pytest

import magistune.data.cache as cache_mod
from magistune.config import load_config
from magistune.data.build import DataError, prepare_data
from magistune.tokenizer import tiny_tekken_json

pytestmark = pytest.mark.usefixtures("fast_tokenizers")


def conv(i, **assistant_keys):
    return {"messages": [{"role": "user", "content": f"Question {i}?"},
                         {"role": "assistant", "content": f"Answer {i}.", "reasoning_content": f"Think {i}.",
                          **assistant_keys}]}


RECORDS = [conv(i) for i in range(6)]


def _snapshot(data):
    return ([(s.source, s.input_ids, s.labels) for s in data.train], [(s.source, s.input_ids, s.labels) for s in data.eval])


def _entries(cfg):
    return sorted(p.name for p in cfg.prepared_dir.iterdir()) if cfg.prepared_dir.exists() else []


@pytest.fixture
def setup(tmp_path, write_jsonl, write_config):
    write_jsonl(tmp_path / "data.jsonl", RECORDS)

    def cfg(**keys):
        keys.setdefault("val_set_size", 2)
        return load_config(write_config(**keys))[0]

    return cfg


def test_reused_when_nothing_changed(setup):
    cfg = setup()
    first = prepare_data(cfg, progress=False)
    assert not first.from_cache
    assert len(first.eval) == 2
    entries = _entries(cfg)
    assert len(entries) == 1 and not entries[0].startswith(".")
    assert {"tokens.npz", "samples.json"} <= {p.name for p in (cfg.prepared_dir / entries[0]).iterdir()}

    second = prepare_data(setup(), progress=False)  # a fresh Config from the same file
    assert second.from_cache
    assert _snapshot(second) == _snapshot(first)
    assert second.report.to_json() == first.report.to_json()
    assert second.tokenizer_file == first.tokenizer_file
    assert _entries(cfg) == entries


def test_dataset_prepared_path(setup, tmp_path):
    cfg = setup(dataset_prepared_path="last_run_prepared")
    prepare_data(cfg, progress=False)
    assert cfg.prepared_dir == tmp_path / "last_run_prepared"
    assert len(_entries(cfg)) == 1


def test_rebuilt_when_the_data_changes(setup, tmp_path, write_jsonl):
    first = prepare_data(setup(), progress=False)
    write_jsonl(tmp_path / "data.jsonl", RECORDS + [conv(99)])
    second = prepare_data(setup(), progress=False)
    assert not second.from_cache
    assert len(second.train) + len(second.eval) == len(first.train) + len(first.eval) + 1
    # the same bytes again: the first entry is still there and is reused
    write_jsonl(tmp_path / "data.jsonl", RECORDS)
    third = prepare_data(setup(), progress=False)
    assert third.from_cache and _snapshot(third) == _snapshot(first)


@pytest.mark.parametrize("change", [
    {"sequence_len": 16, "excess_length_strategy": "truncate"},
    {"datasets": [{"path": "data.jsonl", "train_thinking": False}]},
    {"datasets": [{"path": "data.jsonl", "train_on_inputs": True}]},
    {"system_prompt": "Be brief."},
    {"val_set_size": 1},
    {"seed": 7},
], ids=["sequence_len", "train_thinking", "train_on_inputs", "system_prompt", "val_set_size", "seed"])
def test_rebuilt_when_a_data_key_changes(setup, change):
    first = prepare_data(setup(), progress=False)
    cfg = setup(**change)
    second = prepare_data(cfg, progress=False)
    assert not second.from_cache
    assert _snapshot(second) != _snapshot(first)
    assert len(_entries(cfg)) == 2
    assert prepare_data(setup(**change), progress=False).from_cache


def test_rebuilt_when_token_edits_change(setup):
    """tokens / added_tokens_overrides rewrite the run's tokenizer (prepared/tokenizer/...); special_tokens too is a
    data key. Each change is a new entry; the same edits again reuse theirs."""
    first = prepare_data(setup(), progress=False)
    cfg = setup(tokens=["<CITE>"])
    second = prepare_data(cfg, progress=False)
    assert not second.from_cache and second.tokenizer_file != first.tokenizer_file
    assert second.tokenizer_file.parent.parent == cfg.prepared_dir / "tokenizer"
    assert prepare_data(setup(tokens=["<CITE>"]), progress=False).from_cache
    assert not prepare_data(setup(tokens=["<CITE>"], added_tokens_overrides={30: "<X>"}), progress=False).from_cache
    assert not prepare_data(setup(special_tokens={"eos_token": "</s>"}), progress=False).from_cache


def test_not_rebuilt_for_training_keys(setup):
    prepare_data(setup(), progress=False)
    assert prepare_data(setup(learning_rate=1e-5, num_epochs=3, micro_batch_size=4), progress=False).from_cache


def test_rebuilt_when_the_system_prompt_file_changes(setup, tmp_path):
    (tmp_path / "prompt.txt").write_text("Be brief.", encoding="utf-8")
    first = prepare_data(setup(system_prompt_file="prompt.txt"), progress=False)
    (tmp_path / "prompt.txt").write_text("Be verbose.", encoding="utf-8")
    second = prepare_data(setup(system_prompt_file="prompt.txt"), progress=False)
    assert not second.from_cache and _snapshot(second) != _snapshot(first)


def test_rebuilt_when_the_tokenizer_file_changes(setup, tmp_path, write_jsonl):
    write_jsonl(tmp_path / "data.jsonl", [{"messages": [{"role": "user", "content": f"Q{i}"},
                                                         {"role": "assistant", "content": f"A{i}"}]} for i in range(4)])
    tok_file = tmp_path / "tok" / "tekken.json"
    tok_file.parent.mkdir()
    data = tiny_tekken_json()
    tok_file.write_text(json.dumps(data), encoding="utf-8")
    first = prepare_data(setup(tokenizer_path="tok/tekken.json"), progress=False)
    assert first.tokenizer_file == tok_file
    assert prepare_data(setup(tokenizer_path="tok/tekken.json"), progress=False).from_cache

    # a different derived tokenizer at the same path: the v11 flavour of the same vocabulary
    data["config"]["version"] = "v11"
    tok_file.write_text(json.dumps(data), encoding="utf-8")
    second = prepare_data(setup(tokenizer_path="tok/tekken.json"), progress=False)
    assert not second.from_cache
    assert prepare_data(setup(tokenizer_path="tok/tekken.json"), progress=False).from_cache


def test_rejects_are_cached_and_the_policy_still_applies(setup, tmp_path, write_jsonl, capsys):
    write_jsonl(tmp_path / "data.jsonl", RECORDS + [conv(7, weight=5)])
    skipped = prepare_data(setup(on_bad_record="skip"), progress=False)
    assert [r.source for r in skipped.report.rejected] == ["data.jsonl:7"]
    (tmp_path / "out" / "rejects.jsonl").unlink()

    again = prepare_data(setup(on_bad_record="skip"), progress=False)
    assert again.from_cache
    assert "data.jsonl:7" in (tmp_path / "out" / "rejects.jsonl").read_text()  # written again
    assert "skipped 1 bad record(s) (bad_weight: 1)" in capsys.readouterr().err

    # switching to on_bad_record: error must not let the cached (skipping) entry through
    with pytest.raises(DataError, match=r"data.jsonl:7: bad_weight"):
        prepare_data(setup(on_bad_record="error"), progress=False)


def test_atomic_write(setup, monkeypatch):
    cfg = setup()

    def failing_savez(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod.np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        prepare_data(cfg, progress=False)
    assert _entries(cfg) == []  # neither an entry nor a temporary folder is left

    monkeypatch.undo()
    data = prepare_data(setup(), progress=False)
    assert not data.from_cache
    assert prepare_data(setup(), progress=False).from_cache


def test_half_written_entry_is_not_used(setup):
    cfg = setup()
    first = prepare_data(cfg, progress=False)
    (entry,) = _entries(cfg)
    (cfg.prepared_dir / entry / "tokens.npz").unlink()  # as if a crash had happened before the rename
    again = prepare_data(setup(), progress=False)
    assert not again.from_cache and _snapshot(again) == _snapshot(first)


@pytest.mark.parametrize("damage", [
    ("samples.json", b"{not json"),
    ("samples.json", b'{"key": null}'),  # written by something else: not this entry
    ("samples.json", "DROP_KEY"),
    ("tokens.npz", b"PK\x03\x04 this is no zip"),
    ("tokens.npz", "TRUNCATE"),
    ("tokens.npz", "OFFSETS"),
], ids=["json", "other_key", "missing_field", "npz_garbage", "npz_truncated", "npz_disagrees"])
def test_damaged_entry_is_rebuilt_with_a_note(setup, capsys, damage):
    import numpy as np

    cfg = setup()
    first = prepare_data(cfg, progress=False)
    (entry,) = _entries(cfg)
    name, content = damage
    path = cfg.prepared_dir / entry / name
    if content == "TRUNCATE":
        content = path.read_bytes()[:200]
    elif content == "DROP_KEY":
        meta = json.loads(path.read_text())
        del meta["n_train"]
        content = json.dumps(meta).encode()
    elif content == "OFFSETS":
        with np.load(path) as a:
            arrays = dict(a)
        arrays["offsets"] = arrays["offsets"][:-1]
        np.savez(path, **arrays)
        content = path.read_bytes()
    path.write_bytes(content)
    capsys.readouterr()
    again = prepare_data(setup(), progress=False)
    assert not again.from_cache and _snapshot(again) == _snapshot(first)
    err = capsys.readouterr().err
    if damage[1] != b'{"key": null}':
        assert f"note: the data cache {cfg.prepared_dir / entry} is damaged" in err and "rebuilding it" in err
    assert prepare_data(setup(), progress=False).from_cache  # the rebuilt entry replaced the damaged one


def test_rebuilt_when_the_model_system_prompt_changes(setup, tmp_path):
    from magistune.tokenizer import tiny_tokenizer_path

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tekken.json").symlink_to(tiny_tokenizer_path())
    (folder / "SYSTEM_PROMPT.txt").write_text("Be brief.", encoding="utf-8")
    first = prepare_data(setup(base_model=str(folder)), progress=False)
    assert prepare_data(setup(base_model=str(folder)), progress=False).from_cache
    (folder / "SYSTEM_PROMPT.txt").write_text("Be verbose.", encoding="utf-8")
    second = prepare_data(setup(base_model=str(folder)), progress=False)
    assert not second.from_cache and _snapshot(second) != _snapshot(first)
