"""The data pipeline end to end: every dataset → records → samples, the policies, the split, the cache.

    prepare_data(cfg)   → PreparedData (train/eval samples), from the cache when nothing changed
                          (with `rl:` set: PreferenceSample pairs, or KTOSample with rl: kto; data/preference.py)
    validate_data(cfg)  → prints the report; exit code 1 if any record is bad
    preprocess(cfg)     → fills the cache; --dump writes the kept samples as JSON lines
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from tqdm import tqdm

from magistune.config import Config, ConfigError, DatasetConfig
from magistune.data.cache import cache_key, load_cached, save_cached
from magistune.data.encode import ConversationEncoder, LabelOptions
from magistune.data.errors import DataError, RecordError
from magistune.data.images import ImageOptions, local_file_stamp
from magistune.data.records import AXOLOTL_DEFAULT_ROLES, RecordOptions, parse_record
from magistune.data.report import DataReport, Rejected, format_report, format_warnings
from magistune.data.sample import PreparedData, Sample
from magistune.data.sources import BadLine, SourceError, iter_records, open_source, system_prompt_for
from magistune.paths import check_writable_dir
from magistune.data.encode_hf import HFConversationEncoder
from magistune.hf_tokenizer import (customised_tokenizer, is_hf_tokenizer_file, load_hf_tokenizer, model_tokenizer_file,
                                    tiny_hf_tokenizer_path)
from magistune.tokenizer import TINY_NAMES, SpecialIds, TokenizerError, load_tokenizer, tiny_tokenizer_path


def resolve_tokenizer_file(cfg: Config) -> Path:
    """tokenizer_path if set, else the model's own tekken.json (or tokenizer.model.v*, or a Hugging Face
    tokenizer.json with a chat template), with the config's token edits (tokens / special_tokens /
    added_tokens_overrides) applied: a modified copy under the prepared-data folder (tokenizer_edit.py for
    mistral-common files, hf_tokenizer.customised_tokenizer for Hugging Face ones)."""
    path = base_tokenizer_file(cfg)
    if is_hf_tokenizer_file(path):
        if not (cfg.tokens or cfg.special_tokens or cfg.added_tokens_overrides):
            return path
        return customised_tokenizer(path, cfg.prepared_dir, cfg.tokens, cfg.special_tokens, cfg.added_tokens_overrides)
    from magistune.tokenizer_edit import TokenEdits, run_tokenizer_file

    return run_tokenizer_file(path, TokenEdits.of(cfg), cfg.prepared_dir / "tokenizer")


def base_tokenizer_file(cfg: Config) -> Path:
    """tokenizer_path if set, else the model's own tokenizer file (mistral-common's, or the Hugging Face one)."""
    use_mc = cfg.tokenizer_use_mistral_common
    if cfg.tokenizer_path:
        path = cfg.resolve(cfg.tokenizer_path)
        if path.is_dir():
            return model_tokenizer_file(path, use_mistral_common=use_mc)
        if not path.is_file():
            raise ConfigError(f"tokenizer_path: {path} not found")
        if not use_mc and not is_hf_tokenizer_file(path):
            raise ConfigError(f"tokenizer_path: {path} is not a tokenizer.json, and tokenizer_use_mistral_common is "
                              "false (the Hugging Face tokenizer path)")
        return path
    if cfg.base_model in TINY_NAMES:  # the tokenizer alone: no model folder written
        hf = cfg.base_model == "tiny-random-hf" or not use_mc
        return tiny_hf_tokenizer_path() if hf else tiny_tokenizer_path()
    local = cfg.resolve(cfg.base_model)
    if local is not None and local.is_dir():
        return model_tokenizer_file(local, use_mistral_common=use_mc)
    from magistune.model_files import resolve_model_dir  # a hub id (the local HF cache); imports torch

    return model_tokenizer_file(resolve_model_dir(cfg.base_model, cfg.config_dir), use_mistral_common=use_mc)


def make_encoder(tokenizer_file: Path):
    """data/encode.py's encoder for a mistral-common file, data/encode_hf.py's for a tokenizer.json."""
    if is_hf_tokenizer_file(tokenizer_file):
        return HFConversationEncoder(load_hf_tokenizer(tokenizer_file))
    return ConversationEncoder(load_tokenizer(tokenizer_file))


def _encode_dataset(ds: DatasetConfig, cfg: Config, encoder: ConversationEncoder, rep: DataReport,
                    image_files: set[str], progress: bool) -> list[Sample]:
    """Every record of one dataset: bad ones go to rep.rejected, long ones follow the length policy."""
    labels_opts = LabelOptions(train_thinking=ds.train_thinking, train_on_inputs=ds.train_on_inputs,
                               train_on_eos=ds.train_on_eos)
    policy = ds.excess_length_strategy or cfg.excess_length_strategy
    limit = cfg.sequence_len
    try:
        src = open_source(ds, cfg)
        opts = _record_options(ds, cfg, encoder, src)
        records = shard_records(iter_records(src), ds)
        samples: list[Sample] = []
        records_before = rep.records
        for where, record in tqdm(records, desc=f"tokenising {ds.path}", unit=" rec", disable=not progress, file=sys.stderr):
            rep.records += 1
            if isinstance(record, BadLine):
                rep.rejected.append(Rejected(where, record.reason, record.message))
                continue
            try:
                conv = parse_record(record, opts)
                ids, labels, images = encoder.encode(conv, labels_opts)
                if all(t == -100 for t in labels):
                    raise RecordError("no_trained_tokens", "no token is trained (every assistant message has weight 0 or train: false)")
                over_cap = image_cap_violation(ids, images, encoder.ids, cfg)
                if over_cap and policy == "truncate":
                    raise RecordError("too_many_images", over_cap)
            except RecordError as e:
                rep.rejected.append(Rejected(where, e.reason, e.message, record))
                continue
            rep.valid += 1
            rep.warnings += [Rejected(where, reason, message) for reason, message in conv.warnings]
            rep.lengths.append(len(ids))
            image_files.update(conv.image_origins)
            if over_cap:
                rep.dropped.append(Rejected(where, "too_many_images", over_cap))
                continue
            if len(ids) > limit:
                if policy == "drop":
                    rep.dropped.append(Rejected(where, "too_long", f"{len(ids)} tokens > sequence_len {limit}"))
                    continue
                ids, labels, images, why = truncate(ids, labels, images, limit, encoder.ids)
                if why:
                    rep.dropped.append(Rejected(where, "truncation", why))
                    continue
                rep.truncated += 1
            samples.append(Sample(ids, labels, where, images))
    except SourceError as e:
        raise DataError(str(e)) from None
    if rep.records == records_before:  # an empty file is a mistake (a failed export), not a dataset
        raise DataError(f"{ds.path}: the dataset has no records (resolved to {src.path or ds.path}); "
                        "fill it or remove it from datasets")
    return _cap_and_mix(samples, ds, cfg.seed)


def image_options(cfg: Config, base_dir: Path) -> ImageOptions:
    outside = cfg.allow_image_paths_outside_dataset
    roots = tuple(cfg.resolve(r) for r in outside) if isinstance(outside, list) else ()
    return ImageOptions(base_dir, cfg.allow_image_urls, cfg.image_fetch_timeout, cfg.max_image_pixels,
                        allow_outside=outside is True, extra_roots=roots)  # type: ignore[arg-type]


def _record_options(ds: DatasetConfig, cfg: Config, encoder: ConversationEncoder, src) -> RecordOptions:
    base_dir = src.path if src.path is None or src.path.is_dir() else src.path.parent
    return RecordOptions(
        ds.field_messages, ds.field_tools, system_prompt_for(ds, cfg),
        encoder.ids.has_think or isinstance(encoder, HFConversationEncoder), ds.train_on,  # HF: the template decides
        supports_images=encoder.supports_images if isinstance(encoder, HFConversationEncoder)
        else encoder.instruct.image_encoder is not None,
        images=image_options(cfg, base_dir or cfg.config_dir),
        property_mappings=tuple((ds.message_property_mappings or {}).items()),
        roles=AXOLOTL_DEFAULT_ROLES if ds.roles is None else tuple((n, r) for r, names in ds.roles.items() for n in names),
        field_training=ds.message_field_training, field_thinking=ds.field_thinking,
        default_weight=int("assistant" in ds.roles_to_train), drop_system_message=ds.drop_system_message,
        reasoning_effort=(ds.chat_template_kwargs or {}).get("reasoning_effort"),
    )


def shard_records(records, ds: DatasetConfig):
    """Axolotl's `shards`/`shards_idx`: piece shards_idx of `shards` contiguous pieces, as datasets.Dataset.shard
    (contiguous=True) cuts them: the first len % shards pieces hold one record more."""
    if ds.shards is None:
        return records
    records = list(records)
    size, extra = divmod(len(records), ds.shards)
    start = ds.shards_idx * size + min(ds.shards_idx, extra)
    return records[start:start + size + (ds.shards_idx < extra)]


def _encode_preference_dataset(ds: DatasetConfig, cfg: Config, encoder: ConversationEncoder, rep: DataReport,
                               image_files: set[str], progress: bool) -> list:
    """Every preference record of one dataset (data/preference.py): pairs, or KTO examples with `rl: kto`."""
    from magistune.data.preference import PreferenceEncoder, fit, split_record, to_sample

    policy = ds.excess_length_strategy or cfg.excess_length_strategy
    try:
        src = open_source(ds, cfg)
        penc = PreferenceEncoder(encoder, _record_options(ds, cfg, encoder, src))
        samples = []
        for where, record in tqdm(iter_records(src), desc=f"tokenising {ds.path}", unit=" rec", disable=not progress,
                                  file=sys.stderr):
            rep.records += 1
            if isinstance(record, BadLine):
                rep.rejected.append(Rejected(where, record.reason, record.message))
                continue
            try:
                rec = split_record(record, cfg.rl == "kto", ds.field_tools)
                encoded = penc.encode(rec)
                over_cap = image_cap_violation(encoded[0].ids, encoded[0].images, encoder.ids, cfg)
                if over_cap and policy == "truncate":
                    raise RecordError("too_many_images", over_cap)
            except RecordError as e:
                rep.rejected.append(Rejected(where, e.reason, e.message, record))
                continue
            rep.valid += 1
            rep.lengths.append(max(len(e.ids) for e in encoded))
            image_files.update(encoded[0].conv.image_origins)
            if over_cap:
                rep.dropped.append(Rejected(where, "too_many_images", over_cap))
                continue
            kept, why = fit(penc, rec, encoded, cfg.sequence_len, policy)
            if kept is None:
                rep.dropped.append(Rejected(where, "too_long" if policy == "drop" else "truncation", why))
                continue
            rep.truncated += kept is not encoded
            samples.append(to_sample(rec, kept, where))
    except SourceError as e:
        raise DataError(str(e)) from None
    return _cap_and_mix(samples, ds, cfg.seed)


def image_cap_violation(ids: list[int], images: list, special: SpecialIds, cfg: Config) -> str | None:
    """Why a sample is over max_images_per_sample or max_image_tokens_per_sample, or None."""
    if not images:
        return None
    if cfg.max_images_per_sample is not None and len(images) > cfg.max_images_per_sample:
        return f"{len(images)} images > max_images_per_sample {cfg.max_images_per_sample}"
    if cfg.max_image_tokens_per_sample is not None:
        image_ids = {special.img, special.img_break, special.img_end}
        n = sum(1 for t in ids if t in image_ids)
        if n > cfg.max_image_tokens_per_sample:
            return f"{n} image tokens > max_image_tokens_per_sample {cfg.max_image_tokens_per_sample}"
    return None


def truncate(ids: list[int], labels: list[int], images: list, limit: int, special: SpecialIds):
    """The first `limit` tokens, with the images whose tokens end inside them. Returns (ids, labels, images,
    why-dropped): a cut through an image's tokens, or no trained token left, drops the sample."""
    ids, labels = ids[:limit], labels[:limit]
    if all(t == -100 for t in labels):
        return ids, labels, images, f"no trained token in the first {limit} tokens"
    if images:
        complete = ids.count(special.img_end)
        last_end = max((i for i, t in enumerate(ids) if t == special.img_end), default=-1)
        if any(t in (special.img, special.img_break) for t in ids[last_end + 1:]):
            return ids, labels, images, f"the cut at {limit} tokens falls inside an image"
        images = images[:complete]
    return ids, labels, images, None


def _cap_and_mix(samples: list[Sample], ds: DatasetConfig, seed: int) -> list[Sample]:
    """max_samples caps, mix_weight repeats (2.0 = twice) or subsamples (0.5 = half); both seeded."""
    rng = random.Random(f"{seed}:{ds.path}")
    if ds.max_samples is not None and len(samples) > ds.max_samples:
        samples = rng.sample(samples, ds.max_samples)
    if ds.mix_weight != 1.0:
        whole, frac = int(ds.mix_weight), ds.mix_weight - int(ds.mix_weight)
        samples = samples * whole + rng.sample(samples, round(frac * len(samples)))
    return samples


def encode_all(cfg: Config, progress: bool = True) -> tuple[list[Sample], DataReport, Path]:
    tok_file = resolve_tokenizer_file(cfg)
    encoder = make_encoder(tok_file)
    rep = DataReport()
    samples: list[Sample] = []
    image_files: set[str] = set()
    encode_dataset = _encode_dataset if cfg.rl is None else _encode_preference_dataset
    for ds in cfg.datasets:
        samples.extend(encode_dataset(ds, cfg, encoder, rep, image_files, progress))
    rep.image_stamps = {o: list(st) for o in sorted(image_files) if (st := local_file_stamp(o)) is not None}
    return samples, rep, tok_file


def split_samples(samples: list[Sample], cfg: Config) -> tuple[list[Sample], list[Sample]]:
    """Seeded shuffle, then val_set_size (a fraction if < 1, a count otherwise) goes to eval. With
    shuffle_merged_datasets: false the order stays and eval is the last samples (train_test_split(shuffle=False))."""
    order = list(range(len(samples)))
    if cfg.shuffle_merged_datasets:
        random.Random(cfg.seed).shuffle(order)
    else:
        order.reverse()  # eval takes order[:n_eval]: the last samples; train is then re-reversed below
    n_eval = round(cfg.val_set_size * len(samples)) if cfg.val_set_size < 1 else int(cfg.val_set_size)
    if cfg.val_set_size > 0 and len(samples) > 1:
        n_eval = min(max(n_eval, 1), len(samples) - 1)
    else:
        n_eval = 0
    train, eval_ = order[n_eval:], order[:n_eval]
    if not cfg.shuffle_merged_datasets:
        train, eval_ = train[::-1], eval_[::-1]
    return [samples[i] for i in train], [samples[i] for i in eval_]


def _split_and_count(samples: list[Sample], cfg: Config, rep: DataReport) -> tuple[list[Sample], list[Sample]]:
    train, eval_ = split_samples(samples, cfg)
    rep.kept, rep.train_samples, rep.eval_samples = len(samples), len(train), len(eval_)
    rep.tokens_total = sum(len(s) for s in samples)
    rep.tokens_trained = sum(s.n_trained for s in samples)
    rep.images = sum(len(s.images) for s in samples)
    rep.image_bytes = sum(len(img) for s in samples for img in s.images)
    if len(train) < len(eval_):
        rep.warnings.append(Rejected("val_set_size", "small_train_split", (
            f"val_set_size {cfg.val_set_size:g} leaves {len(train)} train and {len(eval_)} eval sample(s): fewer to "
            "train on than to evaluate (below 1 it is a share of the samples, from 1 on a number of samples)")))
    return train, eval_


def print_warnings(rep: DataReport, max_listed: int = 20) -> None:
    """The report's warnings on stderr (train and evaluate print no report; validate-data and preprocess do)."""
    if rep.warnings:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(rep.warning_counts().items()))
        listed = [line for line in format_warnings(rep, max_listed) if line.startswith("    ")]
        print(f"warning: {len(rep.warnings)} data warning(s) ({counts}); the samples are kept:\n" + "\n".join(listed),
              file=sys.stderr)


def _apply_bad_record_policy(cfg: Config, rep: DataReport) -> None:
    if not rep.rejected:
        return
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(rep.reject_counts().items()))
    if cfg.on_bad_record == "error":
        lines = [f"  {r.source}: {r.reason}: {r.message}" for r in rep.rejected]
        raise DataError(f"{len(rep.rejected)} bad record(s) ({counts}); fix them or set on_bad_record: skip\n" + "\n".join(lines))
    check_writable_dir(cfg.out_dir, "output_dir")
    rejects = cfg.out_dir / "rejects.jsonl"
    with open(rejects, "w", encoding="utf-8") as f:
        for r in rep.rejected:
            f.write(json.dumps(r.to_json(), ensure_ascii=False, default=str) + "\n")
    print(f"skipped {len(rep.rejected)} bad record(s) ({counts}); details in {rejects}", file=sys.stderr)


def build_data(cfg: Config, progress: bool = True) -> PreparedData:
    samples, rep, tok_file = encode_all(cfg, progress)
    _apply_bad_record_policy(cfg, rep)
    if not samples:
        raise DataError("no sample is left to train on:\n" + format_report(rep, cfg.sequence_len))
    train, eval_ = _split_and_count(samples, cfg, rep)
    return PreparedData(train, eval_, tok_file, rep)


def prepare_data(cfg: Config, progress: bool = True, warn: bool = True) -> PreparedData:
    """The samples for training: from the cache when config, data and tokenizer are unchanged.
    warn: print the report's warnings on stderr (preprocess prints the whole report instead)."""
    key = cache_key(cfg, resolve_tokenizer_file(cfg))
    data = load_cached(cfg.prepared_dir, key)
    if data is not None:
        if data.report.rejected:
            _apply_bad_record_policy(cfg, data.report)
    else:
        check_writable_dir(cfg.prepared_dir, prepared_dir_key(cfg))  # before minutes of tokenising, not after
        data = build_data(cfg, progress)
        save_cached(cfg.prepared_dir, key, data)
    if warn:
        print_warnings(data.report)
    return data


def prepared_dir_key(cfg: Config) -> str:
    """The key that sets where the cache goes (for messages)."""
    return "dataset_prepared_path" if cfg.dataset_prepared_path else "output_dir"


def validate_data(cfg: Config) -> int:
    try:
        samples, rep, _ = encode_all(cfg)
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _split_and_count(samples, cfg, rep)
    print(format_report(rep, cfg.sequence_len))
    return 1 if rep.rejected else 0


def preprocess(cfg: Config, dump: str | None = None) -> int:
    try:
        data = prepare_data(cfg, warn=False)
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_report(data.report, cfg.sequence_len))
    print(f"cache: {cfg.prepared_dir} ({'reused' if data.from_cache else 'written'})")
    if dump:
        try:
            with open(dump, "w", encoding="utf-8") as f:
                for s in data.train + data.eval:
                    f.write(json.dumps(s.to_json()) + "\n")
        except OSError as e:
            print(f"error: --dump: {dump}: {e.strerror or e}", file=sys.stderr)
            return 1
        print(f"dumped {len(data.train) + len(data.eval)} samples to {dump}")
    return 0
