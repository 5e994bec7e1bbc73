"""GGUF export: the file reads back with gguf's own reader; tensors, hyperparameters and the Tekken vocabulary
are what llama.cpp's converter writes, and its tokens + merges re-tokenise words as mistral-common does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from magistune.cli import main
from magistune.model_files.native import to_native
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
    assert "tokenizer.chat_template" in gguf_file.fields  # test_export_chat_template.py checks what it gives


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


# --- Mistral3 (2509): the decoder as the llama GGUF, the tower + projector as the mmproj file ----------------------


def as_torch(t, shape):
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        return torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(np.array(t.data)).reshape(shape)


@pytest.fixture(scope="module")
def vision_gguf(vision_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vgguf") / "v.gguf"
    assert main(["export", "--model", str(vision_dir), "--format", "gguf", "--output", str(out)]) == 0
    return gguf.GGUFReader(out), gguf.GGUFReader(out.parent / "mmproj-v.gguf")


def test_vision_model_decoder_gguf(vision_gguf, vision_dir):
    text, _ = vision_gguf
    with safe_open(str(vision_dir / "model.safetensors"), framework="pt") as f:
        hf = {k: f.get_tensor(k) for k in f.keys()}
    assert field(text, "general.architecture") == "llama" and field(text, "llama.embedding_length") == 64
    assert not any(t.name.startswith(("v.", "mm.")) for t in text.tensors)
    assert {t.name for t in text.tensors} >= {"token_embd.weight", "output.weight", "blk.1.attn_q.weight"}
    got = {t.name: t for t in text.tensors}
    want = hf["language_model.model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(as_torch(got["blk.1.attn_q.weight"], want.shape), to_native(want, 4))
    assert torch.equal(as_torch(got["output.weight"], (131072, 64)), hf["language_model.lm_head.weight"])


def test_vision_mmproj_is_what_llama_cpp_converter_writes(vision_gguf, vision_dir):
    _, mm = vision_gguf
    with safe_open(str(vision_dir / "model.safetensors"), framework="pt") as f:
        hf = {k: f.get_tensor(k) for k in f.keys()}
    expected = {"general.architecture": "clip", "general.type": "mmproj", "clip.has_vision_encoder": True,
                "clip.projector_type": "pixtral", "clip.vision.projection_dim": 64, "clip.vision.image_size": 1540,
                "clip.vision.patch_size": 14, "clip.vision.embedding_length": 32,
                "clip.vision.feed_forward_length": 64, "clip.vision.block_count": 2,
                "clip.vision.attention.head_count": 2, "clip.vision.spatial_merge_size": 2, "clip.use_gelu": True}
    for key, value in expected.items():
        assert field(mm, key) == value, key
    assert field(mm, "clip.vision.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert field(mm, "clip.vision.image_mean") == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    layer = {"attn_q": "attention.q_proj", "attn_k": "attention.k_proj", "attn_v": "attention.v_proj",
             "attn_out": "attention.o_proj", "ln1": "attention_norm", "ln2": "ffn_norm",
             "ffn_gate": "feed_forward.gate_proj", "ffn_up": "feed_forward.up_proj", "ffn_down": "feed_forward.down_proj"}
    source = {"v.patch_embd.weight": "vision_tower.patch_conv.weight", "v.pre_ln.weight": "vision_tower.ln_pre.weight",
              "mm.input_norm.weight": "multi_modal_projector.norm.weight",
              "mm.patch_merger.weight": "multi_modal_projector.patch_merger.merging_layer.weight",
              "mm.1.weight": "multi_modal_projector.linear_1.weight", "mm.2.weight": "multi_modal_projector.linear_2.weight"}
    source |= {f"v.blk.{i}.{g}.weight": f"vision_tower.transformer.layers.{i}.{h}.weight"
               for i in range(2) for g, h in layer.items()}
    got = {t.name: t for t in mm.tensors}
    assert set(got) == set(source) | {"v.token_embd.img_break"}
    for name, key in source.items():
        want = hf[key]
        if ".attn_q." in name or ".attn_k." in name:
            want = to_native(want, 2)  # the tower's 2 heads
        t = got[name]
        if want.dim() == 1 or want.dim() == 4:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            assert torch.equal(as_torch(t, want.shape), want.float()), name
        else:
            assert torch.equal(as_torch(t, want.shape), want), name
    img_break = hf["language_model.model.embed_tokens.weight"][12]
    assert torch.equal(as_torch(got["v.token_embd.img_break"], img_break.shape), img_break.float())
