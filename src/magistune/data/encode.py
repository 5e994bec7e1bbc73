"""Conversation → (input_ids, labels) in one pass, with mistral-common's own per-message encoders.

This is the loop that `InstructTokenizer.encode_instruct` runs (validate → normalise → encode each message →
prepend BOS), so the ids equal `MistralTokenizer.encode_chat_completion` exactly, but we also learn which
tokens belong to which message. No prefix is ever re-encoded: each token is produced once.

Labels are aligned with input_ids (the model shifts): the id where the token is trained, IGNORE_INDEX
elsewhere. A trained assistant message trains all of its tokens — thinking, text, tool calls and the closing
`</s>` — so the model learns to stop. BOS, [INST]…[/INST], system prompts, tools and tool results are masked.
"""

from __future__ import annotations

from dataclasses import dataclass

from mistral_common.protocol.instruct.chunk import ImageChunk, ThinkChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from magistune.data.errors import RecordError, short_error
from magistune.data.records import Conversation
from magistune.data.sample import IGNORE_INDEX
from magistune.tokenizer import SpecialIds


@dataclass(frozen=True)
class LabelOptions:
    train_thinking: bool = True  # False masks [THINK]…[/THINK] but still trains the answer
    train_on_inputs: bool = False  # True trains every token but BOS
    train_on_eos: str = "turn"  # Axolotl's: which assistant </s> train: turn (trained messages'), last, all, none


def assistant_run_weights(conv: Conversation) -> list[int]:
    """One weight per assistant message *after* mistral-common's normaliser, which merges consecutive
    messages of equal role and weight. Runs of consecutive equal-weight assistant messages become one."""
    runs: list[int] = []
    prev_role, prev_weight = None, None
    k = 0
    for m in conv.request.messages:
        weight = None
        if isinstance(m, AssistantMessage):
            weight = conv.weights[k]
            k += 1
            if not (prev_role == "assistant" and prev_weight == weight):
                runs.append(weight)
        prev_role, prev_weight = m.role, weight
    return runs


class ConversationEncoder:
    def __init__(self, tokenizer: MistralTokenizer):
        self.tokenizer = tokenizer
        self.instruct = tokenizer.instruct_tokenizer
        self.ids = SpecialIds.of(tokenizer)
        # mistral-common's own validator (fine-tuning mode) and normaliser for this tokenizer version.
        self._validator = tokenizer._chat_completion_request_validator
        self._normalizer = tokenizer._instruct_request_normalizer

    def encode(self, conv: Conversation, opts: LabelOptions = LabelOptions()) -> tuple[list[int], list[int], list]:
        """Returns (input_ids, labels, images): images are the original file bytes, in the order of their tokens.
        Raises RecordError when mistral-common rejects the conversation."""
        it = self.instruct
        try:
            request = self._normalizer.from_chat_completion_request(self._validator.validate_request(conv.request))
            it.validate_messages(request.messages)
            if hasattr(it, "_validate_tool_results"):  # v2+ run this check inside encode_instruct
                it._validate_tool_results(request=request)
        except Exception as e:
            raise RecordError("rejected_by_mistral_common", f"mistral-common rejected the conversation: {short_error(e)}") from None

        run_weights = iter(assistant_run_weights(conv))
        first_user, last_user = it.find_first_last_user(request)
        input_ids: list[int] = list(it.start())
        labels: list[int] = [IGNORE_INDEX] * len(input_ids)
        images: list = []
        eos_at: list[int] = []  # where each assistant message's </s> is
        try:
            for idx, msg in enumerate(request.messages):
                trained = False
                if isinstance(msg, UserMessage):
                    tokens, new_images, _ = it.encode_user_message(
                        msg, request.available_tools, idx == last_user, idx == first_user,
                        system_prompt=request.system_prompt, force_img_first=True, settings=request.settings,
                    )
                    images.extend(self._image_bytes(conv, msg, new_images))
                elif isinstance(msg, ToolMessage):
                    tokens, new_images, _ = it.encode_tool_message(msg, idx < last_user)
                    images.extend(self._image_bytes(conv, msg, new_images))
                elif isinstance(msg, AssistantMessage):
                    tokens = it.encode_assistant_message(message=msg, is_before_last_user_message=idx < last_user)
                    trained = next(run_weights) == 1
                elif isinstance(msg, SystemMessage):
                    tokens, _ = it.encode_system_message(msg)
                else:
                    raise RecordError("invalid_format", f"unknown message type {type(msg).__name__}")
                if isinstance(msg, AssistantMessage) and tokens and tokens[-1] == self.ids.eos:
                    eos_at.append(len(input_ids) + len(tokens) - 1)
                input_ids.extend(tokens)
                if trained:
                    labels.extend(self._assistant_labels(tokens, msg, opts))
                else:
                    labels.extend([IGNORE_INDEX] * len(tokens))
        except RecordError:
            raise
        except Exception as e:  # assertions and TokenizerExceptions from the per-message encoders
            raise RecordError("rejected_by_mistral_common", f"mistral-common could not encode it: {short_error(e)}") from None

        if opts.train_on_inputs:
            labels = [IGNORE_INDEX] + input_ids[1:]
        elif opts.train_on_eos != "turn":
            for k, pos in enumerate(eos_at):
                keep = {"all": True, "none": False, "last": k == len(eos_at) - 1}[opts.train_on_eos]
                labels[pos] = input_ids[pos] if keep else IGNORE_INDEX
        return input_ids, labels, images

    def _image_bytes(self, conv: Conversation, msg, encoded: list) -> list[bytes]:
        """The bytes of a message's images in encoding order (mistral-common may move a lone image first)."""
        content = msg.content if isinstance(msg.content, list) else []
        if isinstance(msg, UserMessage) and hasattr(self.instruct, "_maybe_put_image_first"):
            content = self.instruct._maybe_put_image_first(content)
        order = [conv.image_bytes[id(c.image)] for c in content if isinstance(c, ImageChunk)]
        if len(order) != len(encoded):
            raise RecordError("invalid_format", f"{len(encoded)} images encoded, {len(order)} found in the message")
        return order

    def _assistant_labels(self, tokens: list[int], msg: AssistantMessage, opts: LabelOptions) -> list[int]:
        labels = list(tokens)
        if opts.train_thinking or self.ids.begin_think is None:
            return labels
        # Mask each [THINK] … [/THINK] span, delimiters included. Text never encodes to a control id, so
        # the ids themselves mark the spans. An unclosed chunk has no [/THINK]: its length comes from its text.
        chunks = [c for c in msg.content if isinstance(c, ThinkChunk)] if isinstance(msg.content, list) else []
        pos, n = 0, len(tokens)
        for chunk in chunks:
            start = tokens.index(self.ids.begin_think, pos)
            if chunk.closed:
                end = tokens.index(self.ids.end_think, start) + 1
            else:
                end = start + 1 + len(self.instruct.tokenizer.encode(chunk.thinking, bos=False, eos=False))
            labels[start:end] = [IGNORE_INDEX] * (end - start)
            pos = min(end, n)
        return labels
