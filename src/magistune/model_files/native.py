"""Mistral's native layout (params.json + consolidated.safetensors + tekken.json) -> Hugging Face's, and the
name and row tables both directions share (export/native.py writes the other direction).

    HF (MistralForCausalLM)                        native (mistral-inference, vLLM's "mistral" format)
    model.embed_tokens.weight                      tok_embeddings.weight
    model.layers.N.self_attn.{q,k,v,o}_proj        layers.N.attention.w{q,k,v,o}
    model.layers.N.mlp.{gate,down,up}_proj         layers.N.feed_forward.w{1,2,3}
    model.layers.N.input_layernorm                 layers.N.attention_norm
    model.layers.N.post_attention_layernorm        layers.N.ffn_norm
    model.norm / lm_head                           norm / output

Rotary embeddings pair the dimensions of a head differently. Mistral's code rotates adjacent pairs (2i, 2i+1)
as complex numbers; transformers' `rotate_half` rotates (i, i + head_dim/2). transformers' conversion script
(convert_mistral_weights_to_hf.py, `permute_for_rope`) therefore reorders the rows of wq and wk inside every
head: native row 2i becomes HF row i and native row 2i+1 becomes HF row i + head_dim/2. For head_dim 4:

    native rows  [x0, y0, x1, y1]   <->   HF rows  [x0, x1, y0, y1]       (x_i, y_i rotate together)

`to_native` undoes it (the same reordering llama.cpp's convert_hf_to_gguf applies as `permute`, because GGUF's
llama architecture also rotates adjacent pairs); `to_hf` redoes it. wq has n_heads heads, wk n_kv_heads.
wv, wo and everything else are copied unchanged. The files are written tensor by tensor (shards.py).

`base_model: <native folder>` resolves (resolve.py) to `hf_layout_for`'s converted copy, made once and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import GenerationConfig, Mistral3Config, MistralConfig

from magistune.config import ConfigError
from magistune.model_files.native_vision import mistral3_config, vision_names, vision_rotary_heads
from magistune.model_files.shards import DEFAULT_SHARD_BYTES, TensorReader, TensorSpec, read_specs, write_sharded
from magistune.tokenizer import SpecialIds, file_digest, find_tokenizer_file, load_tokenizer

TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}
LAYER = {
    "input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}
DEFAULT_MAX_SEQ_LEN = 32768  # transformers' conversion default when params.json has no max_seq_len


class NativeLayoutError(ConfigError):
    """A native folder that cannot be converted: the message names the file and the reason."""


def is_native(path: Path) -> bool:
    """params.json + consolidated*.safetensors and no config.json."""
    path = Path(path)
    return not (path / "config.json").is_file() and (path / "params.json").is_file() and any(path.glob("consolidated*.safetensors"))


def hf_to_native_names(n_layers: int) -> dict[str, str]:
    names = dict(TOP)
    for i in range(n_layers):
        names.update({f"model.layers.{i}.{hf}": f"layers.{i}.{nat}" for hf, nat in LAYER.items()})
    return names


def native_names(config: MistralConfig | Mistral3Config) -> dict[str, str]:
    """{HF parameter name: native name}; Mistral3's decoder sits under model.language_model (native_vision.py)."""
    if not isinstance(config, Mistral3Config):
        return hf_to_native_names(config.num_hidden_layers)
    text = {(f"model.language_model.{k[len('model.'):]}" if k.startswith("model.") else k): v
            for k, v in hf_to_native_names(config.text_config.num_hidden_layers).items()}
    return text | vision_names(config.vision_config.num_hidden_layers)


def rotary_heads(config: MistralConfig | Mistral3Config) -> dict[str, int]:
    """{native name: heads whose rows to_native / to_hf reorder}: every wq and wk, the decoder's and Pixtral's."""
    text = config.text_config if isinstance(config, Mistral3Config) else config
    heads = {}
    for i in range(text.num_hidden_layers):
        heads[f"layers.{i}.attention.wq.weight"] = text.num_attention_heads
        heads[f"layers.{i}.attention.wk.weight"] = text.num_key_value_heads
    return heads | (vision_rotary_heads(config) if isinstance(config, Mistral3Config) else {})


def to_native(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rows (per head: first halves, then second halves) -> interleaved pairs. (n·d, in) -> same shape."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved pairs -> HF rows; the inverse of to_native (transformers' permute_for_rope)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def native_to_hf(native_dir: Path, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """A Hugging Face folder (config.json, model*.safetensors, generation_config.json, tekken.json) of a native one."""
    native_dir, out_dir = Path(native_dir), Path(out_dir)
    files = sorted(native_dir.glob("consolidated*.safetensors"))
    if not (native_dir / "params.json").is_file() or not files:
        raise NativeLayoutError(f"{native_dir}: not the native Mistral layout (params.json + consolidated*.safetensors)")
    params = json.loads((native_dir / "params.json").read_text(encoding="utf-8"))
    for key in ("moe", "lora", "yarn", "quantization"):
        if params.get(key):
            raise NativeLayoutError(f"{native_dir / 'params.json'}: '{key}' is not supported by the conversion to Hugging Face")
    tok_file = find_tokenizer_file(native_dir)
    ids = SpecialIds.of(load_tokenizer(tok_file))
    located = read_specs(files)
    dtype = located[0][1].dtype
    config = MistralConfig(
        hidden_size=params["dim"], num_hidden_layers=params["n_layers"], head_dim=params["head_dim"],
        intermediate_size=params["hidden_dim"], num_attention_heads=params["n_heads"],
        num_key_value_heads=params.get("n_kv_heads", params["n_heads"]), rms_norm_eps=params["norm_eps"],
        vocab_size=params["vocab_size"], max_position_embeddings=params.get("max_position_embeddings", params.get("max_seq_len", DEFAULT_MAX_SEQ_LEN)),
        rope_parameters={"rope_type": "default", "rope_theta": params.get("rope_theta", 10000.0)},
        sliding_window=params.get("sliding_window"), tie_word_embeddings=False, hidden_act="silu",
        bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad, dtype=dtype,
        architectures=["MistralForCausalLM"],
    )
    if params.get("vision_encoder"):  # Magistral Small 2509: Pixtral + projector in front (native_vision.py)
        try:
            config = mistral3_config(params["vision_encoder"], config, str(native_dir / "params.json"))
        except (KeyError, ValueError) as e:
            raise NativeLayoutError(f"{native_dir / 'params.json'}: vision_encoder: {e}") from None
    names = {nat: hf for hf, nat in native_names(config).items()}
    unknown = [s.name for _, s in located if s.name not in names]
    if unknown:
        raise NativeLayoutError(f"{native_dir}: tensors with no Hugging Face name: {unknown[:5]}")
    heads = rotary_heads(config)
    reader = TensorReader({s.name: path for path, s in located})
    specs = [TensorSpec(names[s.name], s.dtype, s.shape) for _, s in located]
    source = {names[s.name]: s.name for _, s in located}

    def produce(spec: TensorSpec) -> torch.Tensor:
        name = source[spec.name]
        w = reader.get(name)
        n = heads.get(name)
        return to_hf(w, n).contiguous() if n else w

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        write_sharded(out_dir, specs, produce, max_shard_bytes)
    finally:
        reader.close()
    config.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad).save_pretrained(out_dir)
    shutil.copyfile(tok_file, out_dir / tok_file.name)
    return out_dir


def hf_layout_for(native_dir: Path, cache_root: Path) -> Path:
    """A Hugging Face copy of a native folder, converted once into <cache_root>/<fingerprint>/ and reused.

    The fingerprint hashes params.json and the tokenizer's bytes and every consolidated file's name, size
    and mtime, so a changed checkpoint converts again. Like tiny.py, the copy is built in a temporary folder
    and renamed into place (the first of two racing writers wins). Costs the model's size in disk once.
    """
    native_dir = Path(native_dir)
    h = hashlib.sha256((native_dir / "params.json").read_bytes())
    h.update(file_digest(find_tokenizer_file(native_dir)).encode())
    for f in sorted(native_dir.glob("consolidated*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    target = Path(cache_root) / h.hexdigest()[:16]
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        native_to_hf(native_dir, tmp)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
