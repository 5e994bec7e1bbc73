"""Mistral3 (Magistral Small 2509: Pixtral tower + projector + Mistral decoder) in Mistral's native layout:
the vision names and params.json's `vision_encoder` block. native.py composes them with the decoder's tables.

    HF parameter (transformers 5)                                    native (vLLM's Pixtral, transformers'
                                                                     convert_mistral3_weights_to_hf.py)
    model.language_model.*, lm_head                                  the decoder's names (native.py)
    model.vision_tower.patch_conv / ln_pre                           vision_encoder.patch_conv / ln_pre
    model.vision_tower.transformer.layers.N.attention.{q,k,v,o}_proj vision_encoder.transformer.layers.N.attention.w{q,k,v,o}
    model.vision_tower.transformer.layers.N.feed_forward.{gate,down,up}_proj   ….feed_forward.w{1,2,3}
    model.vision_tower.transformer.layers.N.{attention,ffn}_norm      ….{attention,ffn}_norm
    model.multi_modal_projector.norm                                  pre_mm_projector_norm
    model.multi_modal_projector.patch_merger.merging_layer            patch_merger.merging_layer
    model.multi_modal_projector.linear_1 / linear_2                   vision_language_adapter.w_in / w_out

Pixtral's wq / wk rows are reordered like the decoder's (the native 2-D rotary pairs adjacent dimensions too;
transformers' conversion permutes them with the tower's head count). The native tower has no activation
settings: its MLP is SiLU-gated and the adapter between w_in and w_out is a GELU, so a config saying otherwise
cannot be written (check_vision).
"""

from __future__ import annotations

from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig

VISION_TOP = {
    "model.vision_tower.patch_conv.weight": "vision_encoder.patch_conv.weight",
    "model.vision_tower.ln_pre.weight": "vision_encoder.ln_pre.weight",
    "model.multi_modal_projector.norm.weight": "pre_mm_projector_norm.weight",
    "model.multi_modal_projector.patch_merger.merging_layer.weight": "patch_merger.merging_layer.weight",
    "model.multi_modal_projector.linear_1.weight": "vision_language_adapter.w_in.weight",
    "model.multi_modal_projector.linear_1.bias": "vision_language_adapter.w_in.bias",
    "model.multi_modal_projector.linear_2.weight": "vision_language_adapter.w_out.weight",
    "model.multi_modal_projector.linear_2.bias": "vision_language_adapter.w_out.bias",
}
VISION_LAYER = {
    "attention_norm.weight": "attention_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "attention.q_proj.weight": "attention.wq.weight", "attention.k_proj.weight": "attention.wk.weight",
    "attention.v_proj.weight": "attention.wv.weight", "attention.o_proj.weight": "attention.wo.weight",
    "feed_forward.gate_proj.weight": "feed_forward.w1.weight", "feed_forward.down_proj.weight": "feed_forward.w2.weight",
    "feed_forward.up_proj.weight": "feed_forward.w3.weight",
}


def vision_names(n_layers: int) -> dict[str, str]:
    """{HF parameter name: native name} of the tower and projector."""
    names = dict(VISION_TOP)
    for i in range(n_layers):
        names.update({f"model.vision_tower.transformer.layers.{i}.{hf}": f"vision_encoder.transformer.layers.{i}.{nat}"
                      for hf, nat in VISION_LAYER.items()})
    return names


def vision_rotary_heads(config: Mistral3Config) -> dict[str, int]:
    """{native name: heads} of the tower's wq and wk."""
    v = config.vision_config
    return {f"vision_encoder.transformer.layers.{i}.attention.w{x}.weight": v.num_attention_heads
            for i in range(v.num_hidden_layers) for x in "qk"}


def check_vision(config: Mistral3Config) -> str | None:
    """Why this Mistral3 config has no native form, or None."""
    v = config.vision_config
    if v.hidden_act != "silu":
        return (f"vision_config.hidden_act is {v.hidden_act}; the native Pixtral tower's MLP is SiLU-gated "
                "(vLLM's and mistral-inference's native Pixtral have no other activation)")
    if config.projector_hidden_act != "gelu":
        return f"projector_hidden_act is {config.projector_hidden_act}; the native adapter is a GELU"
    if config.vision_feature_layer != -1:
        return f"vision_feature_layer is {config.vision_feature_layer}; the native layout uses the last layer (-1)"
    if v.head_dim * v.num_attention_heads != v.hidden_size:
        return "vision_config.head_dim × num_attention_heads differs from hidden_size; native Pixtral derives it"
    return None


def vision_params(config: Mistral3Config, img_break: int, img_end: int) -> dict:
    """params.json's `vision_encoder` block (the keys vLLM's and mistral-inference's VisionEncoderArgs read)."""
    v = config.vision_config
    return {
        "hidden_size": v.hidden_size, "num_channels": v.num_channels, "image_size": v.image_size,
        "max_image_size": v.image_size, "patch_size": v.patch_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
        "rope_theta": (v.rope_parameters or {}).get("rope_theta", 10000.0),
        "image_token_id": config.image_token_index, "image_break_token_id": img_break, "image_end_token_id": img_end,
        "adapter_bias": config.multimodal_projector_bias, "spatial_merge_size": config.spatial_merge_size,
        "add_pre_mm_projector_layer_norm": True, "mm_projector_id": "patch_merge",
    }


def mistral3_config(block: dict, text: MistralConfig, where: str) -> Mistral3Config:
    """The Mistral3Config of a native `vision_encoder` block and the decoder's config."""
    if block.get("mm_projector_id", "patch_merge") != "patch_merge" or not block.get("add_pre_mm_projector_layer_norm", True):
        raise ValueError(f"{where}: vision_encoder without the patch merger and its norm (Pixtral 12B's layout) is "
                         "not supported; Mistral3 (Magistral Small 2509) has both")
    vision = PixtralVisionConfig(
        hidden_size=block["hidden_size"], intermediate_size=block["intermediate_size"],
        num_hidden_layers=block["num_hidden_layers"], num_attention_heads=block["num_attention_heads"],
        num_channels=block.get("num_channels", 3), image_size=block["image_size"], patch_size=block["patch_size"],
        head_dim=block["hidden_size"] // block["num_attention_heads"], hidden_act="silu",
        rope_parameters={"rope_theta": float(block.get("rope_theta", 10000.0)), "rope_type": "axial"},
    )
    return Mistral3Config(
        vision_config=vision, text_config=text, image_token_index=block.get("image_token_id", 10),
        spatial_merge_size=block["spatial_merge_size"], projector_hidden_act="gelu",
        multimodal_projector_bias=bool(block.get("adapter_bias", False)), vision_feature_layer=-1,
        tie_word_embeddings=False, dtype=text.dtype, architectures=["Mistral3ForConditionalGeneration"],
    )
