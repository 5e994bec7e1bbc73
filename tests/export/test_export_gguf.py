"""GGUF export: the file reads back with gguf's own reader; tensors, hyperparameters and the Tekken vocabulary
are what llama.cpp's converter writes, and its tokens + merges re-tokenise words as mistral-common does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from magistune.cli import main
from magistune.model_files.native import to_native
from magistune.export.to_gguf import export_gguf
from magistune.tokenizer import load_tokenizer

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def gguf_file(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    assert main(["export", "--model", str(tiny_dir), "--format", "gguf", "--output", str(out)]) == 0
    (path,) = out.glob("*.gguf")
    return gguf.GGUFReader(path)


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def test_hyperparameters(gguf_file):
    expected = {
        "general.architecture": "llama", "general.file_type": int(gguf.LlamaFileType.MOSTLY_BF16),
        "llama.context_length": 40960, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": 128, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.attention.key_length": 16, "llama.attention.value_length": 16, "llama.rope.dimension_count": 16,
        "llama.vocab_size": 131072,
    }
    for key, value in expected.items():
        assert field(gguf_file, key) == value, key
    assert field(gguf_file, "llama.rope.freq_base") == pytest.approx(1e9)
    assert field(gguf_file, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)


def test_tensors_equal_the_checkpoint(gguf_file, tiny_dir):
    hf = {}
    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as f:
        hf = {k: f.get_tensor(k) for k in f.keys()}
    layer = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    source = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
    source |= {f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight" for i in range(2) for g, h in layer.items()}
    assert {t.name for t in gguf_file.tensors} == set(source)
    for t in gguf_file.tensors:
        want = hf[source[t.name]]
        if ".attn_q." in t.name:
            want = to_native(want, 4)  # llama.cpp's permute: Mistral's interleaved rotary rows
        elif ".attn_k." in t.name:
            want = to_native(want, 2)
        if want.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            got = torch.from_numpy(np.array(t.data))
            assert torch.equal(got, want.float()), t.name
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.BF16
            got = torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16).reshape(want.shape)
            assert torch.equal(got, want), t.name  # the checkpoint's bf16 bits, unchanged


def test_tokenizer_metadata(gguf_file):
    assert field(gguf_file, "tokenizer.ggml.model") == "gpt2"
    assert field(gguf_file, "tokenizer.ggml.pre") == "tekken"
    tokens = field(gguf_file, "tokenizer.ggml.tokens")
    types = field(gguf_file, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 131072
    assert tokens[:5] == ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"] and tokens[34:36] == ["[THINK]", "[/THINK]"]
    assert set(types[:1000]) == {int(gguf.TokenType.CONTROL)} and set(types[1000:]) == {int(gguf.TokenType.NORMAL)}
    assert tokens[1000 + 32] == "Ġ"  # the byte-level vocabulary: byte 0x20 as GPT-2's "Ġ"
    keys = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
    ids = {k: field(gguf_file, f"tokenizer.ggml.{k}") for k in keys}
    assert ids == {"bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0, "padding_token_id": 11}
    assert field(gguf_file, "tokenizer.ggml.add_bos_token") is True
    assert field(gguf_file, "tokenizer.ggml.add_eos_token") is False
    assert "tokenizer.chat_template" not in gguf_file.fields  # the documented gap


def bpe(word: bytes, ranks: dict[tuple[str, str], int], byte_char: dict[int, str]) -> list[str]:
    """GPT-2 byte-level BPE: start from single bytes, merge the lowest-ranked adjacent pair until none is left."""
    parts = [byte_char[b] for b in word]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 60), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 60:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def test_tokens_and_merges_retokenise_like_mistral_common(gguf_file, tiny_dir):
    from gguf.vocab import bytes_to_unicode

    tokens = field(gguf_file, "tokenizer.ggml.tokens")
    merges = field(gguf_file, "tokenizer.ggml.merges")
    ranks: dict[tuple[str, str], int] = {}
    for i, m in enumerate(merges):
        ranks.setdefault(tuple(m.split(" ")), i)
    index = {t: i for i, t in enumerate(tokens)}
    raw = load_tokenizer(tiny_dir / "tekken.json").instruct_tokenizer.tokenizer
    byte_char = bytes_to_unicode()
    for word in ["Hello", " tokenization", " internationalization", " naïve", " 日本語", " Magistral", "1"]:
        expected = raw.encode(word, bos=False, eos=False)
        assert [index[p] for p in bpe(word.encode("utf-8"), ranks, byte_char)] == expected, word


def test_vision_model_is_refused(vision_dir, tmp_path):
    with pytest.raises(ValueError, match="vision"):
        export_gguf(vision_dir, tmp_path / "v.gguf")
    assert not (tmp_path / "v.gguf").exists()
