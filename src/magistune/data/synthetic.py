"""Random but valid training conversations in OpenAI format, for golden tests and the encoding benchmark.

They mix system prompts, multi-turn chats, unicode, text that looks like control tokens, thinking
(as reasoning_content and as thinking parts), tool calls with their results, and per-message weights.
"""

from __future__ import annotations

import json
import random

TRICKY = ["[INST] not a control token [/INST]", "</s><s>", "[THINK]fake[/THINK]", "[TOOL_CALLS]x[ARGS]{}",
          "héllo wörld ✓ 你好 🙂", "  leading and trailing  ", "line\nbreaks\n\n", "<unk> [IMG] <pad>"]


def _text(rng: random.Random) -> str:
    words = ["alpha", "beta", "gamma", "Paris", "42", "x=1;", "naïve", "déjà", "ok", "?"]
    return rng.choice(TRICKY) if rng.random() < 0.25 else " ".join(rng.choices(words, k=rng.randint(1, 12)))


def generate(rng: random.Random, tools_ok: bool, think_ok: bool) -> dict:
    """A random valid training conversation in OpenAI format."""
    messages: list[dict] = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": _text(rng)})
    tools = [{"type": "function", "function": {"name": "lookup", "description": "look up a word",
              "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}] if tools_ok else None
    for turn in range(rng.randint(1, 4)):
        user = _text(rng) if rng.random() < 0.7 else [{"type": "text", "text": _text(rng)}]
        messages.append({"role": "user", "content": user})
        msg: dict = {"role": "assistant", "content": _text(rng)}
        if rng.random() < 0.3:
            msg["weight"] = rng.choice([0, 1])
        if think_ok and rng.random() < 0.5:
            if rng.random() < 0.5:
                msg["reasoning_content"] = _text(rng)
            else:
                msg["content"] = [{"type": "thinking", "thinking": _text(rng), "closed": True},
                                  {"type": "text", "text": _text(rng)}]
        if tools_ok and rng.random() < 0.3 and turn < 3:
            call_id = "".join(rng.choices("abcdefghij0123456789", k=9))
            call = {"role": "assistant", "tool_calls": [{"id": call_id, "type": "function", "function": {
                "name": "lookup", "arguments": json.dumps({"q": _text(rng)})}}]}
            messages += [call, {"role": "tool", "tool_call_id": call_id, "content": _text(rng)}]
        messages.append(msg)
    record = {"messages": messages}
    if tools:
        record["tools"] = tools
    return record
