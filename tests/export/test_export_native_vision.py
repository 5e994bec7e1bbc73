"""Mistral3 (Magistral Small 2509's shape) in Mistral's native layout: vision_encoder.*, vision_language_adapter.*,
the patch merger and its norm, params.json's vision_encoder block; HF → native → HF is bit-identical and the
native folder works as base_model with the same logits, images included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import Mistral3ForConditionalGeneration

from magistune.cli import main
from magistune.export.names import param_names
from magistune.export.native import ExportError, hf_to_native
from magistune.model_files.native import native_to_hf
from magistune.model_files.shards import checkpoint_files, read_specs

SHAPES = Path(__file__).resolve().parents[2] / "examples" / "data" / "shapes"


def by_param(folder: Path) -> dict[str, torch.Tensor]:
    """Tensors under their loaded parameter names (checkpoints spell Mistral3's names two ways)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    located = read_specs(checkpoint_files(folder))
    names = param_names(AutoConfig.from_pretrained(folder), [s.name for _, s in located])
    out = {}
    for path, spec in located:
        with safe_open(str(path), framework="pt") as f:
            out[names[spec.name]] = f.get_tensor(spec.name)
    return out


@pytest.fixture(scope="module")
def silu_vision(vision_dir, tmp_path_factory):
    """tiny-random-vision with Magistral 2509's SiLU vision MLP (the tiny model keeps transformers' GELU default,
    which the native layout cannot express)."""
    out = tmp_path_factory.mktemp("silu") / "m"
    shutil.copytree(vision_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["vision_config"]["hidden_act"] = "silu"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="module")
def native_vision(silu_vision, tmp_path_factory):
    out = tmp_path_factory.mktemp("native_vision")
    assert main(["export", "--model", str(silu_vision), "--format", "mistral", "--output", str(out)]) == 0
    return out


def test_native_names_and_params(native_vision, silu_vision):
    from safetensors import safe_open

    with safe_open(str(native_vision / "consolidated.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert {"vision_encoder.patch_conv.weight", "vision_encoder.ln_pre.weight", "pre_mm_projector_norm.weight",
            "patch_merger.merging_layer.weight", "vision_language_adapter.w_in.weight",
            "vision_language_adapter.w_out.weight", "vision_encoder.transformer.layers.1.attention.wq.weight",
            "vision_encoder.transformer.layers.0.feed_forward.w3.weight", "tok_embeddings.weight", "output.weight",
            "layers.1.attention.wk.weight"} <= names
    assert not any(n.startswith(("model.", "language_model.", "multi_modal")) for n in names)
    params = json.loads((native_vision / "params.json").read_text())
    config = json.loads((silu_vision / "config.json").read_text())
    assert params["max_position_embeddings"] == config["text_config"]["max_position_embeddings"]
    assert params["vision_encoder"] == {
        "hidden_size": 32, "num_channels": 3, "image_size": 1540, "max_image_size": 1540, "patch_size": 14,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "rope_theta": 10000.0,
        "image_token_id": 10, "image_break_token_id": 12, "image_end_token_id": 13, "adapter_bias": False,
        "spatial_merge_size": 2, "add_pre_mm_projector_layer_norm": True, "mm_projector_id": "patch_merge"}


def _logits(folder: Path) -> torch.Tensor:
    from magistune.infer.prompts import build_request, encode_with_images, image_inputs, load_chat_tokenizer
    from magistune.data.images import ImageOptions

    tok = load_chat_tokenizer(folder / "tekken.json")
    ids, images = encode_with_images(tok, build_request(
        [{"role": "user", "content": [{"type": "image", "path": "green-circle.png"}, {"type": "text", "text": "?"}]}],
        images=ImageOptions(SHAPES)))
    model = Mistral3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), **image_inputs(images, torch.device("cpu"))).logits


def test_round_trip_is_bit_identical(native_vision, silu_vision, tmp_path):
    back = native_to_hf(native_vision, tmp_path / "back")
    original, again = by_param(silu_vision), by_param(back)
    assert original.keys() == again.keys()
    for name in original:
        assert original[name].dtype == again[name].dtype and torch.equal(original[name], again[name]), name
    assert torch.equal(_logits(silu_vision), _logits(back))


def test_native_vision_folder_as_base_model(native_vision, silu_vision, tmp_path, monkeypatch):
    from magistune.model_files import resolve_model_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    converted = resolve_model_dir(str(native_vision))
    assert json.loads((converted / "config.json").read_text())["model_type"] == "mistral3"
    assert torch.equal(_logits(silu_vision), _logits(converted))


def test_a_gelu_tower_is_refused_clearly(vision_dir, tmp_path):
    with pytest.raises(ExportError, match="SiLU-gated"):
        hf_to_native(vision_dir, tmp_path / "v")
