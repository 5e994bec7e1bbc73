from __future__ import annotations

import json
import re

import pytest
import torch
from bitsandbytes.nn import Linear4bit
from transformers import LlamaConfig, Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, MistralForCausalLM

from magistune.model import ModelError, check_model_dir, format_model_info, freeze_except, load_model, resolve_dtype
from magistune.model.load import resolve_attn
from magistune.tokenizer import shipped_tokenizer_file

CPU = torch.device("cpu")


def test_dtype_policy(make_cfg):
    assert resolve_dtype(make_cfg(), CPU) == torch.float32  # "auto" on the CPU
    assert resolve_dtype(make_cfg(bf16=True), CPU) == torch.bfloat16
    assert resolve_dtype(make_cfg(bf16=False), torch.device("cuda")) == torch.float32


def test_flash_attention_falls_back_to_sdpa_on_cpu(capsys, make_cfg):
    assert resolve_attn(make_cfg(flash_attention=True), CPU) == "sdpa"
    assert "flash_attention_2" in capsys.readouterr().err
    assert resolve_attn(make_cfg(attn_implementation="eager"), CPU) == "eager"


@pytest.mark.parametrize("name,cls", [("text_dir", MistralForCausalLM), ("vision_dir", Mistral3ForConditionalGeneration)])
def test_loads_the_right_class_in_the_right_dtype(name, cls, request, tok, make_cfg):
    model_dir = request.getfixturevalue(name)
    model, info = load_model(make_cfg(bf16=True), model_dir, CPU, tokenizer=tok)
    assert type(model) is cls
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert info.kind == ("vision" if cls is Mistral3ForConditionalGeneration else "text")
    assert info.total_params == info.trainable_params == sum(p.numel() for p in model.parameters())
    assert info.weight_bytes == 2 * info.total_params
    assert model.config._attn_implementation == "sdpa"


def test_vocab_mismatch_is_an_error(text_dir, make_cfg):
    other = shipped_tokenizer_file("mistral_instruct_tokenizer_240323.model.v3")  # 32768 tokens
    cfg = make_cfg("tiny-random", tokenizer_path=str(other))
    with pytest.raises(ModelError, match=r"tokenizer has 32768 tokens but the model's embedding has 131072 rows"):
        load_model(cfg, text_dir, CPU)
    # and the model folder's own tekken.json is the default
    load_model(make_cfg("tiny-random"), text_dir, CPU)


def test_unfrozen_parameters(vision_dir, tok, make_cfg):
    patterns = [r"^lm_head\.", r"model\.language_model\.layers\.1\.mlp\."]
    model, info = load_model(make_cfg(unfrozen_parameters=patterns), vision_dir, CPU, tokenizer=tok)
    expect = {n for n, _ in model.named_parameters() if any(re.match(p, n) for p in patterns)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expect
    assert len(expect) == 4  # lm_head + gate, up, down of layer 1
    assert info.trainable_params == sum(p.numel() for n, p in model.named_parameters() if n in expect)
    with pytest.raises(ModelError, match="no parameter name matches"):
        freeze_except(model, [r"^transformer\.h\."])
    with pytest.raises(ModelError, match="row ranges"):
        freeze_except(model, [r"lm_head.weight[:1000]"])


def test_qlora_quantises_only_the_language_model(vision_dir, tok, make_cfg):
    cfg = make_cfg(adapter="qlora", load_in_4bit=True, lora_target_linear=True, bf16=True)
    model, info = load_model(cfg, vision_dir, CPU, tokenizer=tok)
    inner = model.model
    quantised = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    lm_linears = [n for n, m in inner.language_model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(quantised) == len(lm_linears) == 7 * model.config.text_config.num_hidden_layers
    assert all(n.startswith("model.language_model.") for n in quantised)
    for part in (inner.vision_tower, inner.multi_modal_projector, model.lm_head):
        assert not any(isinstance(m, Linear4bit) for m in part.modules())
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}
    for m in model.modules():
        if isinstance(m, Linear4bit):
            assert m.compute_dtype == torch.bfloat16 and m.weight.quant_state.quant_type == "nf4"
            assert m.weight.quant_state.nested  # double quantisation

    # counting: the 4-bit model has as many parameters as the bf16 one, in fewer bytes
    plain, plain_info = load_model(make_cfg(bf16=True), vision_dir, CPU, tokenizer=tok)
    assert info.total_params == plain_info.total_params
    expected = plain.get_memory_footprint(return_buffers=False)
    for n in quantised:  # bf16 -> packed 4-bit plus the library's own quantisation constants
        w = model.get_submodule(n).weight
        qs = w.quant_state
        expected += w.numel() * w.element_size() - 2 * qs.shape.numel()
        expected += qs.absmax.numel() * qs.absmax.element_size() + qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    assert info.weight_bytes == expected and info.quantized
    assert "nf4" in format_model_info(info)


def test_format_model_info():
    from magistune.model import ModelInfo

    info = ModelInfo("text", "MistralConfig", 24_000_000_000, 21_000_000, int(13.2 * 2**30), "bfloat16", True)
    assert format_model_info(info) == (
        "MistralConfig (text): trainable 21.0M / total 24.0B params (0.09%), weights 13.2 GiB (bfloat16 + nf4)"
    )


def test_unsupported_config_class(tmp_path):
    LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="LlamaConfig .*'llama'.* not supported"):
        check_model_dir(tmp_path)


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot be read as a model config"):
        check_model_dir(tmp_path)


def test_weights_must_exist(tmp_path, text_dir):
    (tmp_path / "config.json").write_bytes((text_dir / "config.json").read_bytes())
    with pytest.raises(ModelError, match="no model.safetensors"):
        check_model_dir(tmp_path)
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="missing: \\['model-00002-of-00002.safetensors'\\]"):
        check_model_dir(tmp_path)


def test_check_model_dir_accepts_the_tiny_models(text_dir, vision_dir):
    assert isinstance(check_model_dir(text_dir), MistralConfig)
    assert isinstance(check_model_dir(vision_dir), Mistral3Config)


def test_4bit_on_cpu_keeps_one_layout_through_eval_and_backward(text_dir, tok, make_cfg):
    """bitsandbytes' CPU repacking (eval-mode only, no autograd) is off: an eval, then a training step's backward,
    then an eval give what a freshly loaded model gives, as `magistune evaluate` must equal the training eval."""
    from magistune.model import build_model

    cfg = make_cfg("tiny-random", adapter="qlora", load_in_4bit=True, lora_target_linear=True)
    ids = torch.randint(100, 5000, (2, 12), generator=torch.Generator().manual_seed(0))

    def eval_logits(model):
        model.eval()
        with torch.no_grad():
            return model(input_ids=ids).logits

    torch.manual_seed(0)
    used, _, _ = build_model(cfg, torch.device("cpu"), tokenizer=tok)
    assert all(not m.support_avx512bf16_for_cpu for m in used.modules() if isinstance(m, Linear4bit))
    first = eval_logits(used)
    used.train()
    used(input_ids=ids).logits.sum().backward()
    torch.manual_seed(0)
    fresh, _, _ = build_model(cfg, torch.device("cpu"), tokenizer=tok)
    assert torch.equal(eval_logits(used), first) and torch.equal(eval_logits(fresh), first)
