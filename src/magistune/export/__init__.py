"""Writing a fine-tuned model out: merged Hugging Face weights, Mistral's native layout, GGUF.

    names.py     checkpoint tensor names → loaded parameter names (transformers' own renamings)
    merge.py     `magistune merge`: W + s·B@A per tensor, bf16 shards, without loading the model
    native.py    HF → params.json + consolidated.safetensors (q/k rotary permutation undone), Mistral3 included
    to_gguf.py   `magistune export --format gguf`: llama.cpp's names, hparams, Tekken vocabulary, chat template
    gguf_mmproj.py      Mistral3's vision tower + projector → llama.cpp's mmproj file
    chat_template.py    tokenizer.chat_template: mistral-common's v13 layout in Jinja

The folders are read and written tensor by tensor with model_files/shards.py; the native → HF direction
(used by `base_model: <native folder>`) is model_files/native.py.
"""
