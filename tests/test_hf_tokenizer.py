"""hf_tokenizer.py: the Tekken file converted by transformers encodes text as mistral-common does; a folder's
tokenizer is found by kind; Axolotl's added_tokens_overrides / tokens / special_tokens as Axolotl defines them."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from magistune.data.synthetic import TRICKY
from magistune.hf_tokenizer import (
    customised_tokenizer, hf_tokenizer_in, load_hf_tokenizer, model_tokenizer_file, tiny_hf_tokenizer_path,
    tokenizer_digest, tokenizer_files,
)
from magistune.tokenizer import TokenizerError, find_tokenizer_file, load_tokenizer, tiny_tokenizer_path, vocab_size


@pytest.fixture(scope="module")
def hf_path():
    return tiny_hf_tokenizer_path()


def test_converted_tekken_encodes_text_as_mistral_common(hf_path):
    raw = load_tokenizer(tiny_tokenizer_path()).instruct_tokenizer.tokenizer
    tok = load_hf_tokenizer(hf_path)
    assert tok.n_words == raw.n_words == vocab_size(tok) == 131072
    ids = tok.special_ids()
    assert (ids.bos, ids.eos, ids.pad, ids.begin_think, ids.end_think) == (
        raw.bos_id, raw.eos_id, raw.pad_id, raw.get_special_token("[THINK]"), raw.get_special_token("[/THINK]"))
    rng = random.Random(0)
    words = ["alpha", " beta", "Paris", "42", "naïve", "déjà", "你好", "🙂", "\n\n", "  ", "x=1;", "'s", "ok?"]
    for text in [t for t in TRICKY if "[" not in t and "<" not in t] + ["".join(rng.choices(words, k=20)) for _ in range(50)]:
        assert tok.hf(text, add_special_tokens=False)["input_ids"] == raw.encode(text, bos=False, eos=False), text
        assert tok.decode(raw.encode(text, bos=False, eos=False)) == text


def test_a_folder_s_tokenizer_by_kind(tmp_path, hf_path):
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(TokenizerError, match="no tekken.json, tokenizer.model.v\\* or tokenizer.json"):
        find_tokenizer_file(folder)
    shutil.copyfile(hf_path, folder / "tokenizer.json")  # no chat template yet: not usable
    assert hf_tokenizer_in(folder) is None
    with pytest.raises(TokenizerError, match="no tokenizer.json with a chat template"):
        model_tokenizer_file(folder, use_mistral_common=False)
    for f in tokenizer_files(hf_path):
        shutil.copyfile(f, folder / f.name)
    assert find_tokenizer_file(folder) == folder / "tokenizer.json"  # no mistral-common file: the HF one
    shutil.copyfile(tiny_tokenizer_path(), folder / "tekken.json")
    assert find_tokenizer_file(folder) == folder / "tekken.json"  # mistral-common first …
    assert model_tokenizer_file(folder, use_mistral_common=False) == folder / "tokenizer.json"  # … unless told
    assert [f.name for f in tokenizer_files(folder / "tokenizer.json")] == [
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
    before = tokenizer_digest(folder / "tokenizer.json")
    (folder / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
    assert tokenizer_digest(folder / "tokenizer.json") != before  # the template is part of the tokenizer


def test_added_tokens_overrides_rename_in_place(tmp_path, hf_path):
    path = customised_tokenizer(hf_path, tmp_path, overrides={20: "<TOOL_TAG>", 21: "<ROLE_X>"})
    tok = load_hf_tokenizer(path)
    assert tok.n_words == 131072  # renamed, not added
    assert tok.hf("a<TOOL_TAG>b<ROLE_X>", add_special_tokens=False)["input_ids"][1::2] == [20, 21]
    assert tok.decode([20]) == "<TOOL_TAG>" and tok.single_id("<SPECIAL_20>") is None
    data = json.loads(path.read_text(encoding="utf-8"))
    assert {t["id"]: t["content"] for t in data["added_tokens"]}[20] == "<TOOL_TAG>"
    assert path.parent == customised_tokenizer(hf_path, tmp_path, overrides={20: "<TOOL_TAG>", 21: "<ROLE_X>"}).parent
    with pytest.raises(TokenizerError, match="200000 is not an added token .* ids 0–999"):
        customised_tokenizer(hf_path, tmp_path, overrides={200000: "<X>"})


def test_tokens_and_special_tokens_as_axolotl_adds_them(tmp_path, hf_path):
    path = customised_tokenizer(hf_path, tmp_path, tokens=["<mark>", "<other>"],
                                special_tokens={"eos_token": "</s>", "pad_token": "<pad>"})
    tok = load_hf_tokenizer(path)
    assert tok.n_words == 131074  # two rows more: the model must grow to it
    mark, other = tok.single_id("<mark>"), tok.single_id("<other>")
    assert (mark, other) == (131072, 131073)
    assert tok.hf("x<mark>y<other>", add_special_tokens=False)["input_ids"][1::2] == [mark, other]
    assert (tok.special_ids().eos, tok.special_ids().pad) == (2, 11)  # restated: unchanged
    assert tokenizer_digest(path) != tokenizer_digest(hf_path)
    new_pad = load_hf_tokenizer(customised_tokenizer(hf_path, tmp_path, special_tokens={"pad_token": "<PAD2>"}))
    assert new_pad.special_ids().pad == 131072 and new_pad.n_words == 131073
