"""Samples as text in the terminal: what is trained stands out.

In colour (a terminal, NO_COLOR unset): trained tokens green, the rest dim, control tokens by name in cyan
(green when trained), images blue. Without colour (a pipe, a file): every trained span between ⟦ and ⟧, so
`magistune inspect cfg.yaml | less` still shows the masks. --ids adds each token's id as ⟨id⟩.
"""

from __future__ import annotations

from magistune.inspection.collect import Inspection, Item
from magistune.inspection.tokens import Token, display_tokens, trained_text

_RESET, _DIM, _GREEN, _CYAN, _BLUE, _BOLD = "\033[0m", "\033[2m", "\033[32m", "\033[36m", "\033[34m", "\033[1m"
OPEN, CLOSE = "⟦", "⟧"


class SelectionError(ValueError):
    """--source names no kept sample."""


def select(ins: Inspection, n: int, sources: list[str]) -> list[Item]:
    """The first n items in file order, or those whose source is (or ends with) one of `sources`."""
    if not sources:
        return ins.items[:n]
    chosen = [it for it in ins.items if any(it.source == s or it.source.endswith("/" + s) for s in sources)]
    for s in sources:
        if not any(it.source == s or it.source.endswith("/" + s) for it in chosen):
            why = next((f"{r.reason}: {r.message}" for r in ins.rejected + ins.dropped
                        if r.source == s or r.source.endswith("/" + s)), None)
            raise SelectionError(f"--source {s}: " + (f"the record was not kept ({why})" if why else
                                 "no kept sample comes from there (sources look like "
                                 f"{ins.items[0].source if ins.items else 'FILE:LINE'})"))
    return chosen


def _token_text(t: Token, ids: bool, color: bool) -> str:
    text = t.text
    if ids:
        shown = t.ids if len(t.ids) == 1 else sorted(set(t.ids))
        text += ("⟨" + ",".join(map(str, shown)) + "⟩") if not color else f"{_DIM}⟨{','.join(map(str, shown))}⟩{_RESET}"
    if not color:
        return text
    if t.kind == "img":
        style = _BLUE + (_BOLD if t.trained else "")
    elif t.control:
        style = (_GREEN + _BOLD) if t.trained else _CYAN
    else:
        style = _GREEN if t.trained else _DIM
    return f"{style}{text}{_RESET}"


def render_sequence(tokens: list[Token], ids: bool = False, color: bool = False) -> str:
    out, inside = [], False
    for t in tokens:
        if not color and t.trained != inside:
            out.append(OPEN if t.trained else CLOSE)
            inside = t.trained
        out.append(_token_text(t, ids, color))
    if inside:
        out.append(CLOSE)
    return "".join(out)


def render_item(ins: Inspection, it: Item, ids: bool = False, color: bool = False) -> str:
    head = f"── {it.source} ({it.split}" + (f", {it.note}" if it.note and ins.kind == "kto" else "")
    lines = []
    for seq in it.sequences:
        tokens = display_tokens(seq.ids, seq.labels, ins.namer)
        title = f"{head}, {seq.name}" if len(it.sequences) > 1 else head
        lines.append(f"{title}: {len(seq.ids)} tokens, {seq.n_trained} trained) ──")
        lines.append(render_sequence(tokens, ids, color))
        if seq.n_trained and not color:
            lines.append(f"   trained: {trained_text(tokens)!r}")
    if ins.kind == "grpo" and it.note:
        lines.append(f"   columns for the reward functions: {it.note}")
    return "\n".join(lines)


def render(ins: Inspection, items: list[Item], ids: bool = False, color: bool = False) -> str:
    parts = list(ins.summary)
    parts += [render_item(ins, it, ids, color) for it in items]
    return "\n".join(parts)
