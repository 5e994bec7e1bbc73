"""`magistune` command line: validate-data, preprocess, inspect, train, consolidate, chat, generate, evaluate, merge, export,
config-schema."""

from __future__ import annotations

import argparse
import json
import sys

from magistune.cli_parser import build_parser
from magistune.config import Config, ConfigError, load_config


def _load(path: str) -> Config:
    cfg, notes = load_config(path)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return cfg


def cmd_validate_data(args: argparse.Namespace) -> int:
    from magistune.data.build import validate_data

    cfg = _load(args.config)
    if cfg.rl == "grpo":
        from magistune.data.prompts import validate_prompts

        return validate_prompts(cfg)
    return validate_data(cfg)


def cmd_preprocess(args: argparse.Namespace) -> int:
    from pathlib import Path

    from magistune.data.build import prepared_dir_key, preprocess
    from magistune.paths import check_writable_dir

    cfg = _load(args.config)
    if cfg.rl == "grpo":
        raise ConfigError("rl: grpo: prompts are encoded when training starts (seconds; nothing to cache); check them "
                          "with `magistune validate-data`")
    # The folders preprocess writes, checked first (the same check as train's output_dir): the cache, and
    # output_dir for rejects.jsonl when bad records are skipped.
    check_writable_dir(cfg.prepared_dir, prepared_dir_key(cfg))
    if cfg.on_bad_record == "skip":
        check_writable_dir(cfg.out_dir, "output_dir")
    if args.dump and (Path(args.dump).is_dir() or not Path(args.dump).parent.is_dir()):
        why = "is a folder" if Path(args.dump).is_dir() else "its folder does not exist"
        raise ConfigError(f"--dump: {args.dump}: {why}")
    return preprocess(cfg, dump=args.dump)


def cmd_inspect(args: argparse.Namespace) -> int:
    from magistune.inspection.command import run_inspect

    return run_inspect(_load(args.config), args.config, args.samples, args.source, args.ids, args.html,
                       args.html_samples, args.color)


GRPO_ONE_PROCESS = "rl: grpo: GRPO on several GPUs is not implemented yet; run it in one process"


def cmd_train(args: argparse.Namespace) -> int:
    """One process: train/sft.py (train/dpo.py with a preference rl:, train/grpo.py with rl: grpo). One of
    torchrun's processes (FSDP2 / DDP): train/sft_distributed.py (train/dpo_distributed.py with a preference rl:)."""
    if args.nproc is not None:
        return _launch_torchrun(args)
    from magistune.train.launch import distributed_mode, torchrun_env

    cfg, env = _load(args.config), torchrun_env()
    mode = distributed_mode(cfg, env)
    if cfg.rl is not None:
        if cfg.rl == "grpo":
            if mode is not None:
                raise ConfigError(f"{GRPO_ONE_PROCESS} (without --nproc / torchrun, fsdp or ddp)")
            from magistune.train.grpo import train as train_grpo

            return train_grpo(cfg)
        if mode is not None:
            from magistune.train.dpo_distributed import train as train_distributed

            return train_distributed(cfg, env, mode)
        from magistune.train.dpo import train

        return train(cfg)
    if mode is None:
        from magistune.train.sft import train

        return train(cfg)
    from magistune.train.sft_distributed import train

    return train(cfg, env, mode)


def _launch_torchrun(args: argparse.Namespace) -> int:
    """`train CONFIG --nproc N`: this process becomes `torchrun --standalone --nproc-per-node N -m magistune train
    CONFIG` (one machine; several machines: run torchrun yourself, docs/multi-gpu.md)."""
    import os

    from magistune.train.launch import launch_command, torchrun_env

    if args.nproc < 1:
        raise ConfigError("--nproc must be >= 1")
    if torchrun_env() is not None:
        raise ConfigError("--nproc: this process was already started by torchrun; drop --nproc")
    cfg = _load(args.config)  # a bad config fails here, before N processes start
    if cfg.rl == "grpo" and args.nproc > 1:
        raise ConfigError(f"{GRPO_ONE_PROCESS} (without --nproc)")
    command = launch_command(args.config, args.nproc)
    print(f"launching: torchrun --standalone --nproc-per-node {args.nproc} -m magistune train {args.config}",
          file=sys.stderr, flush=True)
    os.execv(command[0], command)
    return 0  # not reached


def cmd_consolidate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from magistune.train.checkpoint import CheckpointError
    from magistune.train.dist_checkpoint import consolidate

    try:
        what = consolidate(Path(args.checkpoint), Path(args.output))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {what}")
    return 0


# --- using the trained model ---------------------------------------------------------------------------


def _source(args: argparse.Namespace):
    """Config (optional) + --model/--adapter/--base → a checked ModelSource (no weights loaded yet)."""
    from magistune.infer.loading import resolve_source

    cfg = _load(args.config) if args.config else None
    return resolve_source(cfg, model=args.model, adapter=args.adapter, base_only=args.base)


def _sampling(args: argparse.Namespace):
    from magistune.infer.sampling import SamplingOptions

    try:
        return SamplingOptions(args.temperature, args.top_p, args.max_tokens, args.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _system_prompt(args: argparse.Namespace, source) -> str | None:
    """--no-system-prompt, --system, the config's, else the SYSTEM_PROMPT.txt kept with what was trained (adapter
    or full model folder), else the base model's (model_files/system_prompt.py)."""
    from magistune.model_files.system_prompt import base_model_folder, resolve_system_prompt

    if args.no_system_prompt:
        return None
    if args.system is not None:
        return args.system
    return resolve_system_prompt(source.cfg, [source.adapter_dir, source.model_dir, base_model_folder(source.cfg)])


def _say_loading(source) -> None:
    print(f"loading {source.describe()}", file=sys.stderr, flush=True)


def cmd_chat(args: argparse.Namespace) -> int:
    import os

    from magistune.infer.chat import Style, run_chat
    from magistune.infer.loading import load_for_inference
    from magistune.model.load import pick_device

    source = _source(args)
    opts, system = _sampling(args), _system_prompt(args, source)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    _say_loading(source)
    loaded = load_for_inference(source, pick_device(args.device))
    return run_chat(loaded, opts, Style(color=color, hide_thinking=args.hide_thinking), system)


def cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from magistune.infer.generate import check_paths, run_generate
    from magistune.infer.loading import load_for_inference
    from magistune.model.load import pick_device

    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    problem = check_paths(Path(args.input), Path(args.output))
    if problem:  # before the model loads
        raise ConfigError(problem)
    source = _source(args)
    opts, system = _sampling(args), _system_prompt(args, source)
    _say_loading(source)
    loaded = load_for_inference(source, pick_device(args.device))
    return run_generate(loaded, Path(args.input), Path(args.output), opts, args.batch_size, system,
                        progress=sys.stderr.isatty())


def cmd_evaluate(args: argparse.Namespace) -> int:
    from magistune.data.build import DataError
    from magistune.infer.evaluate import run_evaluate, select_samples
    from magistune.infer.loading import load_for_inference, resolve_source
    from magistune.model.load import pick_device
    from magistune.tokenizer import TokenizerError

    cfg = _load(args.config)
    if cfg.rl is not None:
        raise ConfigError(f"rl: {cfg.rl}: evaluate computes the chat-data loss; evaluating on preference data is not "
                          "implemented yet")
    source = resolve_source(cfg, adapter=args.adapter, base_only=args.base)
    try:
        samples, split = select_samples(cfg, args.all, args.dataset)  # data first: a bad file fails before loading
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _say_loading(source)
    loaded = load_for_inference(source, pick_device(args.device))
    return run_evaluate(loaded, cfg, samples, split, args.dataset, args.batch_size, args.output)


def _parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if t.endswith(unit) and t[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[:-len(unit)]) * factor)
    if t.isdigit():
        return int(t)
    raise ConfigError(f"--max-shard-size: '{text}' is not a size like 5GB, 500MB or 2GiB")


def cmd_merge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from magistune.data.build import resolve_tokenizer_file
    from magistune.export.merge import MergeError, merge_adapter
    from magistune.hf_tokenizer import tokenizer_file_in
    from magistune.infer.loading import check_adapter_dir
    from magistune.model_files import resolve_model_dir

    cfg = _load(args.config)
    if args.adapter:
        adapter = check_adapter_dir(Path(args.adapter), "--adapter")
    else:
        adapter = check_adapter_dir(cfg.out_dir, "output_dir")
    base = resolve_model_dir(cfg.base_model, cfg.config_dir)
    out = Path(args.output)
    if out.resolve() in (base.resolve(), adapter.resolve()):
        raise ConfigError(f"--output: {out} is the base model or adapter folder; choose a new folder")
    if cfg.load_in_4bit:
        print(f"QLoRA run: the base is re-read in bf16 from the original checkpoint {base}, "
              "not dequantised from 4-bit", file=sys.stderr)
    try:
        # the one training copied there first
        tokenizer = tokenizer_file_in(adapter, cfg.tokenizer_use_mistral_common) or resolve_tokenizer_file(cfg)
        report = merge_adapter(base, adapter, out, tokenizer, _parse_size(args.max_shard_size),
                               cfg.trust_remote_code)
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {len(report.merged)} of {report.tensors} tensors from {adapter} into {base}\n"
          f"wrote {out}: {len(report.files)} shard(s), {report.bytes_written / 2**30:.2f} GiB bf16; "
          f"peak tensor memory {report.peak_tensor_mib:.0f} MiB, peak RSS {report.peak_rss_mib:.0f} MiB")
    if not args.no_eval and not args.adapter:  # what merging cost, measured as training measured it
        from magistune.infer.evaluate import format_merge_cost, merge_cost
        from magistune.model.load import pick_device

        print(format_merge_cost(merge_cost(cfg, out, pick_device(args.device))))
    return 0


def _export_model_dir(args: argparse.Namespace):
    from pathlib import Path

    from magistune.model_files import resolve_model_dir

    if args.model:
        return resolve_model_dir(args.model, Path.cwd())
    if not args.config:
        raise ConfigError("give a config file, or --model DIR")
    cfg = _load(args.config)
    out = cfg.out_dir
    if (out / "adapter_config.json").is_file():
        raise ConfigError(f"output_dir: {out} holds a LoRA adapter; merge it first:\n"
                          f"  magistune merge {args.config} --output merged/\n"
                          f"  magistune export --model merged/ --format {args.format} --output {args.output}")
    if (out / "config.json").is_file():
        return out
    raise ConfigError(f"output_dir: {out} holds no trained model; use --model DIR to export a model folder")


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from magistune.export.native import ExportError, hf_to_native
    from magistune.export.to_gguf import export_gguf

    model_dir = _export_model_dir(args)
    out = Path(args.output)
    try:
        if args.format == "mistral":
            hf_to_native(model_dir, out, dtype={None: None, "bf16": torch.bfloat16, "f16": torch.float16,
                                                "fp32": torch.float32}[args.dtype])
            print(f"wrote {out}: params.json, consolidated.safetensors, tekken.json (Mistral's native layout"
                  f"{', with the vision encoder' if (out / 'params.json').read_text().count('vision_encoder') else ''})")
        else:
            dtype = args.dtype or "bf16"
            if dtype == "fp32":
                raise ConfigError("--dtype fp32: GGUF export writes bf16 or f16")
            path = out if out.suffix == ".gguf" else out / f"{model_dir.name}-{dtype}.gguf"
            notes = export_gguf(model_dir, path, dtype)
            print(f"wrote {path} ({dtype})" + (f"; notes: {'; '.join(notes)}" if notes else ""))
    except (ExportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    schema = Config.model_json_schema()
    schema.get("properties", {}).pop("config_dir", None)
    print(json.dumps(schema, indent=2))
    return 0


COMMANDS = {
    "validate-data": cmd_validate_data, "preprocess": cmd_preprocess, "inspect": cmd_inspect, "train": cmd_train,
    "consolidate": cmd_consolidate, "chat": cmd_chat, "generate": cmd_generate, "evaluate": cmd_evaluate,
    "merge": cmd_merge, "export": cmd_export, "config-schema": cmd_config_schema,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
