"""A conversation to continue (OpenAI messages, last turn from the user) → prompt ids, exactly as mistral-common
encodes it for inference.

Training uses mistral-common in *fine-tuning* validation mode, where a conversation must end with the
assistant (magistune.tokenizer.load_tokenizer). A prompt ends with the user (or a tool result), which only
*test* mode accepts: `load_chat_tokenizer` loads the same file in that mode, and
`MistralTokenizer.encode_chat_completion` does the rest: [SYSTEM_PROMPT], [INST] … [/INST], earlier
assistant turns and their thinking, tool calls and results, all by mistral-common's rules.

Images (Magistral Small 2509): the same parts as training data (data/images.py: a path, a data: URI, an
http(s) URL only with allow_image_urls), read and checked by the same code, become mistral-common ImageChunks;
`encode_with_images` returns the ids with [IMG]…[IMG_END] and the pixels mistral-common's image encoder made,
which are the ones training computes from the same bytes (data.images.pixel_values).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import numpy as np
import torch

from magistune.data.errors import RecordError, short_error
from magistune.data.images import IMAGE_PARTS, ImageOptions
from magistune.data.records import MESSAGE_KEYS, ROLES, RecordOptions, image_chunks
from magistune.model_files.system_prompt import system_message
from magistune.hf_tokenizer import HFChatTokenizer, load_any_tokenizer

_TRAINING_ONLY_KEYS = ("weight", "train")  # mean nothing at inference; dropped


def load_chat_tokenizer(path: str | Path) -> MistralTokenizer:
    """The tokenizer in test (inference) mode: prompts end with the user's turn."""
    return load_any_tokenizer(path, mode=ValidationMode.test)  # or an HF tokenizer.json (hf_tokenizer.py)


def build_request(messages: Any, tools: Any = None, system_prompt: str | None = None, supports_thinking: bool = True,
                  images: ImageOptions | None = None) -> ChatCompletionRequest:
    """Check the messages and convert them with mistral-common. Raises RecordError (reason, message).

    `system_prompt` is inserted first when the conversation has no system message, as training does.
    `images`: how image parts are read (None: the model takes no images, and an image part is an error).
    """
    if not isinstance(messages, list) or not messages:
        raise RecordError("no_messages", "'messages' must be a non-empty list of messages")
    if tools is not None and not isinstance(tools, list):
        raise RecordError("wrong_type", "'tools' must be a list of tools")
    clean, with_images = [], []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RecordError("wrong_type", f"messages[{i}] must be an object")
        msg = {k: v for k, v in msg.items() if v is not None and k not in _TRAINING_ONLY_KEYS}
        if msg.get("role") not in ROLES:
            raise RecordError("unknown_role", f"messages[{i}].role {msg.get('role')!r} is not one of {', '.join(ROLES)}")
        unknown = sorted(set(msg) - MESSAGE_KEYS)
        if unknown:
            raise RecordError("unknown_key", f"messages[{i}] has unknown key(s) {', '.join(unknown)}")
        chunks = _images_of(i, msg, images)
        if chunks is not None:  # mistral-common converts the text parts; the images go back in below
            msg["content"] = [p for p in msg["content"] if p.get("type") not in IMAGE_PARTS] or ""
        clean.append(msg)
        with_images.append(chunks)
    if clean[-1]["role"] not in ("user", "tool"):
        raise RecordError("last_not_user", f"the last message is from '{clean[-1]['role']}'; "
                          "a prompt ends with the user (or a tool result)")
    if system_prompt is not None and not any(m["role"] == "system" for m in clean):
        clean.insert(0, system_message(system_prompt, supports_thinking))
        with_images.insert(0, None)
    try:
        request = ChatCompletionRequest.from_openai(clean, tools=tools)
    except Exception as e:  # pydantic ValidationError, ValueError … from mistral-common
        raise RecordError("invalid_format", f"mistral-common rejected the messages: {short_error(e)}") from None
    for j, chunks in enumerate(with_images):
        if chunks is not None:
            m = request.messages[j]
            request.messages[j] = type(m)(**{f: getattr(m, f) for f in type(m).model_fields if f != "content"},
                                          content=chunks)
    return request


def _images_of(i: int, msg: dict, images: ImageOptions | None) -> list | None:
    """A message's parts as mistral-common chunks with its images loaded (as training reads them), or None."""
    content = msg.get("content")
    if not isinstance(content, list) or not any(isinstance(p, dict) and p.get("type") in IMAGE_PARTS for p in content):
        return None
    if images is None:
        raise RecordError("image_unsupported", f"messages[{i}]: an image part, but this model takes no images "
                          "(its tokenizer has no image config; Magistral Small 2509 does)")
    if msg["role"] not in ("user", "tool"):
        raise RecordError("image_in_wrong_role", f"messages[{i}]: images are only allowed in user and tool messages")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or (part.get("type") not in IMAGE_PARTS and not isinstance(part.get("text"), str)):
            raise RecordError("wrong_type", f"messages[{i}].content[{j}]: expected a text or image part")
    return image_chunks(i, content, RecordOptions(images=images), {}, [])


def takes_images(tokenizer: MistralTokenizer) -> bool:
    """The tokenizer has an image encoder (Magistral Small 2509's has; the text-only models' and a Hugging Face
    tokenizer's have not)."""
    return getattr(getattr(tokenizer, "instruct_tokenizer", None), "image_encoder", None) is not None


def encode_prompt(tokenizer: MistralTokenizer, request: ChatCompletionRequest) -> list[int]:
    """The prompt ids: `<s>` … `[/INST]`, ready for the model to write the assistant turn. A Hugging Face
    tokenizer renders its chat template with the generation prompt (hf_tokenizer.HFChatTokenizer.encode_prompt)."""
    if isinstance(tokenizer, HFChatTokenizer):
        return _hf_prompt(tokenizer, request)
    try:
        return list(tokenizer.encode_chat_completion(request).tokens)
    except Exception as e:  # validation errors and assertions from mistral-common's encoders
        raise RecordError("rejected_by_mistral_common", f"mistral-common could not encode the prompt: {short_error(e)}") from None


def encode_with_images(tokenizer: MistralTokenizer, request: ChatCompletionRequest) -> tuple[list[int], list[np.ndarray]]:
    """The prompt ids and the (C, H, W) float32 pixels of its images, in the order of their tokens."""
    if isinstance(tokenizer, HFChatTokenizer):  # no images: build_request refused them (takes_images is False)
        return _hf_prompt(tokenizer, request), []
    try:
        tokenized = tokenizer.encode_chat_completion(request)
    except Exception as e:
        raise RecordError("rejected_by_mistral_common", f"mistral-common could not encode the prompt: {short_error(e)}") from None
    return list(tokenized.tokens), list(tokenized.images)


def _hf_prompt(tokenizer: HFChatTokenizer, request: ChatCompletionRequest) -> list[int]:
    try:
        return tokenizer.encode_prompt(request)
    except Exception as e:  # the template's raise_exception, jinja errors
        raise RecordError("rejected_by_chat_template", f"the chat template could not render the prompt: "
                                                       f"{short_error(e)}") from None


def image_inputs(images: list[np.ndarray], device: torch.device) -> dict:
    """The forward's image keywords, as training's batches build them (train/batches.py collate_images): every
    image top-left in a zero-padded (N, 3, H_max, W_max) float32 tensor, image_sizes (N, 2) its real (H, W).
    Empty when there are no images."""
    if not images:
        return {}
    h, w = max(a.shape[1] for a in images), max(a.shape[2] for a in images)
    pixels = torch.zeros((len(images), 3, h, w), dtype=torch.float32)
    for i, a in enumerate(images):
        pixels[i, :, :a.shape[1], :a.shape[2]] = torch.from_numpy(np.asarray(a, dtype=np.float32))
    sizes = torch.tensor([[a.shape[1], a.shape[2]] for a in images], dtype=torch.long)
    return {"pixel_values": pixels.to(device), "image_sizes": sizes.to(device)}
