"""A conversation to continue (OpenAI messages, last turn from the user) → prompt ids, exactly as mistral-common
encodes it for inference.

Training uses mistral-common in *fine-tuning* validation mode, where a conversation must end with the
assistant (magistune.tokenizer.load_tokenizer). A prompt ends with the user (or a tool result), which only
*test* mode accepts: `load_chat_tokenizer` loads the same file in that mode, and
`MistralTokenizer.encode_chat_completion` does the rest: [SYSTEM_PROMPT], [INST] … [/INST], earlier
assistant turns and their thinking, tool calls and results, all by mistral-common's rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from magistune.data.errors import RecordError, short_error
from magistune.data.images import IMAGE_PARTS
from magistune.data.records import MESSAGE_KEYS, ROLES
from magistune.tokenizer import load_tokenizer

_TRAINING_ONLY_KEYS = ("weight", "train")  # mean nothing at inference; dropped


def load_chat_tokenizer(path: str | Path) -> MistralTokenizer:
    """The tokenizer in test (inference) mode: prompts end with the user's turn."""
    return load_tokenizer(path, mode=ValidationMode.test)


def build_request(messages: Any, tools: Any = None, system_prompt: str | None = None) -> ChatCompletionRequest:
    """Check the messages and convert them with mistral-common. Raises RecordError (reason, message).

    `system_prompt` is inserted first when the conversation has no system message, as training does.
    """
    if not isinstance(messages, list) or not messages:
        raise RecordError("no_messages", "'messages' must be a non-empty list of messages")
    if tools is not None and not isinstance(tools, list):
        raise RecordError("wrong_type", "'tools' must be a list of tools")
    clean = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RecordError("wrong_type", f"messages[{i}] must be an object")
        msg = {k: v for k, v in msg.items() if v is not None and k not in _TRAINING_ONLY_KEYS}
        if msg.get("role") not in ROLES:
            raise RecordError("unknown_role", f"messages[{i}].role {msg.get('role')!r} is not one of {', '.join(ROLES)}")
        unknown = sorted(set(msg) - MESSAGE_KEYS)
        if unknown:
            raise RecordError("unknown_key", f"messages[{i}] has unknown key(s) {', '.join(unknown)}")
        content = msg.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in IMAGE_PARTS for p in content):
            raise RecordError("image_unsupported", f"messages[{i}]: images are not supported by chat/generate yet (text only)")
        clean.append(msg)
    if clean[-1]["role"] not in ("user", "tool"):
        raise RecordError("last_not_user", f"the last message is from '{clean[-1]['role']}'; "
                          "a prompt ends with the user (or a tool result)")
    if system_prompt is not None and not any(m["role"] == "system" for m in clean):
        clean.insert(0, {"role": "system", "content": system_prompt})
    try:
        return ChatCompletionRequest.from_openai(clean, tools=tools)
    except Exception as e:  # pydantic ValidationError, ValueError … from mistral-common
        raise RecordError("invalid_format", f"mistral-common rejected the messages: {short_error(e)}") from None


def encode_prompt(tokenizer: MistralTokenizer, request: ChatCompletionRequest) -> list[int]:
    """The prompt ids: `<s>` … `[/INST]`, ready for the model to write the assistant turn."""
    try:
        return list(tokenizer.encode_chat_completion(request).tokens)
    except Exception as e:  # validation errors and assertions from mistral-common's encoders
        raise RecordError("rejected_by_mistral_common", f"mistral-common could not encode the prompt: {short_error(e)}") from None
