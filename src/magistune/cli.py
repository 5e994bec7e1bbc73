"""`magistune` command line: validate-data, preprocess, train, config-schema."""

from __future__ import annotations

import argparse
import json
import sys

from magistune.config import Config, ConfigError, load_config


def _load(path: str) -> Config:
    cfg, notes = load_config(path)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return cfg


def cmd_validate_data(args: argparse.Namespace) -> int:
    from magistune.data.build import validate_data

    return validate_data(_load(args.config))


def cmd_preprocess(args: argparse.Namespace) -> int:
    from magistune.data.build import preprocess

    return preprocess(_load(args.config), dump=args.dump)


def cmd_train(args: argparse.Namespace) -> int:
    from magistune.train.recipe import train

    return train(_load(args.config))


def cmd_config_schema(args: argparse.Namespace) -> int:
    schema = Config.model_json_schema()
    schema.get("properties", {}).pop("config_dir", None)
    print(json.dumps(schema, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="magistune", description="Fine-tune Magistral models from one YAML file.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("validate-data", help="check every record of every dataset and print a report")
    s.add_argument("config")
    s.set_defaults(func=cmd_validate_data)

    s = sub.add_parser("preprocess", help="tokenise the datasets into the cache")
    s.add_argument("config")
    s.add_argument("--dump", metavar="FILE.jsonl", help="also write every kept sample as JSON lines")
    s.set_defaults(func=cmd_preprocess)

    s = sub.add_parser("train", help="fine-tune as the config says")
    s.add_argument("config")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("config-schema", help="print the config's JSON schema")
    s.set_defaults(func=cmd_config_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
