"""Using a fine-tuned model: chat, batched generation, evaluation.

    loading.py   which weights (adapter in output_dir, full model, --model/--adapter), checked, then loaded
    prompts.py   OpenAI messages → mistral-common request → prompt ids (inference validation mode)
    sampling.py  the generation loop: left-padded batches, KV cache, temperature/top-p, stop on </s>
    thinking.py  generated ids → thinking and answer, on the tokenizer's special ids
    text.py      ids → text, whole or streamed token by token
    chat.py      `magistune chat`;  generate.py  `magistune generate`;  evaluate.py  `magistune evaluate`
"""

from magistune.infer.thinking import split_thinking

__all__ = ["split_thinking"]
