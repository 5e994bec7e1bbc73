"""Model folders on disk, below `data` and `model`: where a `base_model` is, and the files in it.

    resolve.py   base_model -> a local Hugging Face folder (tiny, local, native converted once, HF cache)
    tiny.py      `tiny-random` / `tiny-random-vision`, written once as ordinary Hugging Face folders
    native.py    Mistral's native layout -> Hugging Face's, and the name and rotary-row tables of both
    native_vision.py   the same for Mistral3's Pixtral tower and projector (params.json's vision_encoder)
    system_prompt.py   the default system prompt: SYSTEM_PROMPT.txt of the model folder, and what overrides it
    shards.py    safetensors read and written one tensor at a time

Only the base (config, tokenizer) is imported here; `model` loads what these folders hold, `export` writes them.
"""

from magistune.model_files.resolve import ModelError, check_layout, resolve_model_dir
from magistune.model_files.tiny import TINY_NAMES, materialize_tiny, tiny_config, tiny_text_config, tiny_vision_config

__all__ = ["ModelError", "TINY_NAMES", "check_layout", "materialize_tiny", "resolve_model_dir", "tiny_config",
           "tiny_text_config", "tiny_vision_config"]
