"""GRPO's prompt records (TRL's conversational prompt-only format) → prompt ids + the record's other columns.

    {"prompt": [{"role": "user", "content": "What is 5 + 9?"}], "answer": "14", "tools": [...]}

`prompt` is a list of OpenAI messages ending with the user (or a tool result). Every other key is a column
handed to the reward functions as a keyword list (`answer=[...]`), TRL's way; `tools` is also encoded.

The ids are mistral-common's own *test-mode* (inference) encoding, as chat and generate build them:
`encode_chat_completion(ChatCompletionRequest.from_openai(messages))` with the tokenizer loaded in
ValidationMode.test, so a prompt ends with `[/INST]` and the model writes the assistant turn (for a v13
tokenizer, `[THINK]` … `[/THINK]` first when the system prompt asks for it). The config's system prompt
(system_prompt / system_prompt_file, or the dataset's) goes first when the prompt has no system message.

Length: a prompt must leave room for a whole completion: prompt tokens + trl.max_completion_length ≤
sequence_len; longer prompts are dropped and counted (never cut). Bad records stop the run with their
`file:line` (on_bad_record: error) or are skipped and counted (skip).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from magistune.config import Config
from magistune.data.errors import DataError, RecordError, short_error
from magistune.data.images import IMAGE_PARTS
from magistune.data.records import MESSAGE_KEYS, ROLES
from magistune.data.report import Rejected
from magistune.data.sources import BadLine, SourceError, iter_records, open_source, system_prompt_for
from magistune.tokenizer import load_tokenizer

_NOT_COLUMNS = ("prompt",)
_TRAINING_KEYS = ("weight", "train")  # SFT's per-message switches: a prompt is never trained


@dataclass
class PromptRecord:
    ids: list[int]  # <s> … [/INST]
    prompt: list[dict]  # the record's messages, as given (what reward functions receive as `prompts`)
    columns: dict[str, Any]  # every other field of the record (answer, tools, …)
    source: str  # file:line


@dataclass
class PromptData:
    prompts: list[PromptRecord]
    records: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    dropped: list[Rejected] = field(default_factory=list)  # valid, but too long for sequence_len


def load_prompt_tokenizer(path) -> MistralTokenizer:
    """The tokenizer in test (inference) mode: a prompt ends with the user's turn."""
    return load_tokenizer(path, mode=ValidationMode.test)


def check_prompt(record: Any, field_tools: str = "tools") -> tuple[list[dict], list | None]:
    """The record's prompt messages and tools, checked. Raises RecordError (reason, message)."""
    if not isinstance(record, dict):
        raise RecordError("wrong_type", f"a record must be a JSON object, got {type(record).__name__}")
    messages = record.get("prompt")
    if messages is None:
        raise RecordError("missing_field", "no 'prompt' field (GRPO records are {\"prompt\": [messages], ...columns})")
    if not isinstance(messages, list) or not messages:
        raise RecordError("wrong_type", "'prompt' must be a non-empty list of messages (TRL's conversational format)")
    tools = record.get(field_tools)
    if tools is not None and not isinstance(tools, list):
        raise RecordError("wrong_type", f"'{field_tools}' must be a list of tools")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RecordError("wrong_type", f"prompt[{i}] must be an object")
        if msg.get("role") not in ROLES:
            raise RecordError("unknown_role", f"prompt[{i}].role {msg.get('role')!r} is not one of {', '.join(ROLES)}")
        unknown = sorted(k for k, v in msg.items() if v is not None and (k not in MESSAGE_KEYS or k in _TRAINING_KEYS))
        if unknown:
            raise RecordError("unknown_key", f"prompt[{i}] has key(s) {', '.join(unknown)} that a prompt cannot use")
        content = msg.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in IMAGE_PARTS for p in content):
            raise RecordError("image_unsupported", f"prompt[{i}]: images in GRPO prompts are not implemented yet")
    if messages[-1]["role"] not in ("user", "tool"):
        raise RecordError("last_not_user", f"the last prompt message is from '{messages[-1]['role']}'; a prompt "
                          "ends with the user (or a tool result)")
    return messages, tools


def encode_prompt(tokenizer: MistralTokenizer, messages: list[dict], tools: list | None,
                  system_prompt: str | None) -> list[int]:
    """mistral-common's test-mode ids of the prompt (system prompt first when it has none)."""
    clean = [{k: v for k, v in m.items() if v is not None} for m in messages]
    if system_prompt is not None and not any(m["role"] == "system" for m in clean):
        clean.insert(0, {"role": "system", "content": system_prompt})
    try:
        request = ChatCompletionRequest.from_openai(clean, tools=tools)
    except Exception as e:  # pydantic ValidationError, ValueError … from mistral-common
        raise RecordError("invalid_format", f"mistral-common rejected the prompt: {short_error(e)}") from None
    try:
        return list(tokenizer.encode_chat_completion(request).tokens)
    except Exception as e:  # validation errors and assertions from mistral-common's encoders
        raise RecordError("rejected_by_mistral_common", f"mistral-common could not encode the prompt: "
                                                        f"{short_error(e)}") from None


def load_prompts(cfg: Config, tokenizer: MistralTokenizer) -> PromptData:
    """Every prompt record of every dataset, encoded; bad and too-long records counted with their file:line."""
    assert cfg.trl is not None
    limit = cfg.sequence_len - cfg.trl.max_completion_length
    data = PromptData([])
    for i, ds in enumerate(cfg.datasets):
        try:
            src = open_source(ds, cfg)
        except SourceError as e:
            raise DataError(f"datasets[{i}].path: {e}") from None
        system = system_prompt_for(ds, cfg)
        for where, record in iter_records(src):
            data.records += 1
            try:
                if isinstance(record, BadLine):
                    raise RecordError(record.reason, record.message)
                messages, tools = check_prompt(record, ds.field_tools)
                ids = encode_prompt(tokenizer, messages, tools, system)
            except RecordError as e:
                data.rejected.append(Rejected(where, e.reason, e.message))
                continue
            if len(ids) > limit:
                data.dropped.append(Rejected(where, "too_long", f"{len(ids)} prompt tokens + max_completion_length "
                                             f"{cfg.trl.max_completion_length} > sequence_len {cfg.sequence_len}"))
                continue
            columns = {k: v for k, v in record.items() if k not in _NOT_COLUMNS}
            data.prompts.append(PromptRecord(ids, messages, columns, where))
    return data


def check_prompt_data(cfg: Config, data: PromptData, say=lambda m: print(m, file=sys.stderr)) -> None:
    """Apply on_bad_record and say what was dropped. Raises DataError when nothing (or something bad) is left."""
    if data.rejected:
        lines = "\n".join(f"  {r.source}: {r.reason}: {r.message}" for r in data.rejected[:50])
        if cfg.on_bad_record == "error":
            raise DataError(f"{len(data.rejected)} bad prompt record(s); fix them or set on_bad_record: skip\n{lines}")
        say(f"skipped {len(data.rejected)} bad prompt record(s):\n{lines}")
    if data.dropped:
        lines = "\n".join(f"  {r.source}: {r.message}" for r in data.dropped[:20])
        say(f"note: dropped {len(data.dropped)} prompt(s) too long for sequence_len:\n{lines}")
    if not data.prompts:
        raise DataError(f"no prompt is left to train on ({data.records} records, {len(data.rejected)} bad, "
                        f"{len(data.dropped)} too long)")


def validate_prompts(cfg: Config) -> int:
    """`magistune validate-data` with rl: grpo: every prompt record checked and encoded; exit 1 if any is bad."""
    from magistune.data.build import resolve_tokenizer_file
    from magistune.tokenizer import TokenizerError

    try:
        data = load_prompts(cfg, load_prompt_tokenizer(resolve_tokenizer_file(cfg)))
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lengths = sorted(len(p.ids) for p in data.prompts)
    print(f"{data.records} prompt records: {len(data.prompts)} kept, {len(data.rejected)} bad, {len(data.dropped)} too "
          f"long" + (f"; prompt tokens {lengths[0]}–{lengths[-1]} (median {lengths[len(lengths) // 2]})" if lengths
                     else ""))
    for r in data.rejected[:50] + data.dropped[:20]:
        print(f"  {r.source}: {r.reason}: {r.message}")
    return 1 if data.rejected else 0
