"""The report's plots as inline SVG: no plotting library, nothing fetched."""

from __future__ import annotations

from html import escape


def length_buckets(lengths: list[int], sequence_len: int) -> list[tuple[str, int]]:
    """Power-of-two buckets up to sequence_len, then one for everything longer (data/report.py's histogram)."""
    edges = [16]
    while edges[-1] < sequence_len:
        edges.append(edges[-1] * 2)
    edges[-1] = sequence_len
    counts = [0] * (len(edges) + 1)
    for n in lengths:
        counts[next((k for k, e in enumerate(edges) if n <= e), len(edges))] += 1
    labels = [f"≤{e}" for e in edges] + [f">{sequence_len}"]
    pairs = list(zip(labels, counts))
    used = [k for k, (_, c) in enumerate(pairs) if c]
    return pairs[used[0]:used[-1] + 1] if used else []  # from the first bucket used to the last


def bar_chart(pairs: list[tuple[str, int]], title: str, width: int = 360, height: int = 140) -> str:
    """Vertical bars with their counts above and labels below."""
    if not pairs:
        return f'<svg class="plot" width="{width}" height="40" role="img"><text x="4" y="24">{escape(title)}: none</text></svg>'
    top = max(c for _, c in pairs) or 1
    plot_h, base = height - 56, height - 24  # room for the title and the counts above the bars
    slot = (width - 8) / len(pairs)
    bars = []
    for k, (label, count) in enumerate(pairs):
        h = plot_h * count / top
        x = 4 + k * slot
        bars.append(f'<rect x="{x + 2:.1f}" y="{base - h:.1f}" width="{slot - 4:.1f}" height="{h:.1f}" class="bar">'
                    f"<title>{escape(label)}: {count}</title></rect>"
                    f'<text x="{x + slot / 2:.1f}" y="{base - h - 3:.1f}" class="n">{count if count else ""}</text>'
                    f'<text x="{x + slot / 2:.1f}" y="{base + 13:.1f}" class="lab">{escape(label)}</text>')
    return (f'<svg class="plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{escape(title)}"><text x="4" y="12" class="ttl">{escape(title)}</text>{"".join(bars)}</svg>')


def share_bar(parts: list[tuple[str, float, str]], title: str, width: int = 360) -> str:
    """One horizontal bar split into shares (label, fraction, css class), each labelled with its percentage."""
    x, rects = 4.0, []
    inner = width - 8
    for label, frac, css in parts:
        w = inner * max(0.0, min(1.0, frac))
        rects.append(f'<rect x="{x:.1f}" y="18" width="{w:.1f}" height="18" class="{css}">'
                     f"<title>{escape(label)}: {frac:.1%}</title></rect>")
        if w > 40:
            rects.append(f'<text x="{x + 4:.1f}" y="31" class="in">{escape(label)} {frac:.1%}</text>')
        x += w
    return (f'<svg class="plot" width="{width}" height="40" viewBox="0 0 {width} 40" role="img" '
            f'aria-label="{escape(title)}"><text x="4" y="12" class="ttl">{escape(title)}</text>'
            f'<rect x="4" y="18" width="{inner}" height="18" class="track"/>{"".join(rects)}</svg>')
