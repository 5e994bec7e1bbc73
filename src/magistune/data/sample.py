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

    train: list[Sample]
    eval: list[Sample]
    tokenizer_file: Path
    report: DataReport
    from_cache: bool = False
