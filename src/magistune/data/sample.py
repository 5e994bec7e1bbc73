"""One tokenised training sample: what the data pipeline hands to the training loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from magistune.data.report import DataReport

IGNORE_INDEX = -100  # the label of every token that is not trained


@dataclass
class Sample:
    """`input_ids` equal mistral-common's `encode_chat_completion`; `labels` are aligned with them (the model
    shifts): the token id where the token is trained, IGNORE_INDEX elsewhere. `source` is `file:line`."""

    input_ids: list[int]
    labels: list[int]
    source: str
    images: list = field(default_factory=list)  # each image's encoded file bytes (bytes, or a memory-mapped
    # uint8 slice of the cache's images.bin); batches.py decodes them to pixels (images.pixel_values)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)

    def to_json(self) -> dict:
        return {"source": self.source, "input_ids": self.input_ids, "labels": self.labels}


@dataclass
class PreparedData:
    """What the data stage hands to training: the split samples, the tokenizer they were encoded with, the report."""

    train: list  # Sample; with rl: PreferenceSample, or KTOSample for rl: kto
    eval: list
    tokenizer_file: Path
    report: DataReport
    from_cache: bool = False


def _prompt_len(labels: list[int]) -> int:
    return next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))


@dataclass
class PreferenceSample:
    """One preference pair (DPO, IPO, ORPO, SimPO). `chosen_input_ids` equal mistral-common's
    `encode_chat_completion` of prompt + chosen answer, `rejected_input_ids` of prompt + rejected answer; both
    begin with the same prompt ids (checked when built). Labels are aligned with the ids (the model shifts) and
    cover the final answer only: its thinking, text, tool calls and `</s>`; every prompt token is IGNORE_INDEX.
    `images` are the prompt's (shared by both sequences), as in Sample."""

    chosen_input_ids: list[int]
    chosen_labels: list[int]
    rejected_input_ids: list[int]
    rejected_labels: list[int]
    source: str
    images: list = field(default_factory=list)

    def __len__(self) -> int:  # tokens processed for this pair: both sequences
        return len(self.chosen_input_ids) + len(self.rejected_input_ids)

    @property
    def n_trained(self) -> int:
        return sum(1 for t in self.chosen_labels + self.rejected_labels if t != IGNORE_INDEX)

    @property
    def prompt_len(self) -> int:
        """Tokens of the shared prompt: the answers start there in both sequences."""
        return _prompt_len(self.chosen_labels)

    def to_json(self) -> dict:
        return {"source": self.source, "chosen_input_ids": self.chosen_input_ids, "chosen_labels": self.chosen_labels,
                "rejected_input_ids": self.rejected_input_ids, "rejected_labels": self.rejected_labels}


@dataclass
class KTOSample(Sample):
    """One KTO example: a Sample (prompt + completion, the completion labelled) and whether the completion is
    desirable (`label: true`) or not."""

    label: bool = True

    @property
    def prompt_len(self) -> int:
        return _prompt_len(self.labels)

    def to_json(self) -> dict:
        return super().to_json() | {"label": self.label}
