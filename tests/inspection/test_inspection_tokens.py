"""Display tokens: their texts join to mistral-common's decoded text; control tokens by name; images folded."""

from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

from magistune.data.sample import IGNORE_INDEX
from magistune.inspection.tokens import TokenNamer, display_tokens, trained_spans, trained_text


def test_texts_join_to_the_decoded_text_and_split_characters_land_once(tiny_tok):
    raw = tiny_tok.instruct_tokenizer.tokenizer
    ids = raw.encode("héllo wörld 日本語 🙂 done", bos=True, eos=True)
    tokens = display_tokens(ids, None, TokenNamer(tiny_tok))
    assert "".join(t.text for t in tokens) == raw.decode(ids, special_token_policy=SpecialTokenPolicy.KEEP)
    assert tokens[0].text == "<s>" and tokens[0].control and tokens[-1].text == "</s>"
    assert not any(t.trained for t in tokens)


def test_kinds_and_trained_spans_of_a_thinking_and_tool_call_conversation(tiny_tok):
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "Call the tool.", "closed": True}],
                 "tool_calls": [{"id": "abc123def", "type": "function",
                                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    ids = tiny_tok.encode_chat_completion(ChatCompletionRequest.from_openai(messages, tools=tools)).tokens
    start = ids.index(tiny_tok.instruct_tokenizer.tokenizer.get_special_token("[/INST]")) + 1
    labels = [IGNORE_INDEX] * start + ids[start:]
    tokens = display_tokens(ids, labels, TokenNamer(tiny_tok))
    think = "".join(t.text for t in tokens if t.kind == "think")
    tool = "".join(t.text for t in tokens if t.kind == "tool")
    assert think == "[THINK]Call the tool.[/THINK]"
    assert tool.startswith("[TOOL_CALLS]get_weather") and '{"city": "Oslo"}' in tool and tool.endswith("</s>")
    assert trained_spans(tokens) == [think + tool] == [trained_text(tokens)]
    assert {t.kind for t in tokens if not t.trained} == {"ctl", "text"}


def test_an_image_run_is_one_token_named_with_its_length(tiny_tok):
    namer = TokenNamer(tiny_tok)
    sp = namer.special
    image = [sp.img, sp.img, sp.img_break, sp.img, sp.img, sp.img_end]
    ids = [sp.bos, *image, *image, sp.eos]
    tokens = display_tokens(ids, [IGNORE_INDEX] * len(ids), namer)
    assert [t.text for t in tokens] == ["<s>", "[IMG]×6", "[IMG]×6", "</s>"]
    assert tokens[1].ids == image and tokens[1].kind == "img"
