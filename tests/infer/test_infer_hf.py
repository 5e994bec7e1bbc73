"""Inference with a Hugging Face tokenizer (tiny-random-hf): prompts rendered with the chat template and its
generation prompt equal mistral-common's inference encoding; streamed text equals the whole decode."""

from __future__ import annotations

import dataclasses
import random

import pytest

from magistune.data.errors import RecordError
from magistune.hf_tokenizer import tiny_hf_tokenizer_path
from magistune.infer.prompts import build_request, encode_prompt, encode_with_images, load_chat_tokenizer, takes_images
from magistune.infer.text import TextStream, decode_text
from magistune.tokenizer import SpecialIds, tiny_tokenizer_path


@pytest.fixture(scope="module")
def hf_tok():
    return load_chat_tokenizer(tiny_hf_tokenizer_path())


@pytest.fixture(scope="module")
def mc_tok():
    return load_chat_tokenizer(tiny_tokenizer_path())


CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4", "reasoning_content": "two and two"}, {"role": "user", "content": "3+3?"}],
    [{"role": "user", "content": "look up naïve"},
     {"role": "assistant", "tool_calls": [{"id": "abcdefghi", "type": "function",
                                           "function": {"name": "lookup", "arguments": "{\"q\": \"naïve\"}"}}]},
     {"role": "tool", "tool_call_id": "abcdefghi", "content": "a word"}],
]
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "look a word up",
                                            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_prompt_ids_equal_mistral_commons(hf_tok, mc_tok, messages):
    tools = TOOLS if any(m.get("tool_calls") for m in messages) else None
    request = build_request(messages, tools)
    assert encode_prompt(hf_tok, request) == encode_prompt(mc_tok, request)
    assert encode_with_images(hf_tok, request) == (encode_prompt(mc_tok, request), [])
    no_images = dataclasses.replace(SpecialIds.of(mc_tok), img=None, img_break=None, img_end=None)
    assert not takes_images(hf_tok) and SpecialIds.of(hf_tok) == no_images  # images: mistral-common's path only


def test_a_template_error_is_a_record_error(hf_tok):
    request = build_request([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}])
    try:
        ids = encode_prompt(hf_tok, request)
    except RecordError as e:
        assert e.reason == "rejected_by_chat_template"
    else:
        assert ids[0] == SpecialIds.of(hf_tok).bos  # our template renders it; other templates may refuse it


def test_stream_equals_decode(hf_tok, mc_tok):
    rng = random.Random(0)
    for _ in range(10):
        ids = [rng.randrange(1000, 131072) if rng.random() > 0.1 else rng.randrange(3, 36) for _ in range(30)]
        stream = TextStream(hf_tok)
        assert "".join([stream.push(t) for t in ids] + [stream.flush()]) == decode_text(hf_tok, ids)
    text = "naïve 🙂 日本語 [TOOL_CALLS]"
    ids = mc_tok.instruct_tokenizer.tokenizer.encode("naïve 🙂 日本語 ", bos=False, eos=False) + [9]
    assert decode_text(hf_tok, ids) == decode_text(mc_tok, ids) == text
