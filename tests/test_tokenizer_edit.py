"""The run's tokenizer file: renamed reserved slots, added tokens (free slots, or a grown SentencePiece vocabulary),
special_tokens restated, and the errors for what cannot be done. Every written file loads with mistral-common."""

from __future__ import annotations

import pytest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from magistune.config import ConfigError, parse_config
from magistune.tokenizer import TINY_SPECIAL_TOKENS, load_tokenizer, shipped_tokenizer_file, tiny_tokenizer_path
from magistune.tokenizer_edit import TokenEdits, compress_ranges, free_slots, run_tokenizer_file
from magistune.tokenizer import named_token_ids, read_sp_proto

SP_V1 = "tokenizer.model.v1"  # no reserved control slot: adding tokens grows it
SP_V3 = "mistral_instruct_tokenizer_240323.model.v3"
SP_V7 = "mistral_instruct_tokenizer_241114.model.v7"  # trained USER_DEFINED pieces ([REF], ...)


def _raw(path):
    return load_tokenizer(path).instruct_tokenizer.tokenizer


def _plain(path):
    """mistral-common's own loading of a file: no magistune in between."""
    return MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer


def test_compress_ranges():
    assert compress_ranges([36, 20, 21, 22, 40, 41]) == "20-22, 36, 40-41"
    assert compress_ranges([]) == "none"


def test_free_slots_are_the_unused_reserved_ones():
    tiny = _raw(tiny_tokenizer_path())
    free = free_slots(tiny)
    # tiny-random lists <SPECIAL_20>..<SPECIAL_31> itself; mistral-common fills 36..999 with <SPECIAL_k>
    assert free == [i for i in range(tiny.num_special_tokens) if tiny.id_to_piece(i) == f"<SPECIAL_{i}>"]
    assert compress_ranges(free) == f"20-31, {len(TINY_SPECIAL_TOKENS)}-{tiny.num_special_tokens - 1}"
    v3 = _raw(shipped_tokenizer_file(SP_V3))
    assert all(v3.id_to_piece(i).startswith("[control_") for i in free_slots(v3)) and len(free_slots(v3)) > 700
    assert free_slots(_raw(shipped_tokenizer_file(SP_V1))) == []


def test_tekken_override_and_tokens(tmp_path):
    base = tiny_tokenizer_path()
    out = run_tokenizer_file(base, TokenEdits({25: "<ANSWER>"}, ("<CITE>", "</CITE>")), tmp_path)
    assert out.name == "tekken.json" and out != base
    plain, before = _plain(out), _plain(base)
    assert plain.n_words == before.n_words  # renamed, not grown
    assert [plain.id_to_piece(i) for i in (20, 21, 25)] == ["<CITE>", "</CITE>", "<ANSWER>"]  # lowest free slots
    assert named_token_ids(_raw(out)) == {"<CITE>": 20, "</CITE>": 21, "<ANSWER>": 25}
    # every other token is unchanged
    assert all(plain.id_to_piece(i) == before.id_to_piece(i) for i in range(plain.n_words) if i not in (20, 21, 25))
    assert plain.decode([20, 25], special_token_policy=SpecialTokenPolicy.KEEP) == "<CITE><ANSWER>"
    # the same edits again on the edited file change nothing; a second run writes the same file
    assert run_tokenizer_file(out, TokenEdits({25: "<ANSWER>"}, ("<CITE>", "</CITE>")), tmp_path) == out
    assert run_tokenizer_file(base, TokenEdits({25: "<ANSWER>"}, ("<CITE>", "</CITE>")), tmp_path) == out
    assert run_tokenizer_file(base, TokenEdits(), tmp_path) == base


def test_sentencepiece_uses_control_slots(tmp_path):
    base = shipped_tokenizer_file(SP_V3)
    first = free_slots(_raw(base))[:2]
    out = run_tokenizer_file(base, TokenEdits({first[1]: "<ANSWER>"}, ("<CITE>",)), tmp_path)
    assert out.name == base.name  # the version suffix mistral-common reads from the name
    plain = _plain(out)
    assert plain.n_words == _plain(base).n_words
    assert named_token_ids(_raw(out)) == {"<ANSWER>": first[1], "<CITE>": first[0]}
    assert plain.decode([first[0]], special_token_policy=SpecialTokenPolicy.KEEP).strip() == "<CITE>"


def test_sentencepiece_without_slots_grows(tmp_path):
    base = shipped_tokenizer_file(SP_V1)
    before = _plain(base)
    n = before.n_words
    out = run_tokenizer_file(base, TokenEdits({}, ("<CITE>", "</CITE>")), tmp_path)
    plain = _plain(out)
    assert plain.n_words == n + 2
    assert named_token_ids(_raw(out)) == {"<CITE>": n, "</CITE>": n + 1}
    assert plain.vocab()[:n] == before.vocab()


def test_trained_user_defined_pieces_are_not_named():
    assert named_token_ids(_raw(shipped_tokenizer_file(SP_V7))) == {}
    proto = read_sp_proto(shipped_tokenizer_file(SP_V7))
    assert "[REF]" in proto.trainer_spec.user_defined_symbols
    assert named_token_ids(_raw(tiny_tokenizer_path())) == {}


@pytest.mark.parametrize("edits, message", [
    (TokenEdits({3: "<X>"}), "added_tokens_overrides.3: id 3 is not a free reserved slot"),
    (TokenEdits({5000: "<X>"}), "the reserved slots are ids 0-999"),
    (TokenEdits({20: "[INST]"}), "'[INST]' is already token 3"),
    (TokenEdits({20: " "}), "a token name must be non-empty text"),
    (TokenEdits({20: "<X>", 21: "<X>"}), "'<X>' is given to two ids"),
    (TokenEdits({}, ("</s>",)), "tokens: '</s>' is already token 2"),
])
def test_bad_edits_name_the_key_and_the_free_slots(tmp_path, edits, message):
    with pytest.raises(ConfigError) as e:
        run_tokenizer_file(tiny_tokenizer_path(), edits, tmp_path)
    assert message in str(e.value)
    if "free reserved slot" in message:
        assert f"free slots: 20-31, {len(TINY_SPECIAL_TOKENS)}-999" in str(e.value)


def test_tekken_cannot_grow(tmp_path):
    free = free_slots(_raw(tiny_tokenizer_path()))
    with pytest.raises(ConfigError, match=f"tokens: {len(free) + 1} new token.* {len(free)} free reserved slot"):
        run_tokenizer_file(tiny_tokenizer_path(), TokenEdits({}, tuple(f"<T{i}>" for i in range(len(free) + 1))), tmp_path)


def test_special_tokens_only_restate(tmp_path):
    base = tiny_tokenizer_path()
    same = TokenEdits(special_tokens={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
    assert run_tokenizer_file(base, same, tmp_path) == base
    with pytest.raises(ConfigError, match=r"special_tokens.eos_token: '<\|im_end\|>' is not this tokenizer's eos token "
                                          r"\('</s>', id 2"):
        run_tokenizer_file(base, TokenEdits(special_tokens={"eos_token": "<|im_end|>"}), tmp_path)
    with pytest.raises(ConfigError, match="special_tokens.sep_token: unknown"):
        run_tokenizer_file(base, TokenEdits(special_tokens={"sep_token": "</s>"}), tmp_path)
    with pytest.raises(ConfigError, match="has no pad token"):  # Mistral's SentencePiece files have none
        run_tokenizer_file(shipped_tokenizer_file(SP_V3), TokenEdits(special_tokens={"pad_token": "<pad>"}), tmp_path)


def test_config_keys():
    cfg, _ = parse_config({"base_model": "tiny-random", "datasets": [{"path": "d.jsonl"}],
                           "added_tokens_overrides": {"20": "<A>"}, "tokens": ["<B>"],
                           "special_tokens": {"eos_token": "</s>"}})
    assert TokenEdits.of(cfg) == TokenEdits({20: "<A>"}, ("<B>",), {"eos_token": "</s>"})
