"""`magistune generate`: a JSON-lines file of conversations → a JSON-lines file of completions.

Input: one JSON object per line with a `messages` list (OpenAI format, the last turn from the user or a tool)
and optionally `tools`. The config's system prompt is added to conversations without one, as in training.
A vision model (Magistral Small 2509) takes image parts exactly as training data does: paths relative to the
input file's folder (and inside it unless allow_image_paths_outside_dataset), data: URIs, http(s) URLs with
allow_image_urls: true.

Output: one line per non-blank input line, in input order, with the input object's own fields kept and

    "thinking": str | null        the text inside [THINK]…[/THINK] (null: the model wrote no [THINK])
    "answer": str                 everything else before </s>
    "finish_reason": "stop" | "length"    </s> generated, or max_tokens / the context ran out first
    "thinking_unclosed": bool     a [THINK] was still open at the end (its text is in "thinking")
    "tokens": int                 ids generated, [THINK], [/THINK] and </s> included

An input field with one of these names is kept as "input_<name>". A bad line (not UTF-8, not JSON, not a
conversation, rejected by mistral-common, too long for the context) becomes `{"error": "...", "source":
"file:line", ...its own fields}` in the output, at its place, and is printed to stderr as
`file:line: reason: message`; every other line still runs. The exit code is 1 when any line failed, 0 otherwise.
A UTF-8 byte-order mark is accepted; --output may not be the --input file.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from magistune.data.errors import RecordError
from magistune.data.sources import BadLine, SourceError, iter_text_lines, not_text
from magistune.infer.loading import Loaded
from magistune.data.build import image_options
from magistune.infer.prompts import build_request, encode_with_images, image_inputs, takes_images
from magistune.infer.sampling import SamplingOptions, generate_ids, make_generator, max_positions
from magistune.infer.text import decode_text
from magistune.infer.thinking import Completion


@dataclass
class Slot:
    """One input line on its way to the output: a prompt to run, or already an error row."""

    source: str  # file:line
    row: dict | None  # the input object (None when the line is not a JSON object)
    ids: list[int] | None = None
    error: str | None = None
    images: list = field(default_factory=list)  # (C, H, W) pixels of the prompt's images, in token order


def read_slots(path: Path, loaded: Loaded, system_prompt: str | None) -> list[Slot]:
    """Every non-blank line → a Slot: encoded, or with the reason it cannot be."""
    limit = max_positions(loaded.model)
    images = image_options(loaded.source.cfg, path.parent) if takes_images(loaded.tokenizer) else None
    slots = []
    for n, line in iter_text_lines(path, str(path)):  # a line that is not UTF-8 is one bad row; a BOM is fine
        if isinstance(line, str) and not line.strip():
            continue
        slot = Slot(f"{path}:{n}", None)
        slots.append(slot)
        if isinstance(line, BadLine):
            slot.error = f"{line.reason}: {line.message}"
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            slot.error = f"bad_json: {e}"
            continue
        slot.row = row if isinstance(row, dict) else None
        try:
            if slot.row is None:
                raise RecordError("wrong_type", f"a line must be a JSON object, got {type(row).__name__}")
            if (bad := not_text(row)) is not None:
                raise RecordError("invalid_utf8", bad)
            request = build_request(row.get("messages"), row.get("tools"), system_prompt, loaded.special.has_think,
                                    images)
            slot.ids, slot.images = encode_with_images(loaded.tokenizer, request)
            if len(slot.ids) >= limit:
                raise RecordError("too_long", f"the prompt has {len(slot.ids)} tokens; the model's context is {limit}")
        except RecordError as e:
            slot.ids, slot.error = None, f"{e.reason}: {e.message}"
    return slots


def check_paths(input_path: Path, output_path: Path) -> str | None:
    """Why these --input / --output paths cannot be used, or None: writing the output must never
    overwrite the input (the same file by another name or a link included)."""
    if not input_path.is_file():
        return f"--input: {input_path}: file not found"
    with open(input_path, "rb") as f:
        if f.read(2) in (b"\xff\xfe", b"\xfe\xff"):
            return f"--input: {input_path}: the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8"
    if output_path.is_dir():
        return f"--output: {output_path} is a folder; give a file name"
    if output_path.resolve() == input_path.resolve() or (output_path.exists() and output_path.samefile(input_path)):
        return f"--output: {output_path} is the --input file; writing it would destroy the prompts (choose another file)"
    return None


def completion_fields(c: Completion, loaded: Loaded) -> dict:
    return {
        "thinking": decode_text(loaded.tokenizer, c.thinking_ids) if c.had_thinking else None,
        "answer": decode_text(loaded.tokenizer, c.answer_ids),
        "finish_reason": c.finish_reason,
        "thinking_unclosed": not c.closed,
        "tokens": c.tokens,
    }


def output_row(slot: Slot, fields: dict) -> dict:
    row = dict(slot.row or {})
    for key in fields:  # keep an input field that has one of our names
        if key in row:
            row[f"input_{key}"] = row.pop(key)
    row.update(fields)
    return row


def run_generate(loaded: Loaded, input_path: Path, output_path: Path, opts: SamplingOptions, batch_size: int,
                 system_prompt: str | None = None, progress: bool = True) -> int:
    problem = check_paths(input_path, output_path)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        slots = read_slots(input_path, loaded, system_prompt)
    except SourceError as e:  # a UTF-16 file
        print(f"error: --input: {e}", file=sys.stderr)
        return 2
    runnable = [s for s in slots if s.ids is not None]
    for s in slots:
        if s.error:
            print(f"{s.source}: {s.error}", file=sys.stderr)
    # Batches of prompts in input order (left padding makes a row's output independent of its neighbours
    # up to float rounding; with sampling, the random draws depend on the batch: use --batch-size 1 and a
    # seed for row-by-row reproducibility). Rows are written as their batch finishes, in input order.
    output_path.parent.mkdir(parents=True, exist_ok=True)
    position = {id(s): i for i, s in enumerate(slots)}
    written = 0
    generator = make_generator(opts, loaded.device)
    with open(output_path, "w", encoding="utf-8") as f:

        def write_until(end: int) -> None:
            nonlocal written
            for s in slots[written:end]:
                row = output_row(s, {"error": s.error, "source": s.source}) if s.error else s.row
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            written = max(written, end)

        for start in range(0, len(runnable), batch_size):
            batch = runnable[start:start + batch_size]
            with loaded.autocast():
                pixels = image_inputs([a for s in batch for a in s.images], loaded.device)
                outs = generate_ids(loaded.model, [s.ids for s in batch], loaded.special.eos, loaded.special.pad, opts,
                                    generator=generator, images=pixels)
            for s, ids in zip(batch, outs):
                s.row = output_row(s, completion_fields(Completion.parse(ids, loaded.special), loaded))
            write_until(position[id(batch[-1])] + 1)
            if progress:
                print(f"generated {start + len(batch)}/{len(runnable)}", file=sys.stderr, flush=True)
        write_until(len(slots))
    bad = sum(1 for s in slots if s.error)
    print(f"wrote {len(slots)} rows to {output_path} ({len(runnable)} generated, {bad} failed)", file=sys.stderr)
    return 1 if bad else 0
