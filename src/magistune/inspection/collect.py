"""The config's data as inspect shows it: every kept sample in file order, per-dataset figures, rejected records.

SFT, vision and preference data come from `prepare_data`, the training cache: a fresh cache is read, not
re-tokenised; a stale one is rebuilt and saved as `train` and `preprocess` would. Bad records are listed, not
fatal (the cache is the same whatever on_bad_record says; `train` still applies it). GRPO prompts have no
cache: they are encoded here as training encodes them (seconds).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field

from magistune.config import Config
from magistune.data.report import Rejected
from magistune.data.sample import IGNORE_INDEX, KTOSample, PreferenceSample
from magistune.inspection.tokens import TokenNamer
from magistune.hf_tokenizer import load_any_tokenizer
from magistune.train.packing import pack_samples


@dataclass
class Sequence:
    name: str  # sample, chosen, rejected, prompt
    ids: list[int]
    labels: list[int]  # IGNORE_INDEX everywhere for a GRPO prompt

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_trained(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class Item:
    """One kept sample (SFT, KTO), pair (preference) or prompt (GRPO)."""

    source: str  # file:line
    split: str  # train, eval, prompt
    sequences: list[Sequence]
    images: list = field(default_factory=list)  # the encoded image files, in token order
    note: str = ""  # KTO: desirable / undesirable; GRPO: the record's other columns

    @property
    def dataset(self) -> str:
        return dataset_of(self.source)

    @property
    def length(self) -> int:
        return max(len(s.ids) for s in self.sequences)


@dataclass
class DatasetFigures:
    label: str
    samples: int = 0
    tokens: int = 0
    trained: int = 0
    lengths: list[int] = field(default_factory=list)
    rejected: int = 0
    dropped: int = 0
    packing: float | None = None  # real tokens / slots when packed into rows of sequence_len (None: not packed)

    @property
    def trained_share(self) -> float:
        return self.trained / self.tokens if self.tokens else 0.0


@dataclass
class Inspection:
    kind: str  # sft, preference, kto, grpo
    items: list[Item]
    datasets: list[DatasetFigures]
    rejected: list[Rejected]
    dropped: list[Rejected]
    namer: TokenNamer
    sequence_len: int
    summary: list[str]  # lines: records, kept, tokens, packing, where the data came from


def dataset_of(source: str) -> str:
    """`data/demo.jsonl:12` → `data/demo.jsonl` (also `name:row 12` of a Hugging Face dataset)."""
    return source.rsplit(":", 1)[0]


def _line_of(source: str) -> int:
    m = re.search(r"(\d+)$", source)
    return int(m.group(1)) if m else 0


def _items_of(samples: list, split: str) -> list[Item]:
    out = []
    for s in samples:
        if isinstance(s, PreferenceSample):
            seqs = [Sequence("chosen", s.chosen_input_ids, s.chosen_labels),
                    Sequence("rejected", s.rejected_input_ids, s.rejected_labels)]
            out.append(Item(s.source, split, seqs, list(s.images)))
        else:
            note = ("desirable" if s.label else "undesirable") if isinstance(s, KTOSample) else ""
            out.append(Item(s.source, split, [Sequence("sample", s.input_ids, s.labels)], list(s.images), note))
    return out


def _order(items: list[Item], cfg: Config) -> list[Item]:
    """File order: datasets as the config lists them, then line by line (the split shuffles them)."""
    rank = {ds.path: k for k, ds in enumerate(cfg.datasets)}
    return sorted(items, key=lambda it: (rank.get(it.dataset, len(rank)), it.dataset, _line_of(it.source)))


def _figures(cfg: Config, items: list[Item], rejected: list[Rejected], dropped: list[Rejected],
             packable: bool) -> list[DatasetFigures]:
    figs = {ds.path: DatasetFigures(ds.path) for ds in cfg.datasets}
    for it in items:
        f = figs.setdefault(it.dataset, DatasetFigures(it.dataset))
        f.samples += 1
        f.tokens += sum(len(s.ids) for s in it.sequences)
        f.trained += sum(s.n_trained for s in it.sequences)
        f.lengths.append(it.length)
    for r in rejected:
        figs.setdefault(dataset_of(r.source), DatasetFigures(dataset_of(r.source))).rejected += 1
    for r in dropped:
        figs.setdefault(dataset_of(r.source), DatasetFigures(dataset_of(r.source))).dropped += 1
    if packable:
        for f in figs.values():
            rows = [it.sequences[0] for it in items if it.dataset == f.label]
            f.packing = pack_samples(rows, cfg.sequence_len, cfg.seed).efficiency if rows else None  # type: ignore[arg-type]
    return list(figs.values())


def collect(cfg: Config) -> Inspection:
    """Everything inspect shows, for any data kind. Raises DataError / TokenizerError as training would."""
    if cfg.rl == "grpo":
        return _collect_prompts(cfg)
    from magistune.data.build import prepare_data

    quiet = cfg.model_copy(update={"on_bad_record": "skip"})  # list bad records instead of stopping
    data = prepare_data(quiet, progress=sys.stderr.isatty(), warn=False)
    rep = data.report
    items = _order(_items_of(data.train, "train") + _items_of(data.eval, "eval"), cfg)
    kind = "sft" if cfg.rl is None else ("kto" if cfg.rl == "kto" else "preference")
    figures = _figures(cfg, items, rep.rejected, rep.dropped, packable=kind == "sft")  # rl: rows are never packed
    share = rep.tokens_trained / rep.tokens_total if rep.tokens_total else 0.0
    summary = [(f"records: {rep.records}, valid {rep.valid}, rejected {len(rep.rejected)}, dropped for length "
                f"{len(rep.dropped)}, truncated {rep.truncated}"),
               (f"kept: {rep.kept} (train {rep.train_samples}, eval {rep.eval_samples}); tokens {rep.tokens_total:,}, "
                f"trained {rep.tokens_trained:,} ({share:.1%})")]
    if kind == "sft":
        packed = pack_samples(data.train, cfg.sequence_len, cfg.seed)
        summary.append(("sample_packing: " if cfg.sample_packing else "if packed (sample_packing is off): ")
                       + packed.describe())
    summary.append(f"cache: {cfg.prepared_dir} ({'reused' if data.from_cache else 'written'})")
    namer = TokenNamer(load_any_tokenizer(data.tokenizer_file))
    return Inspection(kind, items, figures, rep.rejected, rep.dropped, namer, cfg.sequence_len, summary)


def _collect_prompts(cfg: Config) -> Inspection:
    from magistune.data.build import resolve_tokenizer_file
    from magistune.data.prompts import load_prompt_tokenizer, load_prompts

    tokenizer = load_prompt_tokenizer(resolve_tokenizer_file(cfg))
    data = load_prompts(cfg, tokenizer)
    items = _order([Item(p.source, "prompt", [Sequence("prompt", p.ids, [IGNORE_INDEX] * len(p.ids))],
                         note=json.dumps(p.columns, ensure_ascii=False)) for p in data.prompts], cfg)
    figures = _figures(cfg, items, data.rejected, data.dropped, packable=False)
    summary = [(f"prompt records: {data.records}, kept {len(data.prompts)}, rejected {len(data.rejected)}, too long "
                f"{len(data.dropped)} (rl: grpo: prompts only; the model writes the trained completions)"),
               "cache: none (GRPO prompts are encoded when training starts)"]
    return Inspection("grpo", items, figures, data.rejected, data.dropped, TokenNamer(tokenizer), cfg.sequence_len,
                      summary)
