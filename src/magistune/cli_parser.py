"""The `magistune` command line's arguments: every sub-command and its options (cli.py runs them)."""

from __future__ import annotations

import argparse

CHAT_HELP = """input: Enter sends the line; end a line with a backslash to continue it on the next; a line of three
double quotes starts a block that the next such line ends.
commands: /reset (forget the conversation), /system TEXT (set the system prompt), /system (remove it),
/image PATH (attach an image to the next message; vision models), /help, /quit or /exit (or Ctrl-D). Ctrl-C stops an answer and drops that turn."""


def _model_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("config", nargs="?", help="the training config (its output_dir is used)")
    s.add_argument("--model", help="a model folder (merged, full, or a base like tiny-random) instead of the config's")
    s.add_argument("--adapter", help="a LoRA adapter folder (default: the one in output_dir)")
    s.add_argument("--base", action="store_true", help="the config's base model alone, without what was trained")
    s.add_argument("--device", help="torch device (default: cuda if available, else cpu)")


def _sampling_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    s.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    s.add_argument("--max-tokens", type=int, default=40960, help="new tokens per answer, thinking included (default 40960)")
    s.add_argument("--seed", type=int, help="seed the sampler for reproducible output")


def _system_args(s: argparse.ArgumentParser) -> None:
    g = s.add_mutually_exclusive_group()
    g.add_argument("--system", help="system prompt for conversations without one (default: the config's "
                                    "system_prompt / system_prompt_file, else the model's SYSTEM_PROMPT.txt)")
    g.add_argument("--no-system-prompt", action="store_true", help="no default system prompt")


def _data_commands(sub) -> None:
    """The data: check it, tokenise it, look at it."""
    s = sub.add_parser("validate-data", help="check every record of every dataset and print a report")
    s.add_argument("config")

    s = sub.add_parser("preprocess", help="tokenise the datasets into the cache")
    s.add_argument("config")
    s.add_argument("--dump", metavar="FILE.jsonl", help="also write every kept sample as JSON lines")

    s = sub.add_parser("inspect", help="see what is trained: tokens with their masks, and an HTML data report")
    s.add_argument("config")
    s.add_argument("--samples", type=int, metavar="N", help="print the first N samples (default 3; 0 with --html)")
    s.add_argument("--source", action="append", metavar="FILE:LINE", help="print the sample of this record (repeatable)")
    s.add_argument("--ids", action="store_true", help="print each token's id after it, as ⟨id⟩")
    s.add_argument("--html", metavar="REPORT.html", help="also write the HTML data report (one self-contained file)")
    s.add_argument("--html-samples", type=int, default=200, metavar="N", help="samples in the report (default 200)")
    s.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour the trained tokens (auto: on a terminal with NO_COLOR unset; else ⟦ ⟧ mark them)")


def _train_commands(sub) -> None:
    """Training, and turning a sharded checkpoint into a folder."""
    s = sub.add_parser("train", help="fine-tune as the config says")
    s.add_argument("config")
    s.add_argument("--nproc", type=int, metavar="N",
                   help="train on N GPUs of this machine (runs torchrun --standalone --nproc-per-node N; with "
                        "fsdp: true or ddp: true in the config, docs/multi-gpu.md)")

    s = sub.add_parser("consolidate", help="a sharded multi-GPU checkpoint → an adapter or model folder")
    s.add_argument("checkpoint", metavar="CHECKPOINT_DIR")
    s.add_argument("--output", required=True, metavar="DIR")


def _use_commands(sub) -> None:
    """The commands that run the trained model."""
    s = sub.add_parser("chat", help="chat with the trained model in the terminal (tokens stream as generated)",
                       epilog=CHAT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(s)
    _sampling_args(s)
    _system_args(s)
    s.add_argument("--hide-thinking", action="store_true", help='print "[thinking… N tokens]" instead of the thinking')
    s.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="dim the thinking with ANSI codes (auto: when stdout is a terminal and NO_COLOR is unset)")

    s = sub.add_parser("generate", help="batched generation for a JSON-lines file of conversations")
    _model_args(s)
    _sampling_args(s)
    s.add_argument("--input", required=True, metavar="PROMPTS.jsonl", help="one {\"messages\": [...]} per line, last turn user")
    s.add_argument("--output", required=True, metavar="OUT.jsonl")
    s.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    _system_args(s)

    s = sub.add_parser("evaluate", help="loss and perplexity, with the training masks and normalisation")
    s.add_argument("config")
    s.add_argument("--adapter", help="an adapter folder (default: the one in output_dir)")
    s.add_argument("--base", action="store_true", help="evaluate the base model alone")
    s.add_argument("--all", action="store_true", help="every sample (train + eval), not just the eval split")
    s.add_argument("--dataset", action="append", metavar="FILE", help="evaluate these files instead (repeatable)")
    s.add_argument("--batch-size", type=int, help="samples per forward pass (default: micro_batch_size)")
    s.add_argument("--output", metavar="REPORT.json", help="also write the report here")
    s.add_argument("--device", help="torch device (default: cuda if available, else cpu)")


def _output_commands(sub) -> None:
    """What the trained model is written as, and the config's schema."""
    s = sub.add_parser("merge", help="merge the LoRA adapter into the base weights (bf16 safetensors)")
    s.add_argument("config")
    s.add_argument("--output", required=True, metavar="DIR")
    s.add_argument("--adapter", help="an adapter folder (default: output_dir)")
    s.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    s.add_argument("--no-eval", action="store_true",
                   help="skip the eval-split loss of the model as trained and as merged (printed by default)")
    s.add_argument("--device", help="torch device for that evaluation (default: cuda if available, else cpu)")

    s = sub.add_parser("export", help="write a model in Mistral's native layout or as GGUF")
    s.add_argument("config", nargs="?")
    s.add_argument("--model", help="a Hugging Face model folder (e.g. the output of merge) instead of a config")
    s.add_argument("--format", required=True, choices=("mistral", "gguf"))
    s.add_argument("--output", required=True, metavar="PATH", help="a folder (mistral), a .gguf file or a folder (gguf)")
    s.add_argument("--dtype", choices=("bf16", "f16", "fp32"),
                   help="weight type (GGUF: bf16 or f16, default bf16; mistral: default the dtype config.json declares)")

    sub.add_parser("config-schema", help="print the config's JSON schema")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="magistune", description="Fine-tune Magistral models from one YAML file.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_data_commands, _train_commands, _use_commands, _output_commands):
        add(sub)
    return p
