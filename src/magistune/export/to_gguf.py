"""A merged model → one bf16 or f16 GGUF file for llama.cpp, through the `gguf` package (llama.cpp's gguf-py).

What is written, as llama.cpp's convert_hf_to_gguf.py writes a Mistral model (architecture "llama"):

  weights    token_embd, blk.N.{attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down, attn_norm,
             ffn_norm}, output_norm, output (names from gguf's own TENSOR_NAMES table). Matrices in bf16 (the
             checkpoint's bytes, unchanged) or f16; norm vectors in f32, as llama.cpp keeps every 1-D tensor.
             attn_q and attn_k rows are put back in Mistral's interleaved rotary order (native.to_native,
             llama.cpp's `permute`), because GGUF's llama graph rotates adjacent pairs.
  hparams    llama.{context_length, embedding_length, block_count, feed_forward_length, attention.head_count,
             attention.head_count_kv, attention.key_length, attention.value_length, rope.dimension_count,
             rope.freq_base, attention.layer_norm_rms_epsilon, vocab_size}, general.{name, file_type}.
  tokenizer  gguf's MistralVocab reads tekken.json with mistral-common, exactly as convert_hf_to_gguf's
             _set_vocab_mistral does: tokenizer.ggml.model "gpt2", pre "tekken", the 1,000 special tokens first
             (CONTROL), then the 130,072 byte-level tokens as GPT-2 byte-to-unicode strings (NORMAL), scores 0,
             the BPE merges recovered from Tekken's ranks, bos/eos/unk/pad ids, add_bos true, add_eos false.
             Named tokens (a config's added_tokens_overrides / tokens) are typed USER_DEFINED, not CONTROL.
             (A SentencePiece tokenizer is written as tokenizer.ggml.model "llama", also by MistralVocab.)

Also written:
  * tokenizer.chat_template (chat_template.py): mistral-common's v13 layout as Jinja, for a v13 tokenizer;
  * general.{type, name, basename, size_label, quantization_version}, as llama.cpp's converter writes them;
  * Mistral3 (Magistral Small 2509): the decoder is this llama GGUF, the vision tower and projector go to
    `mmproj-<file>` beside it (gguf_mmproj.py), as llama.cpp's converter splits them.

Not checked here: llama.cpp itself is not run (neither it nor llama-cpp-python installs here). Tokenizer
    equivalence is checked partly: tests/export re-run byte-level BPE over
    the written tokens and merges and get mistral-common's ids for sample words, and the pre-tokenizer regex of
    the tokenizer file is compared with the pattern llama.cpp's "tekken" pre-tokenizer implements; the chat
    template is rendered with jinja2 as llama-cpp-python renders it and tokenised with the GGUF's control tokens.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from magistune.export.names import param_names
from magistune.export.native import text_config
from magistune.model_files.native import to_native
from magistune.model_files.shards import TensorReader, checkpoint_files, read_specs

# The split pattern llama.cpp's "tekken" pre-tokenizer implements (llama-vocab.cpp quotes it as its source).
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                  r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
                  r"|\s+(?!\S)|\s+")


VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")


def gguf_configs(model_dir: Path):
    """(the model's config, its decoder's MistralConfig): the same for a text model; for Mistral3 the decoder is
    the llama GGUF and the rest the mmproj file."""
    from transformers import Mistral3Config

    from magistune.export.native import check_decoder
    from magistune.model.load import check_model_dir

    config = check_model_dir(model_dir)
    if isinstance(config, Mistral3Config):
        check_decoder(config.text_config, model_dir, "GGUF export")
        if config.tie_word_embeddings:
            raise ValueError(f"{model_dir}: tied embeddings are not supported by GGUF export")
        return config, config.text_config
    text = text_config(model_dir, "GGUF export")
    return text, text


def mmproj_path(out_path: Path) -> Path:
    """llama.cpp's naming: mmproj-<model file name> beside it."""
    return out_path.parent / f"mmproj-{out_path.name}"


def tensor_names(n_layers: int, prefix: str = "model.") -> dict[str, str]:
    """{HF parameter name: GGUF tensor name}, from gguf's own name table; `prefix`: where the decoder sits
    (model.language_model. in Mistral3)."""
    import gguf

    def name(t, bid=None) -> str:
        return gguf.TENSOR_NAMES[t].format(bid=bid) + ".weight"

    T = gguf.MODEL_TENSOR
    names = {f"{prefix}embed_tokens.weight": name(T.TOKEN_EMBD), f"{prefix}norm.weight": name(T.OUTPUT_NORM),
             "lm_head.weight": name(T.OUTPUT)}
    per_layer = {"self_attn.q_proj": T.ATTN_Q, "self_attn.k_proj": T.ATTN_K, "self_attn.v_proj": T.ATTN_V,
                 "self_attn.o_proj": T.ATTN_OUT, "mlp.gate_proj": T.FFN_GATE, "mlp.up_proj": T.FFN_UP,
                 "mlp.down_proj": T.FFN_DOWN, "input_layernorm": T.ATTN_NORM, "post_attention_layernorm": T.FFN_NORM}
    for i in range(n_layers):
        names.update({f"{prefix}layers.{i}.{hf}.weight": name(t, i) for hf, t in per_layer.items()})
    return names


def add_hparams(writer, config) -> None:
    """llama.* hyperparameters of the decoder (a MistralConfig)."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)  # 128 for Magistral, != 5120 / 32 = 160: must be explicit
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def add_general(writer, name: str, n_params: int) -> None:
    """The general.* keys llama.cpp's converter writes for a model it cannot name from a model card."""
    import gguf
    from gguf.utility import size_label

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_basename(name)
    writer.add_size_label(size_label(n_params, 0, 0, 0))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_template(writer, tokenizer_file: Path) -> list[str]:
    """tokenizer.chat_template: mistral-common's v13 layout (chat_template.py); other versions get none. A Hugging
    Face tokenizer's own template goes in as it is, less its {% generation %} markers (a training-only tag)."""
    from magistune.export.chat_template import CHAT_TEMPLATE
    from magistune.hf_tokenizer import is_hf_tokenizer_file, load_hf_tokenizer
    from magistune.tokenizer import load_tokenizer, tokenizer_version

    if is_hf_tokenizer_file(tokenizer_file):
        template = load_hf_tokenizer(tokenizer_file).hf.chat_template
        writer.add_chat_template(re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", template))
        return []
    version = tokenizer_version(load_tokenizer(tokenizer_file))
    if version != "v13":
        return [f"no tokenizer.chat_template: the template reproduces tokenizer v13 (Magistral); this one is {version} "
                "(format prompts with mistral-common, or give llama.cpp --chat-template-file)"]
    writer.add_chat_template(CHAT_TEMPLATE)
    return []


def add_hf_vocab(writer, tokenizer_file: Path, n_rows: int) -> list[str]:
    """A Hugging Face byte-level BPE tokenizer.json as convert_hf_to_gguf's _set_vocab_gpt2 writes it: the token
    texts, their types (control for special added tokens, user-defined for other added ones), the merges, and
    the pre-tokenizer, which llama.cpp knows by name: only Tekken's split pattern is recognised here."""
    import gguf

    from magistune.hf_tokenizer import load_hf_tokenizer

    hf = load_hf_tokenizer(tokenizer_file).hf
    data = json.loads(Path(tokenizer_file).read_text(encoding="utf-8"))
    model, pre = data.get("model") or {}, json.dumps(data.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise ValueError(f"{tokenizer_file}: GGUF export of a Hugging Face tokenizer supports byte-level BPE only "
                         f"(this one is {model.get('type')}); export with its mistral-common file instead")
    if json.dumps(TEKKEN_PATTERN)[1:-1] not in pre:
        raise ValueError(f"{tokenizer_file}: GGUF export of a Hugging Face tokenizer is implemented for Tekken's "
                         "pre-tokenizer pattern only (llama.cpp names pre-tokenizers; this split pattern is not one "
                         "magistune can name)")
    if len(hf) > n_rows:
        raise ValueError(f"{tokenizer_file}: {len(hf)} tokens, more than the model's {n_rows} embedding rows")
    names = {i: t for t, i in hf.get_vocab().items()}
    added = hf.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_rows):
        if i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif i in names:
            tokens.append(names[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # embedding rows past the tokenizer, as convert_hf_to_gguf pads them
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("tekken")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add, token_id in ((writer.add_bos_token_id, hf.bos_token_id), (writer.add_eos_token_id, hf.eos_token_id),
                          (writer.add_unk_token_id, hf.unk_token_id), (writer.add_pad_token_id, hf.pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(hf.bos_token_id is not None)  # as add_vocab (the Tekken path) writes it
    writer.add_add_eos_token(False)
    return []


def add_vocab(writer, tokenizer_file: Path) -> list[str]:
    """Tokenizer metadata as convert_hf_to_gguf's _set_vocab_mistral writes it. Returns notes."""
    import gguf
    from gguf.vocab import MistralTokenizerType, MistralVocab

    from magistune.tokenizer import load_tokenizer
    from magistune.tokenizer import named_token_ids

    notes = []
    with tempfile.TemporaryDirectory() as d:  # MistralVocab looks for the tokenizer file in a folder
        shutil.copyfile(tokenizer_file, Path(d) / tokenizer_file.name)
        vocab = MistralVocab(Path(d))
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    if len(tokens) != vocab.vocab_size:
        raise ValueError(f"{tokenizer_file}: {len(tokens)} tokens listed, vocabulary size {vocab.vocab_size}")
    # Named tokens (added_tokens_overrides / tokens, tokenizer.py) are text markers, not control tokens:
    # USER_DEFINED, which llama.cpp matches in prompt text and prints in output, as magistune encodes and decodes them.
    for i in named_token_ids(load_tokenizer(tokenizer_file).instruct_tokenizer.tokenizer).values():
        types[i] = gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model(vocab.gguf_tokenizer_model)
    if vocab.tokenizer_type == MistralTokenizerType.tekken:
        writer.add_tokenizer_pre("tekken")
        writer.add_token_merges(vocab.extract_vocab_merges_from_model())
        pattern = vocab.tokenizer._model._pat_str
        if pattern != TEKKEN_PATTERN:
            notes.append(f"the tokenizer's split pattern differs from llama.cpp's 'tekken' pre-tokenizer: {pattern!r}")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    return notes


def export_gguf(model_dir: Path, out_path: Path, dtype: str = "bf16", tokenizer_file: Path | None = None) -> list[str]:
    """Write `out_path`; returns notes (what is missing from the file). Tensors stream one at a time."""
    import gguf

    from magistune.tokenizer import find_tokenizer_file

    model_dir, out_path = Path(model_dir), Path(out_path)
    if dtype not in ("bf16", "f16"):
        raise ValueError(f"GGUF dtype must be bf16 or f16, got {dtype}")
    full, config = gguf_configs(model_dir)
    tokenizer_file = Path(tokenizer_file) if tokenizer_file else find_tokenizer_file(model_dir)
    located = read_specs(checkpoint_files(model_dir))
    loaded_name = param_names(full, [s.name for _, s in located])
    gguf_name = tensor_names(config.num_hidden_layers, "model.language_model." if full is not config else "model.")
    vision = [s.name for _, s in located if loaded_name[s.name].startswith(VISION_PREFIXES)]
    missing = [s.name for _, s in located if loaded_name[s.name] not in gguf_name and s.name not in vision]
    if missing:
        raise ValueError(f"{model_dir}: tensors with no GGUF name: {missing[:5]}")
    if full is not config:  # Mistral3: the tower and projector go to their own mmproj file
        from magistune.export.gguf_mmproj import export_mmproj
        from magistune.tokenizer import SpecialIds, load_tokenizer

        img_break = SpecialIds.of(load_tokenizer(tokenizer_file)).img_break
        mmproj = export_mmproj(full, located, loaded_name, mmproj_path(out_path), dtype, img_break, model_dir.name)
        print(f"note: GGUF: wrote the vision tower and projector to {mmproj}", file=sys.stderr)
        located = [(p, s) for p, s in located if s.name not in vision]

    writer = gguf.GGUFWriter(out_path, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    add_general(writer, model_dir.name, sum(int(np.prod(s.shape)) for _, s in located))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if dtype == "bf16" else gguf.LlamaFileType.MOSTLY_F16)
    add_hparams(writer, config)
    from magistune.hf_tokenizer import is_hf_tokenizer_file

    hf = is_hf_tokenizer_file(tokenizer_file)
    notes = add_hf_vocab(writer, tokenizer_file, config.vocab_size) if hf else add_vocab(writer, tokenizer_file)
    notes += add_template(writer, tokenizer_file)

    heads = {"self_attn.q_proj.weight": config.num_attention_heads, "self_attn.k_proj.weight": config.num_key_value_heads}
    bf16 = dtype == "bf16"

    def convert(key: str, w: torch.Tensor) -> np.ndarray:
        n = next((h for suffix, h in heads.items() if loaded_name[key].endswith(suffix)), None)
        if n:
            w = to_native(w, n)
        if w.dim() == 1:
            return w.float().numpy()
        if bf16:  # numpy has no bfloat16: hand gguf the raw 16-bit patterns, typed BF16
            return w.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
        return w.to(torch.float16).numpy()

    plan = []
    for _, s in located:
        shape = s.shape
        if len(shape) == 1:
            np_dtype, raw, nbytes = np.float32, None, shape[0] * 4
        else:
            np_dtype, raw = (np.int16, gguf.GGMLQuantizationType.BF16) if bf16 else (np.float16, None)
            nbytes = int(np.prod(shape)) * 2
        writer.add_tensor_info(gguf_name[loaded_name[s.name]], shape, np.dtype(np_dtype), nbytes, raw_dtype=raw)
        plan.append(s.name)
    reader = TensorReader({s.name: path for path, s in located})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for key in plan:  # the order of add_tensor_info: the writer pops them first-in, first-out
            writer.write_tensor_data(convert(key, reader.get(key)))
    finally:
        reader.close()
        writer.close()
    for note in notes:
        print(f"note: GGUF: {note}", file=sys.stderr)
    return notes
