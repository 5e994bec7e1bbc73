"""Mistral3's vision tower + projector → llama.cpp's multimodal projector file (`mmproj-….gguf`, architecture
"clip"), as llama.cpp's convert_hf_to_gguf.py --mmproj writes Mistral3ForConditionalGeneration (its
LlavaVisionModel on an MmprojModel base). llama.cpp runs it beside the language model's GGUF (to_gguf.py):
`llama-mtmd-cli -m model.gguf --mmproj mmproj-model.gguf --image pic.png`.

  tensors   names from gguf's own MMPROJ name table (the converter's map_tensor_name): v.patch_embd, v.pre_ln,
            v.blk.N.{attn_q, attn_k, attn_v, attn_out, ln1, ln2, ffn_gate, ffn_up, ffn_down}, mm.input_norm,
            mm.patch_merger, mm.1, mm.2; attn_q / attn_k rows in the interleaved rotary order (the converter's
            LlamaModel.permute, with the tower's heads); plus v.token_embd.img_break, the language model's
            embedding row of [IMG_BREAK] (the converter extracts it the same way).
  hparams   general.type "mmproj", clip.has_vision_encoder, clip.projector_type "pixtral",
            clip.vision.{projection_dim (the decoder's width), image_size, patch_size, embedding_length,
            feed_forward_length, block_count, attention.head_count, attention.layer_norm_epsilon (1e-5, Pixtral's
            fixed value), image_mean, image_std (mistral-common's, which our training used), spatial_merge_size},
            clip.use_silu / clip.use_gelu from vision_config.hidden_act.
  dtypes    matrices bf16 or f16 like the language model; 1-D tensors f32; the 4-D patch convolution f16 or f32
            (ggml's im2col takes no bf16 kernel).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from magistune.model_files.native import to_native
from magistune.model_files.shards import TensorReader

PIXTRAL_NORM_EPS = 1e-5  # hard-coded in transformers' modeling_pixtral (not in config.json)


def mmproj_names(config, loaded_names: list[str]) -> dict[str, str]:
    """{parameter name: GGUF name} of the tower and projector, from gguf's MMPROJ table."""
    import gguf

    # The table numbers blocks up to its size: mm.2 (linear_2) needs at least 3 even for a 2-layer tower.
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(config.vision_config.num_hidden_layers, 3))
    out = {}
    for name in loaded_names:
        if not name.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
            continue
        legacy = name[len("model."):]  # the table knows the checkpoint spelling: vision_tower.…, multi_modal_projector.…
        mapped = table.get_name(legacy, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ValueError(f"{name}: no name in llama.cpp's mmproj table")
        out[name] = mapped
    return out


def _hparams(writer, config, mean, std) -> None:
    import gguf

    v = config.vision_config
    if v.hidden_act not in ("silu", "gelu"):
        raise ValueError(f"vision_config.hidden_act {v.hidden_act}: llama.cpp's Pixtral runs silu or gelu only")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(gguf.VisionProjectorType.PIXTRAL)
    writer.add_vision_projection_dim(config.text_config.hidden_size)
    writer.add_vision_image_size(v.image_size)
    writer.add_vision_patch_size(v.patch_size)
    writer.add_vision_embedding_length(v.hidden_size)
    writer.add_vision_feed_forward_length(v.intermediate_size)
    writer.add_vision_block_count(v.num_hidden_layers)
    writer.add_vision_head_count(v.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(PIXTRAL_NORM_EPS)
    writer.add_vision_image_mean(list(mean))
    writer.add_vision_image_std(list(std))
    writer.add_vision_spatial_merge_size(config.spatial_merge_size)
    if v.hidden_act == "silu":
        writer.add_vision_use_silu(True)
    else:
        writer.add_vision_use_gelu(True)


def export_mmproj(config, located, loaded_name: dict[str, str], out_path: Path, dtype: str, img_break: int,
                  name: str) -> Path:
    """Write the mmproj file of a Mistral3 checkpoint (`located`: its tensor specs; `loaded_name`: checkpoint key →
    parameter name). Tensors stream one at a time."""
    import gguf
    from mistral_common.tokens.tokenizers.image import DATASET_MEAN, DATASET_STD

    names = mmproj_names(config, list(loaded_name.values()))
    keys = [s.name for _, s in located if loaded_name[s.name] in names]
    embed = next(s.name for _, s in located if loaded_name[s.name].endswith("embed_tokens.weight"))
    heads = config.vision_config.num_attention_heads
    f16 = dtype == "f16"

    writer = gguf.GGUFWriter(out_path, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.MOSTLY_BF16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _hparams(writer, config, DATASET_MEAN, DATASET_STD)

    def as_array(w: torch.Tensor) -> tuple[np.ndarray, object]:
        if w.dim() == 1 or (w.dim() == 4 and not f16):
            return w.float().numpy(), None
        if w.dim() == 4 or f16:
            return w.to(torch.float16).numpy(), None
        return w.to(torch.bfloat16).contiguous().view(torch.int16).numpy(), gguf.GGMLQuantizationType.BF16

    reader = TensorReader({s.name: path for path, s in located})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        for key in keys:  # small next to the language model (0.4B of 24B): added whole, written at the end
            w = reader.get(key)
            if loaded_name[key].endswith(("attention.q_proj.weight", "attention.k_proj.weight")):
                w = to_native(w, heads)
            array, raw = as_array(w)
            writer.add_tensor(names[loaded_name[key]], array, raw_dtype=raw)
        row = reader.get(embed)[img_break].float().numpy()  # llama.cpp adds it after every row of patches
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_TOK_EMBD_IMG_BREAK], row)  # no .weight: clip.cpp's name
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        reader.close()
        writer.close()
    return out_path
