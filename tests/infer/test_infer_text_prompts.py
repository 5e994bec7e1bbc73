"""Streaming decode equals whole decode; prompts encode as mistral-common does in inference mode."""

from __future__ import annotations

import random

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from magistune.data.errors import RecordError
from magistune.infer.prompts import build_request, encode_prompt
from magistune.infer.text import TextStream, decode_text


def streamed(tok, ids: list[int]) -> tuple[str, list[str]]:
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    return "".join(pieces), pieces


def test_stream_equals_decode_on_random_ids(chat_tok):
    rng = random.Random(0)
    for _ in range(20):
        # ordinary tokens, with control tokens ([INST], [TOOL_CALLS] …) mixed in
        ids = [rng.randrange(1000, 131072) if rng.random() > 0.1 else rng.randrange(3, 36) for _ in range(40)]
        assert streamed(chat_tok, ids)[0] == decode_text(chat_tok, ids)


def test_a_character_split_over_tokens_is_held_back(chat_tok):
    raw = chat_tok.instruct_tokenizer.tokenizer
    text = "naïve 🙂 日本語 🦜"
    ids = raw.encode(text, bos=False, eos=False)
    # "🙂" is F0 9F 99 82: Tekken encodes " \xf0\x9f", "\x99", "\x82", three tokens for one character
    assert [raw.id_to_byte_piece(t) for t in ids[3:6]] == [b" \xf0\x9f", b"\x99", b"\x82"]
    whole, pieces = streamed(chat_tok, ids)
    assert whole == text
    assert pieces[3:6] == [" ", "", "🙂"]  # the character appears whole, with its last byte
    assert not any("\ufffd" in p for p in pieces)  # never a half character on screen


def test_prompt_ids_equal_mistral_common(chat_tok, special):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "2+2?"}]
    ids = encode_prompt(chat_tok, build_request(messages, system_prompt="Be brief."))
    expected = chat_tok.encode_chat_completion(ChatCompletionRequest.from_openai(
        [{"role": "system", "content": "Be brief."}] + messages)).tokens
    assert ids == expected
    assert ids[0] == special.bos and ids[-1] == chat_tok.instruct_tokenizer.tokenizer.get_special_token("[/INST]")


def test_the_config_system_prompt_does_not_replace_the_conversations_own(chat_tok):
    messages = [{"role": "system", "content": "Own."}, {"role": "user", "content": "Hi"}]
    with_default = encode_prompt(chat_tok, build_request(messages, system_prompt="Default."))
    assert with_default == encode_prompt(chat_tok, build_request(messages))


def test_training_mode_cannot_encode_a_prompt(tokenizer_loader, tiny_dir):
    """Why prompts.py loads the tokenizer in test mode: fine-tuning mode wants a final assistant turn."""
    tok = tokenizer_loader(tiny_dir / "tekken.json")
    with pytest.raises(Exception):
        tok.encode_chat_completion(ChatCompletionRequest.from_openai([{"role": "user", "content": "Hi"}]))


@pytest.mark.parametrize("messages, reason", [
    ([], "no_messages"),
    ("hello", "no_messages"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last_not_user"),
    ([{"role": "robot", "content": "a"}], "unknown_role"),
    ([{"role": "user", "content": "a", "contnet": "typo"}], "unknown_key"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}], "image_unsupported"),
])
def test_bad_prompts_say_why(messages, reason):
    with pytest.raises(RecordError) as e:
        build_request(messages)
    assert e.value.reason == reason


def test_default_system_prompt_for_chat_and_generate(scripted_dir, tmp_path, chat_tok):
    """--model D with D/SYSTEM_PROMPT.txt: the default; --system and --no-system-prompt win; the [THINK]
    template is sent as mistral-common's thinking part, so the ids are the model card's."""
    import argparse
    import shutil

    from magistune.cli import _system_prompt
    from magistune.infer.loading import resolve_source
    from magistune.infer.prompts import build_request, encode_prompt

    folder = tmp_path / "m"
    shutil.copytree(scripted_dir, folder)
    (folder / "SYSTEM_PROMPT.txt").write_text("Think first:[THINK]draft[/THINK]then answer.", encoding="utf-8")
    source = resolve_source(None, model=str(folder))
    ask = lambda **kw: _system_prompt(argparse.Namespace(**{"system": None, "no_system_prompt": False, **kw}), source)
    assert ask() == "Think first:[THINK]draft[/THINK]then answer."
    assert ask(system="Mine.") == "Mine." and ask(no_system_prompt=True) is None
    ids = encode_prompt(chat_tok, build_request([{"role": "user", "content": "hi"}], system_prompt=ask()))
    expected = chat_tok.encode_chat_completion(ChatCompletionRequest.from_openai([
        {"role": "system", "content": [{"type": "text", "text": "Think first:"},
                                       {"type": "thinking", "thinking": "draft", "closed": True},
                                       {"type": "text", "text": "then answer."}]},
        {"role": "user", "content": "hi"}])).tokens
    assert ids == expected
