"""Mistral's native layout: HF → native → HF is bit-identical, and the native q/k rows are the ones Mistral's
interleaved rotary embedding expects (checked against transformers' rotary on the same input)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import MistralForCausalLM
from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

from adapter_helpers import save_adapter
from magistune.cli import main
from magistune.model_files.native import hf_layout_for, native_to_hf
from magistune.model_files.shards import checkpoint_files

IDS = torch.randint(100, 131072, (2, 12), generator=torch.Generator().manual_seed(2))


def tensors(files) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


@pytest.fixture(scope="module")
def native_dir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("native")
    assert main(["export", "--model", str(tiny_dir), "--format", "mistral", "--output", str(out)]) == 0
    return out


def test_native_layout(native_dir, tiny_dir):
    params = json.loads((native_dir / "params.json").read_text())
    assert params == {"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 128, "n_heads": 4, "n_kv_heads": 2,
                      "norm_eps": 1e-05, "vocab_size": 131072, "rope_theta": 1e9, "max_seq_len": 40960,
                      "max_position_embeddings": 40960, "tied_embeddings": False}
    # vLLM's Mistral format takes the context from max_position_embeddings (128,000 when it is absent)
    assert params["max_position_embeddings"] == json.loads((tiny_dir / "config.json").read_text())["max_position_embeddings"]
    names = tensors([native_dir / "consolidated.safetensors"]).keys()
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"} | {
        f"layers.{i}.{n}.weight" for i in range(2) for n in
        ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
         "feed_forward.w3", "attention_norm", "ffn_norm")}
    assert set(names) == expected
    assert (native_dir / "tekken.json").read_bytes() == (tiny_dir / "tekken.json").read_bytes()


def test_round_trip_is_bit_identical(native_dir, tiny_dir, tmp_path):
    back = native_to_hf(native_dir, tmp_path / "back")
    original, again = tensors(checkpoint_files(tiny_dir)), tensors(checkpoint_files(back))
    assert original.keys() == again.keys()
    for name in original:
        assert original[name].dtype == again[name].dtype and torch.equal(original[name], again[name]), name
    a, b = (MistralForCausalLM.from_pretrained(d, dtype=torch.float32) for d in (tiny_dir, back))
    assert a.config.to_dict() | {"_name_or_path": ""} == b.config.to_dict() | {"_name_or_path": ""}
    with torch.no_grad():
        assert torch.equal(a(input_ids=IDS).logits, b(input_ids=IDS).logits)


def mistral_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Mistral's own rotary embedding (mistral-inference's precompute_freqs_cis / apply_rotary_emb): adjacent
    pairs (2i, 2i+1) of each head are one complex number, turned by position × theta^(-2i/d)."""
    d = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(positions.double(), freqs)  # (T, d/2)
    rot = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)[:, None, :]  # (T, 1, d/2)
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], d // 2, 2))  # (T, H, d/2)
    return torch.view_as_real(pairs * rot).flatten(-2)


def test_native_rows_match_mistral_rotary(native_dir, tiny_dir):
    model = MistralForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    native = {k: v.float() for k, v in tensors([native_dir / "consolidated.safetensors"]).items()}
    cfg = model.config
    T, d = 7, cfg.head_dim
    x = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(T) + 3
    cos, sin = model.model.rotary_emb(x[None], positions[None])
    attn = model.model.layers[0].self_attn
    for proj, key, heads in ((attn.q_proj, "layers.0.attention.wq.weight", cfg.num_attention_heads),
                             (attn.k_proj, "layers.0.attention.wk.weight", cfg.num_key_value_heads)):
        hf = (x @ proj.weight.T).view(1, T, heads, d).transpose(1, 2)  # (1, H, T, d)
        hf, _ = apply_rotary_pos_emb(hf, hf, cos, sin)
        hf = hf[0].transpose(0, 1)  # (T, H, d), rotate_half layout
        ours = mistral_rotary((x @ native[key].T).view(T, heads, d), positions, cfg.rope_parameters["rope_theta"])
        # Native dim 2i is HF dim i, native 2i+1 is HF i + d/2: the same rotated vectors, reordered.
        torch.testing.assert_close(ours[..., 0::2], hf[..., : d // 2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours[..., 1::2], hf[..., d // 2:], rtol=1e-5, atol=1e-6)


def test_hf_layout_for_converts_once(native_dir, tmp_path):
    first = hf_layout_for(native_dir, tmp_path / "cache")
    assert hf_layout_for(native_dir, tmp_path / "cache") == first
    assert (first / "config.json").is_file() and (first / "tekken.json").is_file()


def test_adapter_outputs_are_refused_clearly(tmp_path, capsys):
    save_adapter("tiny-random", tmp_path / "out")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"base_model": "tiny-random", "datasets": [{"path": "d.jsonl"}], "adapter": "lora",
                                   "lora_target_linear": True, "output_dir": "out"}), encoding="utf-8")
    assert main(["export", str(cfg), "--format", "mistral", "--output", str(tmp_path / "n")]) == 2
    assert "merge it first" in capsys.readouterr().err


def test_native_layout_as_training_base_model(native_dir, tiny_dir, tmp_path, monkeypatch):
    """base_model: <native folder> resolves to a converted HF copy whose logits equal the original's."""
    from magistune.model_files import resolve_model_dir

    monkeypatch.setenv("HOME", str(tmp_path))  # the conversion cache lives under ~/.cache/magistune
    converted = resolve_model_dir(str(native_dir))
    assert (converted / "config.json").is_file() and converted != native_dir
    assert resolve_model_dir(str(native_dir)) == converted  # converted once, then reused
    a, b = (MistralForCausalLM.from_pretrained(d, dtype=torch.float32) for d in (tiny_dir, converted))
    ids = torch.tensor([[1, 5, 900, 1200, 77]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_cpu_full_fine_tune_exports_in_the_declared_dtype(tmp_path):
    """A CPU run trains in fp32; the folder keeps those weights (evaluate equals training) and the base's declared
    bf16 in config.json, which export writes unless --dtype asks otherwise."""
    from safetensors import safe_open

    from magistune.config import parse_config
    from magistune.model import build_model, resolve_model_dir, save_trained

    cfg, _ = parse_config({"base_model": "tiny-random", "datasets": [{"path": "x"}]})
    model, _, _ = build_model(cfg, torch.device("cpu"))
    assert next(model.parameters()).dtype == torch.float32
    out = save_trained(model, tmp_path / "full", cfg, tokenizer_file=resolve_model_dir("tiny-random") / "tekken.json")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(checkpoint_files(out)[0]), framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.float32
    for flag, dtype in (([], torch.bfloat16), (["--dtype", "fp32"], torch.float32)):
        native = tmp_path / f"native{len(flag)}"
        assert main(["export", "--model", str(out), "--format", "mistral", "--output", str(native), *flag]) == 0
        assert {t.dtype for t in tensors([native / "consolidated.safetensors"]).values()} == {dtype}
