"""`magistune chat`: an interactive terminal chat that streams tokens as they are generated.

    >>> What is 17 × 23?
    (thinking, dimmed)            hidden with --hide-thinking: "[thinking… 312 tokens]"
    17 × 23 = 391.
    >>>

Input: Enter sends the line. A line ending with a backslash continues on the next line (the backslash
becomes a newline); a line that is exactly three double quotes opens a block that ends at the next such line.
Commands: /reset (forget the conversation, keep the system prompt), /system TEXT (set the system prompt; it
applies to the whole conversation from the next turn), /system alone (remove it), /image PATH (attach an image
to the next message: a vision model only; a path, a data: URI, or an http(s) URL with allow_image_urls),
/help, /quit or /exit; end of input (Ctrl-D) quits too. Ctrl-C during an answer stops it and drops that turn.

Each turn re-encodes the whole conversation with mistral-common (prompts.py), so the model sees exactly what
training showed it. Earlier answers go back into the history as text without their thinking (what a chat
client sends back); a turn without answer text (all thinking, cut by max_tokens) is dropped from the history.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, TextIO

from magistune.data.errors import RecordError
from magistune.infer.loading import Loaded
from magistune.data.images import ImageOptions
from magistune.infer.prompts import build_request, encode_with_images, image_inputs, takes_images
from magistune.infer.sampling import SamplingOptions, generate_ids, make_generator
from magistune.infer.text import TextStream
from magistune.infer.thinking import ANSWER, CLOSE, OPEN, THINKING, Segmenter

DIM, RESET = "\x1b[2m", "\x1b[0m"
PROMPT, MORE = ">>> ", "... "
BLOCK = '"""'
HELP = """commands:
  /reset           forget the conversation (the system prompt stays)
  /system TEXT     set the system prompt;  /system  alone removes it
  /image PATH      attach an image (file, data: URI, or URL with allow_image_urls) to your next message
  /quit, /exit     leave (so does Ctrl-D)
input: end a line with \\ to continue it; a line of three double quotes starts and ends a block"""


@dataclass(frozen=True)
class Style:
    color: bool = True  # ANSI dim for thinking; without it, thinking sits between "--- thinking ---" lines
    hide_thinking: bool = False


@dataclass
class Session:
    system: str | None = None
    history: list[dict] = field(default_factory=list)  # OpenAI messages, user/assistant alternating
    generator: object = None  # one seeded torch.Generator for the whole chat (--seed)
    images: list[dict] = field(default_factory=list)  # image parts waiting for the next user message


def read_message(read_line: Callable[[str], str]) -> str | None:
    """One user message (multi-line rules in the module docstring), or None at end of input."""
    try:
        line = read_line(PROMPT)
    except EOFError:
        return None
    if line.strip() == BLOCK:
        lines = []
        while True:
            try:
                more = read_line(MORE)
            except EOFError:
                break
            if more.strip() == BLOCK:
                break
            lines.append(more)
        return "\n".join(lines)
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(read_line(MORE))
        except EOFError:
            break
    return "\n".join(lines)


class TurnRenderer:
    """Writes one assistant turn as its ids arrive: thinking apart from the answer, text flushed per token."""

    def __init__(self, loaded: Loaded, out: TextIO, style: Style):
        self.out, self.style = out, style
        self.segments = Segmenter(loaded.special)
        self.thinking = TextStream(loaded.tokenizer)
        self.answer = TextStream(loaded.tokenizer)
        self.answer_text: list[str] = []
        self.n_thinking = 0

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()

    def _open(self) -> None:
        if not self.style.hide_thinking:
            self._write(DIM if self.style.color else "--- thinking ---\n")

    def _close(self) -> None:
        if self.style.hide_thinking:
            self._write(f"[thinking… {self.n_thinking} tokens]\n")
            return
        self._write(self.thinking.flush())
        self._write(f"{RESET}\n" if self.style.color else "\n--- answer ---\n")

    def push(self, token: int) -> None:
        kind = self.segments.push(token)
        if kind == OPEN:
            self._open()
        elif kind == CLOSE:
            self._close()
        elif kind == THINKING:
            self.n_thinking += 1
            if not self.style.hide_thinking:
                self._write(self.thinking.push(token))
        elif kind == ANSWER:
            piece = self.answer.push(token)
            self.answer_text.append(piece)
            self._write(piece)

    def finish(self) -> str:
        """Close the turn; returns the answer text."""
        if not self.segments.closed:  # still thinking when the budget ran out
            self._close()
            self._write("[thinking unclosed]\n")
        tail = self.answer.flush()
        self.answer_text.append(tail)
        self._write(tail)
        if not self.segments.stopped:
            self._write("\n[stopped: max_tokens reached]")
        self._write("\n")
        return "".join(self.answer_text)


def answer_turn(loaded: Loaded, session: Session, user_text: str, opts: SamplingOptions, out: TextIO,
                style: Style) -> str | None:
    """Generate and stream one assistant turn. Returns the answer text, or None when the turn failed."""
    messages = session.history + [user_message(user_text, session.images)]
    try:
        request = build_request(messages, system_prompt=session.system, supports_thinking=loaded.special.has_think,
                                images=chat_images(loaded))
        ids, images = encode_with_images(loaded.tokenizer, request)
        renderer = TurnRenderer(loaded, out, style)
        with loaded.autocast():
            generate_ids(loaded.model, [ids], loaded.special.eos, loaded.special.pad, opts,
                         on_step=lambda step: renderer.push(step[0]) if step[0] is not None else None,
                         generator=session.generator, images=image_inputs(images, loaded.device))
    except (RecordError, ValueError) as e:
        out.write(f"error: {getattr(e, 'message', e)}\n")
        return None
    return renderer.finish()


def user_message(text: str, images: list[dict]) -> dict:
    """The user's turn: the text, after the images attached with /image (as parts, the training data format)."""
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*images, {"type": "text", "text": text}]}


def chat_images(loaded: Loaded) -> ImageOptions | None:
    """/image paths are the user's own: read as given (relative to the working folder), anywhere; URLs only with
    allow_image_urls. None for a text-only model."""
    if not takes_images(loaded.tokenizer):
        return None
    cfg = loaded.source.cfg
    return ImageOptions(None, cfg.allow_image_urls, cfg.image_fetch_timeout, cfg.max_image_pixels, allow_outside=True)


def attach_image(loaded: Loaded, session: Session, ref: str) -> str:
    """`/image REF`: check the image now (a typo fails here, not after the next message) and keep it."""
    from magistune.data.images import load_image_part

    options = chat_images(loaded)
    if options is None:
        return "error: this model takes no images (its tokenizer has no image config)"
    if not ref:
        return "usage: /image PATH (or a data: URI, or an http(s) URL with allow_image_urls)"
    part = {"type": "image_url", "image_url": {"url": ref}}
    try:
        load_image_part(part, options, "/image")
    except RecordError as e:
        return f"error: {e.message}"
    session.images.append(part)
    return f"image attached ({len(session.images)} for the next message): {ref}"


def run_chat(loaded: Loaded, opts: SamplingOptions, style: Style, system: str | None = None,
             read_line: Callable[[str], str] = input, out: TextIO = sys.stdout, session: Session | None = None) -> int:
    session = session or Session(system=system, generator=make_generator(opts, loaded.device))
    out.write(f"magistune chat: {loaded.source.describe()}\n/help for commands; Ctrl-D quits\n")
    out.flush()
    while True:
        try:
            text = read_message(read_line)
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line
            out.write("\n")
            continue
        if text is None:
            out.write("\n")
            return 0
        command = text.strip()
        if command in ("/quit", "/exit"):
            return 0
        if command == "/help":
            out.write(HELP + "\n")
        elif command == "/reset":
            session.history.clear()
            out.write("conversation reset\n")
        elif command == "/system" or command.startswith("/system "):
            session.system = command[len("/system"):].strip() or None
            out.write(f"system prompt set: {session.system}\n" if session.system else "system prompt removed\n")
        elif command == "/image" or command.startswith("/image "):
            out.write(attach_image(loaded, session, command[len("/image"):].strip()) + "\n")
        elif command.startswith("/"):
            out.write(f"unknown command {command.split()[0]}; /help lists them\n")
        elif command:
            try:
                answer = answer_turn(loaded, session, text, opts, out, style)
            except KeyboardInterrupt:
                out.write(f"{RESET if style.color else ''}\n[interrupted; turn dropped]\n")
                answer = None
            if answer is not None:
                user, session.images = user_message(text, session.images), []
            if answer and answer.strip():
                session.history += [user, {"role": "assistant", "content": answer}]
            elif answer is not None:
                out.write("[no answer text; turn not kept]\n")
        out.flush()
