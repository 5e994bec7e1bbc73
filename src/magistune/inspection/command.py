"""`magistune inspect CONFIG`: the chosen samples in the terminal, and the HTML report with --html."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from magistune.config import Config, ConfigError
from magistune.data.errors import DataError
from magistune.inspection.collect import collect
from magistune.inspection.page import write_report
from magistune.inspection.terminal import SelectionError, render, select
from magistune.tokenizer import TokenizerError


def use_color(choice: str) -> bool:
    """--color auto: when stdout is a terminal and NO_COLOR is unset."""
    return choice == "always" or (choice == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))


def run_inspect(cfg: Config, config_name: str, samples: int | None, sources: list[str], ids: bool,
                html: str | None, html_samples: int, color: str) -> int:
    """samples: how many to print (default 3, or 0 with --html); sources: print these FILE:LINE instead."""
    if samples is not None and samples < 0:
        raise ConfigError("--samples must be >= 0")
    if html_samples < 1:
        raise ConfigError("--html-samples must be >= 1")
    html_path = Path(html) if html else None
    if html_path is not None and (html_path.is_dir() or not html_path.parent.is_dir()):
        raise ConfigError(f"--html: {html}: " + ("is a folder" if html_path.is_dir() else "its folder does not exist"))
    try:
        ins = collect(cfg)
        chosen = select(ins, samples if samples is not None else (0 if html_path else 3), sources or [])
    except (DataError, TokenizerError, SelectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(ins, chosen, ids=ids, color=use_color(color)))
    if html_path is not None:
        try:
            write_report(ins, html_path, config_name, html_samples)
        except OSError as e:
            print(f"error: --html: {html}: {e.strerror or e}", file=sys.stderr)
            return 1
        shown = min(html_samples, len(ins.items))
        print(f"wrote {html_path}: {shown} of {len(ins.items)} samples, {len(ins.rejected)} rejected record(s)")
    return 0
