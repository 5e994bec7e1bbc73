"""Tokenizer loading: the tiny v13 Tekken file, mistral-common's shipped files, and clear errors."""

import json
from pathlib import Path

import mistral_common
import pytest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import SpecialTokens

from magistune.tokenizer import (
    TINY_IMAGE_CONFIG, SpecialIds, TokenizerError, find_tokenizer_file, load_tokenizer, shipped_tokenizer_file,
    tiny_tekken_json, tiny_tokenizer_path, tokenizer_version, vocab_size, write_tiny_tekken,
)

SHIPPED = sorted(p.name for p in (Path(mistral_common.__file__).parent / "data").iterdir()
                 if p.name.startswith("tekken") or ".model" in p.name)


def _rank(data: dict, token: str) -> int:
    (rank,) = [t["rank"] for t in data["special_tokens"] if t["token_str"] == token]
    return rank


def test_tiny_tokenizer_is_v13_with_think(tiny_tok):
    assert tokenizer_version(tiny_tok) == "v13"
    data = json.loads(tiny_tokenizer_path().read_text(encoding="utf-8"))
    ids = SpecialIds.of(tiny_tok)
    assert ids.has_think
    assert ids.begin_think == _rank(data, "[THINK]") and ids.end_think == _rank(data, "[/THINK]")
    assert ids.begin_think != ids.end_think
    raw = tiny_tok.instruct_tokenizer.tokenizer
    assert ids.begin_think == raw.get_special_token(SpecialTokens.begin_think.value)
    assert (ids.bos, ids.eos, ids.pad) == (raw.bos_id, raw.eos_id, raw.pad_id)
    assert (ids.img, ids.img_break, ids.img_end) == (_rank(data, "[IMG]"), _rank(data, "[IMG_BREAK]"), _rank(data, "[IMG_END]"))
    # [THINK] is a control token: plain text never encodes to it
    assert ids.begin_think not in raw.encode("[THINK] thinking [/THINK]", bos=False, eos=False)
    assert vocab_size(tiny_tok) == raw.n_words > ids.end_think


def test_tiny_tokenizer_image_config(tiny_tok):
    cfg = tiny_tok.instruct_tokenizer.image_encoder.image_config
    assert (cfg.image_patch_size, cfg.spatial_merge_size, cfg.max_image_size) == (14, 2, 1540)
    assert json.loads(tiny_tokenizer_path().read_text(encoding="utf-8"))["image"] == TINY_IMAGE_CONFIG


def test_tiny_tokenizer_file_is_deterministic(tmp_path):
    a = write_tiny_tekken(tmp_path / "a" / "tekken.json")
    assert json.loads(a.read_text(encoding="utf-8")) == tiny_tekken_json()
    assert a.read_bytes() == tiny_tokenizer_path().read_bytes()
    assert write_tiny_tekken(a) == a  # a second call leaves it alone


def test_shipped_files_found():
    assert len(SHIPPED) >= 7
    assert "tekken_240911.json" in SHIPPED and "tokenizer.model.v1" in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_tokenizer_loads_in_finetuning_mode(tokenizer_loader, name):
    tok = tokenizer_loader(shipped_tokenizer_file(name))
    assert tok._chat_completion_request_validator._mode == ValidationMode.finetuning
    ids = SpecialIds.of(tok)
    raw = tok.instruct_tokenizer.tokenizer
    assert (ids.bos, ids.eos) == (raw.bos_id, raw.eos_id)
    # none of these files is v13: none can encode thinking
    assert tokenizer_version(tok) != "v13" and not ids.has_think
    # an id reported present is a real control token, never <unk>
    for value in (ids.img, ids.img_break, ids.img_end):
        assert value is None or value != raw.unk_id


def test_sentencepiece_unknown_tokens_are_absent(tokenizer_loader):
    tok = tokenizer_loader(shipped_tokenizer_file("tokenizer.model.v1"))
    ids = SpecialIds.of(tok)
    assert ids.begin_think is None and ids.end_think is None and ids.img is None


def test_think_tokens_before_v13_are_not_usable(tmp_path, tokenizer_loader):
    """A v11 file that lists [THINK] still cannot encode thinking: mistral-common does it from v13 on."""
    data = tiny_tekken_json()
    data["config"]["version"] = "v11"
    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    tok = tokenizer_loader(path)
    assert tokenizer_version(tok) == "v11"
    assert not SpecialIds.of(tok).has_think


def test_missing_tokenizer_file(tmp_path):
    path = tmp_path / "nope" / "tekken.json"
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(path)
    assert str(path) in str(e.value) and "not found" in str(e.value)


@pytest.mark.parametrize("content", ['{"config": ', '{"vocab": []}', "", "\x00\x01garbage"],
                         ids=["truncated", "wrong_shape", "empty", "binary"])
def test_corrupt_tokenizer_file(tmp_path, content):
    path = tmp_path / "tekken.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(path)
    assert str(e.value).startswith(f"{path}: not a mistral-common tokenizer file")


def test_corrupt_sentencepiece_file(tmp_path):
    path = tmp_path / "tokenizer.model.v3"
    path.write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match=str(path)):
        load_tokenizer(path)


def test_unrecognised_file_name(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_bytes(tiny_tokenizer_path().read_bytes())
    with pytest.raises(TokenizerError, match=str(path)):
        load_tokenizer(path)


def test_find_tokenizer_file(tmp_path):
    with pytest.raises(TokenizerError) as e:
        find_tokenizer_file(tmp_path)
    assert str(tmp_path) in str(e.value) and "tokenizer_path" in str(e.value)
    (tmp_path / "tokenizer.model.v3").write_bytes(b"x")
    (tmp_path / "tokenizer.model.v7").write_bytes(b"x")
    assert find_tokenizer_file(tmp_path) == tmp_path / "tokenizer.model.v7"
    (tmp_path / "tekken.json").write_bytes(b"x")
    assert find_tokenizer_file(tmp_path) == tmp_path / "tekken.json"
