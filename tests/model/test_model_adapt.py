from __future__ import annotations

import pytest
import torch
from bitsandbytes.nn import Linear4bit
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import Mistral3ForConditionalGeneration, MistralForCausalLM, MistralModel

from magistune.model import ModelError, apply_lora, build_model, load_adapter, load_model, model_info, save_trained

CPU = torch.device("cpu")


def lora_modules(model) -> set[str]:
    base = model.get_base_model()
    return {n for n, m in base.named_modules() if isinstance(m, LoraLayer)}


def decoder_linears(model) -> set[str]:
    """The linears of the (unwrapped) model's MistralModel; call it before apply_lora adds its own."""
    (prefix, decoder), = [(n, m) for n, m in model.named_modules() if isinstance(m, MistralModel)]
    return {f"{prefix}.{n}" for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)}


def randomize_lora(model, seed=0):
    """LoRA starts as a no-op (B = 0); give it weights so that it changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_target_linear_is_the_language_model_only(vision_dir, tok, make_cfg):
    model, _ = load_model(make_cfg(adapter="lora", lora_target_linear=True), vision_dir, CPU, tokenizer=tok)
    expect = decoder_linears(model)
    peft_model = apply_lora(model, make_cfg(adapter="lora", lora_target_linear=True))
    targets = lora_modules(peft_model)
    assert targets == expect and len(targets) == 7 * model.config.text_config.num_hidden_layers
    base = peft_model.get_base_model()
    for part in (base.model.vision_tower, base.model.multi_modal_projector, base.lm_head):
        assert not any(isinstance(m, LoraLayer) for m in part.modules())
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == {
        n for n, _ in peft_model.named_parameters() if ".lora_A." in n or ".lora_B." in n
    }


def test_named_targets(vision_dir, tok, make_cfg):
    # "q_proj" exists in Pixtral too, but a bare name means the language model's
    cfg = make_cfg(adapter="lora", lora_target_modules=["q_proj", "v_proj"])
    model = load_model(cfg, vision_dir, CPU, tokenizer=tok)[0]
    expect = {n for n in decoder_linears(model) if n.endswith((".q_proj", ".v_proj"))}
    assert lora_modules(apply_lora(model, cfg)) == expect and len(expect) == 4
    # a name that exists only outside the language model is an explicit request for it
    cfg = make_cfg(adapter="lora", lora_target_modules=["lm_head", "multi_modal_projector.linear_1"])
    peft_model = apply_lora(load_model(cfg, vision_dir, CPU, tokenizer=tok)[0], cfg)
    assert lora_modules(peft_model) == {"lm_head", "model.multi_modal_projector.linear_1"}
    # a regex is used as given
    cfg = make_cfg(adapter="lora", lora_target_modules=r".*\.layers\.0\.mlp\.down_proj")
    peft_model = apply_lora(load_model(cfg, vision_dir, CPU, tokenizer=tok)[0], cfg)
    assert lora_modules(peft_model) == {"model.language_model.layers.0.mlp.down_proj"}


@pytest.mark.parametrize("keys,message", [
    ({"lora_target_modules": ["qkv_proj"]}, r"'qkv_proj' matches no linear module; modules LoRA can wrap include \[.*q_proj"),
    ({"lora_target_modules": r"nothing\..*"}, "matches no module"),
    ({"lora_target_modules": r"model\.layers\.0\.self_attn"}, "LoRA cannot wrap"),
    ({}, "set lora_target_linear: true, or lora_target_modules"),
])
def test_bad_targets(keys, message, text_dir, tok, make_cfg):
    cfg = make_cfg("tiny-random", adapter="lora", **keys)
    model, _ = load_model(cfg, text_dir, CPU, tokenizer=tok)
    with pytest.raises(ModelError, match=message):
        apply_lora(model, cfg)


def test_qlora_forward_backward_on_cpu(vision_dir, tok, make_cfg, input_ids):
    """Only LoRA parameters get gradients, and checkpointing does not change them.

    bf16: auto is fp32 on the CPU (NF4 weights, fp32 compute): bf16 matmuls are slow there. The bf16
    compute path is exercised by the image test below and the qlora reload test.
    """
    grads = []
    for checkpointing in (False, True):
        cfg = make_cfg(adapter="qlora", load_in_4bit=True, lora_target_linear=True, gradient_checkpointing=checkpointing)
        model, _ = load_model(cfg, vision_dir, CPU, tokenizer=tok)
        model = apply_lora(model, cfg)
        assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 14
        assert model.get_base_model().is_activation_checkpointing == checkpointing
        randomize_lora(model)
        model.train()
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        assert torch.isfinite(loss)
        loss.backward()
        with_grad = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert set(with_grad) == {n for n, _ in model.named_parameters() if "lora_" in n} and len(with_grad) == 28
        assert all(g.abs().sum() > 0 for g in with_grad.values())
        grads.append(with_grad)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=0)


@pytest.mark.parametrize("keys", [
    {"adapter": "lora", "lora_target_linear": True},
    {"adapter": "lora", "lora_target_modules": ["q_proj", "lm_head"], "peft_use_dora": True},
    {"adapter": "qlora", "load_in_4bit": True, "lora_target_linear": True, "bf16": True},
], ids=["lora", "dora", "qlora"])
def test_saved_adapter_reloads_identically(keys, vision_dir, tok, make_cfg, input_ids, tmp_path):
    cfg = make_cfg(**keys)
    model = apply_lora(load_model(cfg, vision_dir, CPU, tokenizer=tok)[0], cfg)
    randomize_lora(model)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        with model.disable_adapter():
            assert not torch.equal(model(input_ids=input_ids).logits, logits)  # the adapter does something
    save_trained(model, tmp_path / "out", cfg)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "out").iterdir()}

    base, _ = load_model(cfg, vision_dir, CPU, tokenizer=tok)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "out")
    reloaded.eval()
    assert lora_modules(reloaded) == lora_modules(model)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids).logits, logits)


def test_full_fine_tune_saves_a_loadable_model(text_dir, tok, make_cfg, input_ids, tmp_path):
    cfg = make_cfg("tiny-random", gradient_checkpointing=True)
    model, info, model_dir = build_model(cfg, CPU, tokenizer=tok)
    assert model_dir == text_dir and info.trainable_params == info.total_params
    assert model.is_activation_checkpointing
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(0.01)  # "training"
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    save_trained(model, tmp_path / "out", cfg, tokenizer_file=text_dir / "tekken.json")
    reloaded = MistralForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids).logits, logits)
    # and the folder is itself a base_model
    again, _, _ = build_model(make_cfg(str(tmp_path / "out")), CPU)
    assert type(again) is MistralForCausalLM


def test_build_model_continues_a_saved_adapter(vision_dir, tok, make_cfg, tmp_path, input_ids):
    cfg = make_cfg(adapter="lora", lora_target_linear=True)
    model, info, _ = build_model(cfg, CPU, tokenizer=tok)
    assert isinstance(model, PeftModel) and isinstance(model.get_base_model(), Mistral3ForConditionalGeneration)
    assert info.trainable_params == model_info(model).trainable_params < info.total_params
    randomize_lora(model)
    save_trained(model, tmp_path / "a", cfg)
    resumed, info2, _ = build_model(make_cfg(adapter="lora", lora_target_linear=True, lora_model_dir=str(tmp_path / "a")),
                                    CPU, tokenizer=tok)
    assert info2.trainable_params == info.trainable_params  # loaded trainable
    model.eval(), resumed.eval()
    with torch.no_grad():
        assert torch.equal(resumed(input_ids=input_ids).logits, model(input_ids=input_ids).logits)
    with pytest.raises(ModelError, match="no adapter_config.json"):
        load_adapter(model.get_base_model(), tmp_path)


def test_qlora_image_path_reaches_an_explicit_projector_adapter(vision_dir, tok, make_cfg):
    """An image goes through the bf16 Pixtral tower and projector; a LoRA listed on the projector trains."""
    cfg = make_cfg(adapter="qlora", load_in_4bit=True, bf16=True, lora_target_linear=True,
                   lora_target_modules=["multi_modal_projector.linear_1"])
    model = apply_lora(load_model(cfg, vision_dir, CPU, tokenizer=tok)[0], cfg)
    randomize_lora(model)
    config = model.get_base_model().config
    # a 28 x 56 image is 2 x 4 patches of 14 pixels; the 2x2 merge leaves 1 x 2 = 2 image tokens
    img = config.image_token_index
    ids = torch.tensor([[tok.instruct_tokenizer.tokenizer.bos_id, img, img, 100, 200, 300]])
    pixels = torch.randn(1, 3, 28, 56, generator=torch.Generator().manual_seed(2))
    loss = model(input_ids=ids, pixel_values=pixels, image_sizes=torch.tensor([[28, 56]]), labels=ids).loss
    loss.backward()
    projector = [p for n, p in model.named_parameters() if "multi_modal_projector.linear_1.lora_" in n]
    assert len(projector) == 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n)


@pytest.mark.parametrize("prompt", ["Be brief.", ""])
def test_save_trained_keeps_the_system_prompt(prompt, tok, make_cfg, tmp_path):
    cfg = make_cfg("tiny-random", adapter="lora", lora_target_modules=["q_proj"], system_prompt=prompt)
    model, _, _ = build_model(cfg, CPU, tokenizer=tok)
    out = save_trained(model, tmp_path / "out", cfg)
    kept = out / "SYSTEM_PROMPT.txt"
    assert (kept.read_text(encoding="utf-8") == prompt) if prompt else not kept.exists()  # "": none was used
