"""One OpenAI-messages record → a mistral-common `ChatCompletionRequest` plus per-assistant-message weights.

We check what mistral-common would either reject with an unhelpful assertion or accept silently
(weights, tool-call ids, thinking on a tokenizer without [THINK], a last turn not from the assistant),
then let `ChatCompletionRequest.from_openai` do the conversion: the format is theirs, not re-implemented.
Every failure is a `RecordError` with a short reason code (for the report) and a message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mistral_common.protocol.instruct.messages import AssistantMessage, FinetuningAssistantMessage
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from magistune.data.errors import RecordError, short_error
from magistune.data.images import IMAGE_PARTS, ImageOptions, load_image_part
from magistune.model_files.system_prompt import system_message

ROLES = ("system", "user", "assistant", "tool")
TEXT_PARTS = ("text", "thinking")
EXTRA_KEYS = ("weight", "train")  # ours (mistral-finetune's `weight`, Axolotl-style `train`), read before conversion
MESSAGE_KEYS = {"role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content", "reasoning", *EXTRA_KEYS}
# Axolotl's default `roles`: (the record's role name, ours); names not listed are kept as written
AXOLOTL_DEFAULT_ROLES = (("human", "user"), ("user", "user"), ("gpt", "assistant"), ("assistant", "assistant"),
                         ("system", "system"), ("tool", "tool"))


def map_message(msg: dict, opts: RecordOptions) -> dict | None:
    """One record message in our key and role names (Axolotl's message_property_mappings, roles, field_thinking,
    message_field_training). A prompt message flagged untrained loses the flag: prompts are never trained here."""
    if opts.property_mappings:
        sources = {theirs for _, theirs in opts.property_mappings}
        mapped = {ours: msg[theirs] for ours, theirs in opts.property_mappings if theirs in msg}
        msg = {**{k: v for k, v in msg.items() if k not in sources}, **mapped}
    if opts.field_thinking != "reasoning_content" and opts.field_thinking in msg:
        msg["reasoning_content"] = msg.pop(opts.field_thinking)
    roles = dict(opts.roles)
    if isinstance(msg.get("role"), str):
        msg["role"] = roles.get(msg["role"], msg["role"])
    if opts.field_training and opts.field_training in msg:
        flag = msg.pop(opts.field_training)
        if flag is False and msg.get("role") != "assistant":
            return msg
        msg["train"] = flag
    return msg


@dataclass
class Conversation:
    request: ChatCompletionRequest
    weights: list[int]  # one 0/1 per assistant message, in order
    image_bytes: dict[int, bytes] = field(default_factory=dict)  # id(PIL image in an ImageChunk) → file bytes
    image_origins: list[str] = field(default_factory=list)  # local path, URL or "base64" of each image
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (reason, message): kept, but reported


@dataclass(frozen=True)
class RecordOptions:
    field_messages: str = "messages"
    field_tools: str = "tools"
    system_prompt: str | None = None
    supports_thinking: bool = True
    train_on: str = "all_assistant"
    supports_images: bool = False  # the tokenizer has an image config
    images: ImageOptions = ImageOptions()
    # Axolotl's chat_template options (docs/from-axolotl.md): how a record's messages map onto ours
    property_mappings: tuple[tuple[str, str], ...] = ()  # (our key, the record's key), e.g. ("role", "from")
    roles: tuple[tuple[str, str], ...] = AXOLOTL_DEFAULT_ROLES  # (the record's role, ours)
    field_training: str | None = None  # a message key holding true/false, read as our `train`
    field_thinking: str = "reasoning_content"
    default_weight: int = 1  # an assistant message without weight/train: 1 with roles_to_train [assistant], else 0
    drop_system_message: bool = False
    reasoning_effort: str | None = None  # chat_template_kwargs' reasoning_effort: mistral-common's setting (v15)


def _drop_nones(d: dict) -> dict:
    # Parquet and hub rows fill absent struct keys with None: treat None as absent.
    return {k: v for k, v in d.items() if v is not None}


def _check_parts(i: int, role: str, content: Any, opts: RecordOptions) -> None:
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise RecordError("wrong_type", f"messages[{i}].content must be a string or a list of parts, got {type(content).__name__}")
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise RecordError("wrong_type", f"{where} must be an object with a string 'type'")
        kind = part["type"]
        if kind in IMAGE_PARTS:
            if role not in ("user", "tool"):
                raise RecordError("image_in_wrong_role", f"{where}: images are only allowed in user and tool messages, not {role}")
            if not opts.supports_images:
                raise RecordError("image_unsupported", f"{where}: image part, but the tokenizer has no image config")
            continue
        if kind not in TEXT_PARTS:
            raise RecordError("unknown_part_type", f"{where}: unknown part type '{kind}' (expected one of {', '.join(TEXT_PARTS)})")
        field = "text" if kind == "text" else "thinking"
        if not isinstance(part.get(field), str):
            raise RecordError("wrong_type", f"{where}: a '{kind}' part needs a string '{field}'")
        if kind == "thinking":
            if not opts.supports_thinking:
                raise RecordError("thinking_unsupported", f"{where}: thinking part, but the tokenizer has no [THINK] token (needs v13)")
            if "closed" in part and not isinstance(part["closed"], bool):
                raise RecordError("wrong_type", f"{where}: 'closed' must be true or false")


def _check_tool_calls(i: int, calls: Any) -> None:
    if not isinstance(calls, list):
        raise RecordError("wrong_type", f"messages[{i}].tool_calls must be a list")
    for j, call in enumerate(calls):
        where = f"messages[{i}].tool_calls[{j}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise RecordError("wrong_type", f"{where} must be an object with a 'function' object")
        if not isinstance(call.get("id"), str) or not call["id"] or call["id"] == "null":
            raise RecordError("tool_call_without_id", f"{where} has no 'id'")
        fn = call["function"]
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RecordError("wrong_type", f"{where}.function has no 'name'")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                json.loads(args)
            except json.JSONDecodeError as e:
                raise RecordError("bad_tool_arguments", f"{where}.function.arguments is not valid JSON: {e}") from None
        elif not isinstance(args, dict):
            raise RecordError("bad_tool_arguments", f"{where}.function.arguments must be a JSON string or an object")


def undeclared_tool_calls(messages: list[dict], tools: list | None) -> list[tuple[str, str]]:
    """A warning for each tool call to a function that `tools` does not declare: valid for mistral-common,
    but the model then learns to call a function it was never shown."""
    declared = {t["function"].get("name") for t in tools or []
                if isinstance(t, dict) and isinstance(t.get("function"), dict)}
    known = f"declared: {', '.join(sorted(map(str, declared)))}" if declared else "the record declares no tools"
    warnings = []
    for i, msg in enumerate(messages):
        calls = msg.get("tool_calls") if msg.get("role") == "assistant" else None  # checked by _check_tool_calls
        for j, call in enumerate(calls or []):
            name = call["function"]["name"]
            if name not in declared:
                warnings.append(("undeclared_tool", f"messages[{i}].tool_calls[{j}] calls '{name}', which 'tools' "
                                                    f"does not declare ({known})"))
    return warnings


def _message_weight(i: int, msg: dict) -> int | None:
    weight, train = msg.get("weight"), msg.get("train")
    if weight is not None:
        if isinstance(weight, bool) or weight not in (0, 1):
            raise RecordError("bad_weight", f"messages[{i}].weight must be 0 or 1, got {weight!r}")
        weight = int(weight)
    if train is not None:
        if not isinstance(train, bool):
            raise RecordError("bad_weight", f"messages[{i}].train must be true or false, got {train!r}")
        if weight is not None and weight != int(train):
            raise RecordError("bad_weight", f"messages[{i}]: weight {weight} contradicts train {train}")
        weight = int(train)
    if weight is not None and msg.get("role") != "assistant":
        raise RecordError("bad_weight", f"messages[{i}]: weight/train is only meaningful on assistant messages")
    return weight


def parse_record(record: Any, opts: RecordOptions) -> Conversation:
    """Validate one record and convert it with mistral-common. Raises RecordError."""
    if not isinstance(record, dict):
        raise RecordError("wrong_type", f"a record must be a JSON object, got {type(record).__name__}")
    messages = record.get(opts.field_messages)
    if messages is None:
        raise RecordError("no_messages", f"no '{opts.field_messages}' field")
    if not isinstance(messages, list):
        raise RecordError("wrong_type", f"'{opts.field_messages}' must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise RecordError("no_messages", f"'{opts.field_messages}' is an empty list")
    tools = record.get(opts.field_tools)
    if tools is not None and not isinstance(tools, list):
        raise RecordError("wrong_type", f"'{opts.field_tools}' must be a list of tools")

    clean: list[dict] = []
    weights: list[int] = []
    with_images: list[list | None] = []  # per message: its content as mistral-common chunks, when it has images
    image_bytes: dict[int, bytes] = {}
    image_origins: list[str] = []
    mapped: list[dict] = []  # the messages in our names (Axolotl's mappings applied)
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RecordError("wrong_type", f"messages[{i}] must be an object")
        msg = map_message(_drop_nones(msg), opts)
        mapped.append(msg)
        if opts.drop_system_message and i == 0 and msg.get("role") == "system":
            continue
        if isinstance(msg.get("content"), list):  # parts of a parquet / datasets row are None-filled structs too
            msg["content"] = [_drop_nones(p) if isinstance(p, dict) else p for p in msg["content"]]
        role = msg.get("role")
        if role not in ROLES:
            raise RecordError("unknown_role", f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)} "
                              "(the dataset's `roles` option maps other names)")
        unknown = sorted(set(msg) - MESSAGE_KEYS)
        if unknown:  # mistral-common's conversion would drop them silently (a typo like reasoning_contnt)
            raise RecordError("unknown_key", f"messages[{i}] has unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(MESSAGE_KEYS))})")
        _check_parts(i, role, msg.get("content"), opts)
        weight = _message_weight(i, msg)
        if role == "assistant":
            if "tool_calls" in msg:
                _check_tool_calls(i, msg["tool_calls"])
            reasoning = msg.get("reasoning_content", msg.get("reasoning"))
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise RecordError("wrong_type", f"messages[{i}].reasoning_content must be a string")
                if not opts.supports_thinking:
                    raise RecordError("thinking_unsupported", f"messages[{i}] has reasoning_content, but the tokenizer has no [THINK] token (needs v13)")
            if not msg.get("content") and not msg.get("tool_calls") and not reasoning:
                raise RecordError("empty_assistant", f"messages[{i}]: an assistant message needs content, reasoning or tool_calls")
            weights.append(opts.default_weight if weight is None else weight)
        elif role == "tool" and not (isinstance(msg.get("tool_call_id"), str) and msg["tool_call_id"]):
            raise RecordError("tool_message_without_id", f"messages[{i}]: a tool message needs a 'tool_call_id'")
        elif role in ("system", "user", "tool") and not isinstance(msg.get("content", ""), (str, list)):
            raise RecordError("wrong_type", f"messages[{i}].content must be a string or a list of parts")
        msg = {k: v for k, v in msg.items() if k not in EXTRA_KEYS}
        chunks = image_chunks(i, msg.get("content"), opts, image_bytes, image_origins)
        if chunks is not None:  # converted below; mistral-common sees the text parts only
            msg["content"] = [p for p in msg["content"] if p["type"] not in IMAGE_PARTS] or ""
        clean.append(msg)
        with_images.append(chunks)

    if not clean:
        raise RecordError("no_messages", "no message is left after drop_system_message")
    if clean[-1]["role"] != "assistant":
        raise RecordError("last_not_assistant", f"the last message is from '{clean[-1]['role']}'; a training conversation ends with the assistant")
    if opts.system_prompt is not None and not any(m["role"] == "system" for m in clean):
        clean.insert(0, system_message(opts.system_prompt, opts.supports_thinking))
        with_images.insert(0, None)
    if opts.train_on == "last_assistant":
        weights = [0] * (len(weights) - 1) + [weights[-1]]

    try:
        effort = {} if opts.reasoning_effort is None else {"reasoning_effort": opts.reasoning_effort}
        request = ChatCompletionRequest.from_openai(clean, tools=tools, **effort)
    except Exception as e:  # pydantic ValidationError, ValueError, … from mistral-common
        raise RecordError("invalid_format", f"mistral-common rejected the record: {short_error(e)}") from None

    # Carry the weights on the messages so that mistral-common's normaliser never merges a trained assistant
    # message with an untrained neighbour (it merges consecutive messages of equal role *and* weight).
    k = 0
    for j, m in enumerate(request.messages):
        if isinstance(m, AssistantMessage):
            request.messages[j] = FinetuningAssistantMessage(**{f: getattr(m, f) for f in type(m).model_fields}, weight=weights[k])
            k += 1
    for j, chunks in enumerate(with_images):
        if chunks is not None:
            m = request.messages[j]
            request.messages[j] = type(m)(**{f: getattr(m, f) for f in type(m).model_fields if f != "content"}, content=chunks)
    return Conversation(request=request, weights=weights, image_bytes=image_bytes, image_origins=image_origins,
                        warnings=undeclared_tool_calls(mapped, tools))


def image_chunks(i: int, content: Any, opts: RecordOptions, image_bytes: dict[int, bytes],
                  image_origins: list[str]) -> list | None:
    """A message's parts as mistral-common chunks, with every image loaded; None when it has no image."""
    if not isinstance(content, list) or not any(p["type"] in IMAGE_PARTS for p in content):
        return None
    chunks = []
    for j, part in enumerate(content):
        if part["type"] in IMAGE_PARTS:
            data, image, origin = load_image_part(part, opts.images, f"messages[{i}].content[{j}]")
            image_bytes[id(image)] = data
            image_origins.append(origin)
            chunks.append(ImageChunk(image=image))
        else:
            chunks.append(TextChunk(text=part["text"]))
    return chunks
