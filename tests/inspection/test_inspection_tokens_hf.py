"""`magistune inspect` names the tokens of a Hugging Face tokenizer as it names Tekken's: tiny-random-hf's
control names and byte pieces equal tiny-random's."""

from __future__ import annotations

import random

from magistune.hf_tokenizer import load_any_tokenizer, tiny_hf_tokenizer_path
from magistune.inspection.tokens import TokenNamer
from magistune.tokenizer import load_tokenizer, tiny_tokenizer_path


def test_names_and_pieces_equal_tekkens():
    hf, mc = TokenNamer(load_any_tokenizer(tiny_hf_tokenizer_path())), TokenNamer(load_tokenizer(tiny_tokenizer_path()))
    rng = random.Random(0)
    for i in list(range(40)) + [rng.randrange(1000, 131072) for _ in range(300)]:
        assert hf.control_name(i) == mc.control_name(i), i
        if mc.control_name(i) is None:
            assert hf.piece(i) == mc.piece(i), i
        assert hf.name_of(i) == mc.name_of(i), i
    assert hf.special == mc.special.__class__(**{**mc.special.__dict__, "img": None, "img_break": None, "img_end": None})
