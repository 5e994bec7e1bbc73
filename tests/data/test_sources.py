"""Sources: .jsonl, .json, .parquet, save_to_disk folders, hub names (offline), and their locations."""

import json

import pytest

from magistune.config import load_config
from magistune.data.build import DataError, encode_all, prepare_data

pytestmark = pytest.mark.usefixtures("fast_tokenizers")


def conv(q, a, **assistant_keys):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a, **assistant_keys}]}


RECORDS = [conv("one?", "1"), conv("two?", "2"), conv("three?", "3")]

# Records whose keys differ from row to row: parquet / datasets fill the missing struct keys with None.
PARTS_RECORDS = [
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                  {"role": "assistant", "content": [{"type": "thinking", "thinking": "greet back", "closed": True},
                                                    {"type": "text", "text": "hello"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "2+2?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "5"}], "weight": 0},
                  {"role": "user", "content": [{"type": "text", "text": "sure?"}]},
                  {"role": "assistant", "content": [{"type": "thinking", "thinking": "oops"},
                                                    {"type": "text", "text": "4"}], "weight": 1}]},
    {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                  {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
                  {"role": "assistant", "content": [],
                   "tool_calls": [{"id": "abcdef123", "type": "function",
                                   "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                  {"role": "tool", "tool_call_id": "abcdef123", "content": [{"type": "text", "text": "sunny"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "Sunny."}]}]},
]


def _cfg(write_config, path, **ds_keys):
    return load_config(write_config(datasets=[{"path": path, **ds_keys}]))[0]


def _encode(write_config, path, **ds_keys):
    samples, rep, _ = encode_all(_cfg(write_config, path, **ds_keys), progress=False)
    return samples, rep


def _as_tuples(samples):
    return [(s.input_ids, s.labels) for s in samples]


@pytest.fixture
def jsonl_reference(tmp_path, write_jsonl, write_config):
    """The samples of PARTS_RECORDS read from JSON lines: every other format must give the same."""
    write_jsonl(tmp_path / "ref.jsonl", PARTS_RECORDS)
    samples, rep = _encode(write_config, "ref.jsonl")
    assert not rep.rejected, rep.rejected
    return _as_tuples(samples)


def test_jsonl_locations_and_blank_lines(tmp_path, write_jsonl, write_config):
    write_jsonl(tmp_path / "data.jsonl", ["", RECORDS[0], "   ", RECORDS[1], "\t", RECORDS[2], ""])
    samples, rep = _encode(write_config, "data.jsonl")
    assert [s.source for s in samples] == ["data.jsonl:2", "data.jsonl:4", "data.jsonl:6"]
    assert rep.records == 3 and rep.valid == 3 and not rep.rejected


def test_jsonl_location_uses_the_path_as_written(tmp_path, write_jsonl, write_config):
    write_jsonl(tmp_path / "sub" / "data.jsonl", [RECORDS[0], "{oops", RECORDS[1]])
    samples, rep = _encode(write_config, "sub/data.jsonl")
    assert [s.source for s in samples] == ["sub/data.jsonl:1", "sub/data.jsonl:3"]
    assert [(r.source, r.reason) for r in rep.rejected] == [("sub/data.jsonl:2", "invalid_json")]


def test_json_list(tmp_path, write_config):
    (tmp_path / "data.json").write_text(json.dumps(RECORDS, indent=2), encoding="utf-8")
    samples, rep = _encode(write_config, "data.json")
    assert [s.source for s in samples] == ["data.json:row 0", "data.json:row 1", "data.json:row 2"]


def test_json_single_record(tmp_path, write_config):
    (tmp_path / "one.json").write_text(json.dumps(RECORDS[0]), encoding="utf-8")
    samples, _ = _encode(write_config, "one.json")
    assert [s.source for s in samples] == ["one.json:row 0"]


def test_json_invalid_or_not_a_list(tmp_path, write_config):
    (tmp_path / "bad.json").write_text('[\n {"messages": []},\n oops\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.json: invalid JSON at line 3"):
        _encode(write_config, "bad.json")
    (tmp_path / "obj.json").write_text('{"rows": []}', encoding="utf-8")
    with pytest.raises(DataError, match=r"obj.json: a .json dataset must hold a list of records"):
        _encode(write_config, "obj.json")


def test_parquet_equals_jsonl(tmp_path, write_config, jsonl_reference):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(PARTS_RECORDS)
    pq.write_table(table, tmp_path / "data.parquet")
    # the struct columns really are None-filled (otherwise this test proves nothing)
    assert table.to_pylist()[0]["messages"][0]["content"][0]["thinking"] is None
    samples, rep = _encode(write_config, "data.parquet")
    assert not rep.rejected, rep.rejected
    assert [s.source for s in samples] == [f"data.parquet:row {i}" for i in range(3)]
    assert _as_tuples(samples) == jsonl_reference


def test_parquet_location_of_a_bad_row(tmp_path, write_config):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [conv("a", "b"), conv("c", "d", weight=3), conv("e", "f")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    samples, rep = _encode(write_config, "data.parquet")
    assert [(r.source, r.reason) for r in rep.rejected] == [("data.parquet:row 1", "bad_weight")]
    assert [s.source for s in samples] == ["data.parquet:row 0", "data.parquet:row 2"]


def test_unreadable_parquet(tmp_path, write_config):
    (tmp_path / "data.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"data.parquet: cannot read parquet"):
        _encode(write_config, "data.parquet")


def test_save_to_disk_dataset(tmp_path, write_config, jsonl_reference):
    import datasets

    datasets.Dataset.from_list(PARTS_RECORDS).save_to_disk(str(tmp_path / "saved"))
    samples, rep = _encode(write_config, "saved")
    assert not rep.rejected, rep.rejected
    assert [s.source for s in samples] == [f"saved:row {i}" for i in range(3)]
    assert _as_tuples(samples) == jsonl_reference


def test_save_to_disk_dataset_dict_split(tmp_path, write_config):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS),
                               "test": datasets.Dataset.from_list([conv("x?", "y"), conv("z?", "w")])})
    dd.save_to_disk(str(tmp_path / "dd"))
    train, _ = _encode(write_config, "dd")
    assert len(train) == 3
    test, _ = _encode(write_config, "dd", split="test")
    assert [s.source for s in test] == ["dd:row 0", "dd:row 1"]
    assert _as_tuples(test) != _as_tuples(train[:2])
    with pytest.raises(DataError, match=r"dd: no split 'validation' \(has train, test\)"):
        _encode(write_config, "dd", split="validation")


def test_hub_dataset_not_cached(write_config):
    cfg = _cfg(write_config, "magistune-nobody/not-a-real-dataset-3f9c")
    with pytest.raises(DataError) as e:
        prepare_data(cfg, progress=False)
    msg = str(e.value)
    assert msg.startswith("magistune-nobody/not-a-real-dataset-3f9c: cannot load Hugging Face dataset")
    assert "no hub access" in msg


@pytest.mark.parametrize("path", ["missing.jsonl", "./missing", "data/missing.json", "a/b/c"])
def test_missing_file(tmp_path, write_config, path):
    cfg = _cfg(write_config, path)
    with pytest.raises(DataError) as e:
        prepare_data(cfg, progress=False)
    assert f"{path}: dataset file not found" in str(e.value)
    assert str(tmp_path) in str(e.value)  # says where it looked


@pytest.mark.parametrize("name", ["data.csv", "data.txt"])
def test_unsupported_extension(tmp_path, write_config, name):
    (tmp_path / name).write_text("messages\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{name}: unsupported file type '\.{name.split('.')[1]}'"):
        prepare_data(_cfg(write_config, name), progress=False)


# --- text that is not UTF-8, byte-order marks ----------------------------------------------------------------

def _raw_lines(*lines: bytes) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def test_jsonl_invalid_utf8_is_one_bad_record(tmp_path, write_config):
    good = [json.dumps(r).encode() for r in RECORDS]
    bad = b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}'
    (tmp_path / "data.jsonl").write_bytes(_raw_lines(good[0], bad, good[1], good[2]))
    samples, rep = _encode(write_config, "data.jsonl")
    assert [s.source for s in samples] == ["data.jsonl:1", "data.jsonl:3", "data.jsonl:4"]
    assert [(r.source, r.reason) for r in rep.rejected] == [("data.jsonl:2", "invalid_utf8")]
    assert "byte 0xe9" in rep.rejected[0].message and rep.records == 4
    # on_bad_record: error lists it like any bad record; skip counts it
    with pytest.raises(DataError, match=r"data.jsonl:2: invalid_utf8: not valid UTF-8"):
        prepare_data(_cfg(write_config, "data.jsonl"), progress=False)
    cfg = load_config(write_config(datasets=[{"path": "data.jsonl"}], on_bad_record="skip"))[0]
    assert len(prepare_data(cfg, progress=False).train) == 3


def test_lone_surrogate_escape_is_a_bad_record(tmp_path, write_jsonl, write_config):
    write_jsonl(tmp_path / "data.jsonl", [RECORDS[0], '{"messages": [{"role": "user", "content": "a\\ud800"}, '
                                                       '{"role": "assistant", "content": "ok"}]}'])
    _, rep = _encode(write_config, "data.jsonl")
    assert [(r.source, r.reason) for r in rep.rejected] == [("data.jsonl:2", "invalid_utf8")]
    assert "messages[0].content: a lone surrogate \\ud800" in rep.rejected[0].message


def test_utf8_bom_is_accepted(tmp_path, write_config):
    body = _raw_lines(*(json.dumps(r).encode() for r in RECORDS))
    (tmp_path / "data.jsonl").write_bytes(b"\xef\xbb\xbf" + body)
    samples, rep = _encode(write_config, "data.jsonl")
    assert not rep.rejected and len(samples) == 3
    (tmp_path / "data.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORDS).encode())
    samples, rep = _encode(write_config, "data.json")
    assert not rep.rejected and len(samples) == 3


def test_utf16_file_is_refused_whole(tmp_path, write_config):
    text = json.dumps(RECORDS[0]) + "\n"
    (tmp_path / "data.jsonl").write_bytes(text.encode("utf-16"))
    with pytest.raises(DataError, match=r"data.jsonl: the file is UTF-16 .*save it as UTF-8"):
        _encode(write_config, "data.jsonl")


def test_json_list_invalid_utf8_is_one_bad_row(tmp_path, write_config):
    text = json.dumps([RECORDS[0], conv("caf@", "ok"), RECORDS[1]], ensure_ascii=False, indent=1).encode()
    (tmp_path / "data.json").write_bytes(text.replace(b"caf@", b"caf\xe9"))
    samples, rep = _encode(write_config, "data.json")
    assert [s.source for s in samples] == ["data.json:row 0", "data.json:row 2"]
    assert [(r.source, r.reason) for r in rep.rejected] == [("data.json:row 1", "invalid_utf8")]
    assert rep.rejected[0].message.startswith("messages[0].content: not valid UTF-8 (byte 0xe9")


def _invalid_utf8_table():
    import pyarrow as pa

    rows = [json.dumps(conv("a", "b")["messages"]).encode(), b"caf\xe9", json.dumps(conv("c", "d")["messages"]).encode()]
    return pa.table({"text": pa.array(rows, type=pa.binary()).view(pa.string())})  # view: no UTF-8 check


def test_parquet_and_saved_dataset_invalid_utf8_row(tmp_path, write_config):
    import datasets
    import pyarrow.parquet as pq

    table = _invalid_utf8_table()
    pq.write_table(table, tmp_path / "data.parquet")
    datasets.Dataset(table).save_to_disk(str(tmp_path / "saved"))
    for path in ("data.parquet", "saved"):
        _, rep = _encode(write_config, path, field_messages="text")
        # rows 0 and 2 are read (and rejected: their messages are a string), row 1 is not UTF-8
        assert [(r.source, r.reason) for r in rep.rejected] == [
            (f"{path}:row 0", "wrong_type"), (f"{path}:row 1", "invalid_utf8"), (f"{path}:row 2", "wrong_type")]
