"""The GGUF's chat template gives mistral-common's ids. llama-cpp-python does not install here (no wheel), so
its chat formatting is reproduced: the template from the GGUF file rendered by jinja2's
ImmutableSandboxedEnvironment(trim_blocks, lstrip_blocks) with bos_token / eos_token, as its
Jinja2ChatFormatter does, then tokenised with special tokens parsed (the GGUF's CONTROL tokens) and the text
between them encoded by the Tekken vocabulary."""

from __future__ import annotations

import re

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from magistune.cli import main
from magistune.export.chat_template import CHAT_TEMPLATE
from magistune.infer.prompts import load_chat_tokenizer

gguf = pytest.importorskip("gguf")
jinja2 = pytest.importorskip("jinja2")
from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: E402

TOOLS = [{"type": "function", "function": {  # parameters' keys sorted: jinja2's tojson sorts them
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"}}}]
CASES = {
    "user": [{"role": "user", "content": "Hi"}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "multi_turn": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again, in French?"}],
    "thinking": [{"role": "user", "content": "2+2?"},
                 {"role": "assistant", "content": [{"type": "thinking", "thinking": "Add them."},
                                                   {"type": "text", "text": "4"}]},
                 {"role": "user", "content": "And 3+3?"}],
    "reasoning_content": [{"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4", "reasoning_content": "Easy: 4."},
                          {"role": "user", "content": "Sure?"}],
    "magistral_system_prompt": [
        {"role": "system", "content": [{"type": "text", "text": "Think first.\n"},
                                       {"type": "thinking", "thinking": "Your draft.", "closed": True},
                                       {"type": "text", "text": "Then answer."}]},
        {"role": "user", "content": "Hi"}],
    "tools": [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": "abcdef123", "type": "function",
                   "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
              {"role": "tool", "tool_call_id": "abcdef123", "content": "sunny, 24 C"},
              {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Thanks, and Rome?"}],
}


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tmpl") / "t.gguf"
    assert main(["export", "--model", str(tiny_dir), "--format", "gguf", "--output", str(out)]) == 0
    return gguf.GGUFReader(out)


def render(template: str, messages, tools=None) -> str:
    env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    return env.from_string(template).render(messages=messages, tools=tools, bos_token="<s>", eos_token="</s>",
                                            add_generation_prompt=True, raise_exception=raise_exception)


def tokenize_with_specials(text: str, reader, tok) -> list[int]:
    """llama.cpp's tokenize(special=True): control-token strings become their ids, the rest is text."""
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    control = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == int(gguf.TokenType.CONTROL)}
    pattern = "(" + "|".join(re.escape(t) for t in sorted(control, key=len, reverse=True)) + ")"
    raw = tok.instruct_tokenizer.tokenizer
    ids = []
    for piece in re.split(pattern, text):
        if piece in control:
            ids.append(control[piece])
        elif piece:
            ids.extend(raw.encode(piece, bos=False, eos=False))
    return ids


def test_gguf_carries_the_template_and_general_keys(exported):
    assert exported.fields["tokenizer.chat_template"].contents() == CHAT_TEMPLATE
    assert exported.fields["general.type"].contents() == "model"
    assert exported.fields["general.size_label"].contents() == "17M"
    assert exported.fields["general.quantization_version"].contents() == gguf.GGML_QUANT_VERSION


@pytest.mark.parametrize("case", list(CASES))
def test_template_ids_equal_mistral_common(case, exported, tiny_dir):
    tok = load_chat_tokenizer(tiny_dir / "tekken.json")
    messages = CASES[case]
    tools = TOOLS if case == "tools" else None
    expected = tok.encode_chat_completion(ChatCompletionRequest.from_openai(messages, tools=tools)).tokens
    text = render(exported.fields["tokenizer.chat_template"].contents(), messages, tools)
    assert tokenize_with_specials(text, exported, tok) == expected


def test_what_the_template_cannot_express(exported, tiny_dir):
    """Documented limits: mistral-common merges consecutive user messages with a blank line."""
    tok = load_chat_tokenizer(tiny_dir / "tekken.json")
    messages = [{"role": "user", "content": "A"}, {"role": "user", "content": "B"}]
    expected = tok.encode_chat_completion(ChatCompletionRequest.from_openai(messages)).tokens
    text = render(CHAT_TEMPLATE, messages)
    assert tokenize_with_specials(text, exported, tok) != expected
