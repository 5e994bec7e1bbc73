"""Writing a fine-tuned model out: merged Hugging Face weights, Mistral's native layout, GGUF.

    shards.py    safetensors written one tensor at a time (header planned first), and read the same way
    names.py     checkpoint tensor names → loaded parameter names (transformers' own renamings)
    merge.py     `magistune merge`: W + s·B@A per tensor, bf16 shards, without loading the model
    native.py    HF ↔ params.json + consolidated.safetensors (q/k rotary permutation undone / redone)
    to_gguf.py   `magistune export --format gguf`: llama.cpp's names, hparams and Tekken vocabulary
"""
