"""Axolotl's chat_template dataset options (issue 19), through the real pipeline. The ground truth is
mistral-common: a ShareGPT record mapped by Axolotl's keys gives the ids of `encode_chat_completion` on the
same conversation in OpenAI form, and the labels of that OpenAI record (themselves golden-tested in test_encode)."""

import json
import random

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

from magistune.config import ConfigError, load_config
from magistune.data.build import DataError, build_data
from magistune.data.sample import IGNORE_INDEX
from magistune.data.synthetic import generate
from magistune.tokenizer import SpecialIds

pytestmark = pytest.mark.usefixtures("fast_tokenizers")

SHAREGPT_ROLES = {"user": "human", "assistant": "gpt", "system": "system", "tool": "tool"}


def to_sharegpt(record: dict, role_names=SHAREGPT_ROLES) -> dict:
    """The same conversation as a ShareGPT record: conversations / from / value, human / gpt."""
    turns = []
    for m in record["messages"]:
        turn = {"from": role_names[m["role"]], **{k: v for k, v in m.items() if k not in ("role", "content")}}
        if "content" in m:
            turn["value"] = m["content"]
        turns.append(turn)
    return {"conversations": turns, **({"tools": record["tools"]} if record.get("tools") else {})}


def build(write_config, datasets, **top):
    return build_data(load_config(write_config(datasets=datasets, val_set_size=0, **top))[0], progress=False)


def by_source(data):
    return {s.source.rsplit(":", 1)[1]: s for s in data.train + data.eval}


def reference_ids(tok, record):
    clean = [{k: v for k, v in m.items() if k not in ("weight", "train")} for m in record["messages"]]
    return tok.encode_chat_completion(ChatCompletionRequest.from_openai(clean, tools=record.get("tools"))).tokens


def trained(sample):
    return [t for t in sample.labels if t != IGNORE_INDEX]


@pytest.fixture
def conversations():
    rng = random.Random(19)
    convs = [generate(rng, tools_ok=True, think_ok=True) for _ in range(60)]
    some_trained = [c for c in convs if any(m.get("weight", 1) for m in c["messages"] if m["role"] == "assistant")]
    return some_trained[:40]


@pytest.mark.parametrize("dataset", [
    {"path": "sharegpt.jsonl", "type": "sharegpt"},
    {"path": "sharegpt.jsonl", "type": "chat_template", "field_messages": "conversations",
     "message_property_mappings": {"role": "from", "content": "value"}},
], ids=["type_sharegpt", "chat_template_mappings"])
def test_sharegpt_records_equal_mistral_common(tmp_path, write_jsonl, write_config, tiny_tok, conversations, dataset):
    write_jsonl(tmp_path / "openai.jsonl", conversations)
    write_jsonl(tmp_path / "sharegpt.jsonl", [to_sharegpt(c) for c in conversations])
    ours = by_source(build(write_config, [dataset]))
    openai = by_source(build(write_config, [{"path": "openai.jsonl"}]))
    assert len(ours) == len(conversations)
    for line, conv in enumerate(conversations, start=1):
        s = ours[str(line)]
        assert s.input_ids == reference_ids(tiny_tok, conv)
        assert s.labels == openai[str(line)].labels


def test_roles_map_other_names_and_any_message_key(tmp_path, write_jsonl, write_config, tiny_tok, conversations):
    names = {"user": "person", "assistant": "bot", "system": "sys", "tool": "fn"}
    records = [to_sharegpt(c, names) for c in conversations[:10]]
    for r in records:  # tool call ids under another key, mapped back by message_property_mappings
        for t in r["conversations"]:
            if "tool_call_id" in t:
                t["call"] = t.pop("tool_call_id")
    write_jsonl(tmp_path / "data.jsonl", records)
    roles = {"user": ["person"], "assistant": ["bot"], "system": ["sys"], "tool": ["fn"]}
    ours = by_source(build(write_config, [{"path": "data.jsonl", "field_messages": "conversations", "roles": roles,
                                           "message_property_mappings": {"role": "from", "content": "value",
                                                                         "tool_call_id": "call"}}]))
    for line, conv in enumerate(conversations[:10], start=1):
        assert ours[str(line)].input_ids == reference_ids(tiny_tok, conv)


def test_unmapped_role_names_the_roles_option(tmp_path, write_jsonl, write_config):
    write_jsonl(tmp_path / "data.jsonl", [{"conversations": [{"from": "person", "value": "hi"},
                                                              {"from": "gpt", "value": "hello"}]}])
    with pytest.raises(DataError, match=r"role 'person' is not one of .*`roles` option"):
        build(write_config, [{"path": "data.jsonl", "type": "sharegpt"}])


SHARE = {"conversations": [
    {"from": "system", "value": "Be brief.", "train": False},
    {"from": "human", "value": "2+2?", "train": False},
    {"from": "gpt", "value": "Four.", "train": False},
    {"from": "human", "value": "3+3?"},
    {"from": "gpt", "value": "Six.", "train": True},
]}
OPENAI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
          {"role": "assistant", "content": "Four."}, {"role": "user", "content": "3+3?"},
          {"role": "assistant", "content": "Six."}]


def text_ids(tok, text):
    return tok.instruct_tokenizer.tokenizer.encode(text, bos=False, eos=False)


@pytest.mark.parametrize("roles_to_train", [["assistant"], []])
def test_message_field_training(tmp_path, write_jsonl, write_config, tiny_tok, roles_to_train):
    write_jsonl(tmp_path / "data.jsonl", [SHARE])
    s = build(write_config, [{"path": "data.jsonl", "type": "sharegpt", "message_field_training": "train",
                              "roles_to_train": roles_to_train}]).train[0]
    assert s.input_ids == reference_ids(tiny_tok, {"messages": OPENAI})
    assert trained(s) == text_ids(tiny_tok, "Six.") + [SpecialIds.of(tiny_tok).eos]


def test_roles_to_train_empty_trains_only_flagged_messages(tmp_path, write_jsonl, write_config):
    unflagged = {"conversations": [{k: v for k, v in t.items() if k != "train"} for t in SHARE["conversations"]]}
    write_jsonl(tmp_path / "data.jsonl", [unflagged])
    with pytest.raises(DataError, match="no_trained_tokens"):
        build(write_config, [{"path": "data.jsonl", "type": "sharegpt", "roles_to_train": []}])


def test_training_flag_true_on_a_prompt_message_is_an_error(tmp_path, write_jsonl, write_config):
    rec = json.loads(json.dumps(SHARE))
    rec["conversations"][1]["train"] = True
    write_jsonl(tmp_path / "data.jsonl", [rec])
    with pytest.raises(DataError, match="only meaningful on assistant messages"):
        build(write_config, [{"path": "data.jsonl", "type": "sharegpt", "message_field_training": "train"}])


@pytest.mark.parametrize("mode", ["turn", "last", "all", "none"])
def test_train_on_eos(tmp_path, write_jsonl, write_config, tiny_tok, mode):
    messages = [dict(m) for m in OPENAI]
    messages[2]["weight"] = 0  # "Four." is not trained
    write_jsonl(tmp_path / "data.jsonl", [{"messages": messages}])
    s = build(write_config, [{"path": "data.jsonl", "train_on_eos": mode}]).train[0]
    eos = SpecialIds.of(tiny_tok).eos
    four_eos = {"turn": [], "last": [], "all": [eos], "none": []}[mode]
    six_eos = [] if mode == "none" else [eos]
    assert s.input_ids == reference_ids(tiny_tok, {"messages": OPENAI})
    assert trained(s) == four_eos + text_ids(tiny_tok, "Six.") + six_eos


def test_train_on_eos_last_masks_earlier_turns_eos(tmp_path, write_jsonl, write_config, tiny_tok):
    write_jsonl(tmp_path / "data.jsonl", [{"messages": OPENAI}])
    s = build(write_config, [{"path": "data.jsonl", "train_on_eos": "last"}]).train[0]
    eos = SpecialIds.of(tiny_tok).eos
    assert trained(s) == text_ids(tiny_tok, "Four.") + text_ids(tiny_tok, "Six.") + [eos]


def test_field_thinking_and_drop_system_message(tmp_path, write_jsonl, write_config, tiny_tok):
    messages = [dict(m) for m in OPENAI]
    messages[4]["thought"] = "3 and 3 make 6."
    write_jsonl(tmp_path / "data.jsonl", [{"messages": messages}])
    s = build(write_config, [{"path": "data.jsonl", "field_thinking": "thought", "drop_system_message": True}]).train[0]
    expected = [dict(m) for m in OPENAI[1:]]
    expected[3]["reasoning_content"] = "3 and 3 make 6."
    assert s.input_ids == reference_ids(tiny_tok, {"messages": expected})


def test_shards_cut_contiguous_pieces_like_datasets(tmp_path, write_jsonl, write_config):
    import datasets

    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
               for i in range(11)]
    write_jsonl(tmp_path / "data.jsonl", records)
    whole = datasets.Dataset.from_list([{"i": i} for i in range(11)])
    for idx in range(4):
        data = build(write_config, [{"path": "data.jsonl", "shards": 4, "shards_idx": idx}])
        lines = sorted(int(s.source.rsplit(":", 1)[1]) - 1 for s in data.train)
        assert lines == [r["i"] for r in whole.shard(4, idx, contiguous=True)]


def test_ds_type_json_reads_a_file_without_suffix(tmp_path, write_jsonl, write_config):
    write_jsonl(tmp_path / "data.jsonl", [{"messages": OPENAI}] * 3)
    (tmp_path / "data.txt").write_bytes((tmp_path / "data.jsonl").read_bytes())
    assert len(build(write_config, [{"path": "data.txt", "ds_type": "json"}]).train) == 3


def test_shuffle_merged_datasets_false_keeps_the_order(tmp_path, write_jsonl, write_config):
    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
               for i in range(10)]
    write_jsonl(tmp_path / "data.jsonl", records)
    cfg = load_config(write_config(val_set_size=3, shuffle_merged_datasets=False))[0]
    data = build_data(cfg, progress=False)
    assert [s.source for s in data.train] == [f"data.jsonl:{n}" for n in range(1, 8)]
    assert [s.source for s in data.eval] == [f"data.jsonl:{n}" for n in range(8, 11)]
    shuffled = build_data(load_config(write_config(val_set_size=3))[0], progress=False)
    assert [s.source for s in shuffled.train] != [s.source for s in data.train]


def test_top_level_train_on_inputs(tmp_path, write_jsonl, write_config):
    write_jsonl(tmp_path / "data.jsonl", [{"messages": OPENAI}])
    cfg = load_config(write_config(train_on_inputs=True, datasets=[{"path": "data.jsonl"},
                                                                   {"path": "data.jsonl", "train_on_inputs": False}]))[0]
    assert [d.train_on_inputs for d in cfg.datasets] == [True, False]


def test_roles_to_train_user_is_an_error(write_config):
    with pytest.raises(ConfigError, match="roles_to_train: 'user' cannot be trained: mistral-common's fine-tuning"):
        load_config(write_config(datasets=[{"path": "data.jsonl", "roles_to_train": ["assistant", "user"]}]))


@pytest.fixture
def v15_tokenizer(tmp_path):
    """The tiny tokenizer as version 15, whose requests carry mistral-common's model settings (reasoning_effort)."""
    from magistune.tokenizer import TINY_SPECIAL_TOKENS, tiny_tekken_json

    data = tiny_tekken_json()
    data["config"]["version"] = "v15"
    specials = [{"<SPECIAL_20>": "[MODEL_SETTINGS]", "<SPECIAL_21>": "[/MODEL_SETTINGS]"}.get(s, s)
                for s in TINY_SPECIAL_TOKENS]
    data["special_tokens"] = [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(specials)]
    data["model_settings_builder"] = {"reasoning_effort": {"type": "enum", "accepts_none": True, "default": "none",
                                                           "values": ["none", "high"]}}
    path = tmp_path / "v15" / "tekken.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("effort", ["high", "none"])
def test_chat_template_kwargs_reasoning_effort_equals_mistral_common(tmp_path, write_jsonl, write_config,
                                                                     v15_tokenizer, effort):
    from magistune.tokenizer import load_tokenizer

    tok = load_tokenizer(v15_tokenizer)
    write_jsonl(tmp_path / "data.jsonl", [{"messages": OPENAI}])
    s = build(write_config, [{"path": "data.jsonl", "chat_template_kwargs": {"reasoning_effort": effort}}],
              tokenizer_path=str(v15_tokenizer)).train[0]
    request = ChatCompletionRequest.from_openai(OPENAI, reasoning_effort=effort)
    assert s.input_ids == tok.encode_chat_completion(request).tokens
    assert f'"reasoning_effort": "{effort}"' in tok.decode(s.input_ids, special_token_policy=SpecialTokenPolicy.KEEP)
    assert trained(s) == text_ids(tok, "Four.") + [tok.instruct_tokenizer.tokenizer.eos_id] + \
        text_ids(tok, "Six.") + [tok.instruct_tokenizer.tokenizer.eos_id]


def test_reasoning_effort_on_a_tokenizer_before_v15_is_mistral_commons_error(tmp_path, write_jsonl, write_config):
    write_jsonl(tmp_path / "data.jsonl", [{"messages": OPENAI}])
    with pytest.raises(DataError, match="reasoning_effort.* is not supported for this model"):
        build(write_config, [{"path": "data.jsonl", "chat_template_kwargs": {"reasoning_effort": "high"}}])


def test_shuffle_merged_datasets_is_part_of_the_cache_key(tmp_path, write_jsonl, write_config):
    from magistune.data.build import resolve_tokenizer_file
    from magistune.data.cache import cache_key

    write_jsonl(tmp_path / "data.jsonl", [{"messages": OPENAI}])
    keys = {cache_key(cfg, resolve_tokenizer_file(cfg))
            for cfg in (load_config(write_config(shuffle_merged_datasets=v))[0] for v in (True, False))}
    assert len(keys) == 2
