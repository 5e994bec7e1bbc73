"""GGUF export of a model with a Hugging Face tokenizer (tiny-random-hf): the vocabulary llama.cpp reads is the
one the Tekken path writes for the same tokens (texts, types, merges, special ids), the chat template is the
model's own less its {% generation %} tags, and the native layout (which needs tekken.json) refuses it."""

from __future__ import annotations

import pytest

from magistune.cli import main
from magistune.model_files import materialize_tiny

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.slow  # two exports of 131072-token vocabularies: over a minute on a busy CPU


def export(model_dir, out) -> "gguf.GGUFReader":
    assert main(["export", "--model", str(model_dir), "--format", "gguf", "--output", str(out)]) == 0
    (path,) = out.glob("*.gguf")
    return gguf.GGUFReader(path)


@pytest.fixture(scope="module")
def readers(tiny_dir, tmp_path_factory):
    hf_dir = materialize_tiny("tiny-random-hf")
    return export(tiny_dir, tmp_path_factory.mktemp("tekken")), export(hf_dir, tmp_path_factory.mktemp("hf"))


def test_the_vocabulary_equals_the_tekken_export(readers):
    tekken, hf = readers
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "llama.vocab_size"):
        assert hf.fields[key].contents() == tekken.fields[key].contents(), key
    assert set(hf.fields["tokenizer.ggml.merges"].contents()) == set(tekken.fields["tokenizer.ggml.merges"].contents())
    assert {t.name for t in hf.tensors} == {t.name for t in tekken.tensors}


def test_the_template_is_the_model_s_own_without_generation_tags(readers):
    template = readers[1].fields["tokenizer.chat_template"].contents()
    assert "[AVAILABLE_TOOLS]" in template and "generation" not in template.replace("{#", "").split("#}", 1)[1]


def test_native_export_needs_a_mistral_common_tokenizer(tmp_path, capsys):
    code = main(["export", "--model", str(materialize_tiny("tiny-random-hf")), "--format", "mistral",
                 "--output", str(tmp_path / "native")])
    assert code != 0
    assert "Mistral's native layout carries a mistral-common tokenizer" in capsys.readouterr().err
