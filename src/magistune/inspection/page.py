"""The HTML data report: one self-contained file (inline CSS, SVG and a little JS; nothing fetched).

    per dataset   kept samples, rejected and dropped records, trained share, length histogram, packing efficiency
    rejected      every rejected record with its file:line and reason; the records dropped for length
    samples       every kept sample (up to a limit) with its tokens styled by kind: trained / prompt / thinking /
                  tool call / image / control; hover a token for its id and label; search by text and by source;
                  preference pairs show chosen and rejected side by side

Hooks for tests and scripts: each sample is `div.sample[data-index][data-source]`, each token a span whose class
starts with `t` (trained) or `p` (not trained) and whose data-id holds its id(s); rejected records are
`tr.rejected[data-source]`; the body's data-samples counts the samples in the page. A link can open it filtered:
report.html#q=paris&source=demo.jsonl:3 fills in the two search boxes.
"""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from magistune.inspection.collect import DatasetFigures, Inspection, Item
from magistune.inspection.svg import bar_chart, length_buckets, share_bar
from magistune.inspection.tokens import Token, display_tokens

MAX_IMAGE_BYTES = 256 * 1024  # larger images are named, not embedded
IMAGE_BUDGET = 16 * 2**20  # embedded image bytes per report

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d1d1f;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.muted{color:#666}.datasets{display:flex;flex-wrap:wrap;gap:16px}
.dataset{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px}
.dataset table td{padding:0 10px 0 0}.plot{display:block;margin-top:6px}
.plot .bar{fill:#4a7fc1}.plot .track{fill:#eee}.plot .trained{fill:#2e9d57}.plot .prompt{fill:#bbb}
.plot .packed{fill:#4a7fc1}.plot text{font-size:11px}.plot .n,.plot .lab{text-anchor:middle}
.plot .ttl{font-weight:600}.plot .in{fill:#fff}
table.list{border-collapse:collapse;background:#fff}table.list td,table.list th{border:1px solid #ddd;
padding:3px 8px;text-align:left;vertical-align:top}
.filters{position:sticky;top:0;background:#fafafa;padding:8px 0;z-index:1}
.filters input{font-size:14px;padding:4px 8px;width:280px;margin-right:8px}
.sample{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 12px;margin:10px 0}
.sample .head{font-weight:600;margin-bottom:4px}.sample .note{font-weight:400;color:#555}
.seqs{display:grid;gap:12px}.seqs.pair{grid-template-columns:1fr 1fr}.seq h4{margin:2px 0;font-size:13px}
.toks{white-space:pre-wrap;word-break:break-word;font:13px/1.6 ui-monospace,monospace;margin:0}
.toks span{border-radius:2px}.toks .p{color:#777}.toks .t{background:#d4f5dc;color:#0b4d22}
.toks .ctl{font-weight:600;font-size:11px;color:#6b4fa0}.toks .t.ctl{color:#0b4d22;background:#a9e8b9}
.toks .think{font-style:italic}.toks .p.think{color:#8a7a4a}.toks .t.think{background:#fff1c2;color:#6b5310}
.toks .tool{text-decoration:underline dotted}.toks .t.tool{background:#d6e6ff;color:#123f80}
.toks .img{background:#e3dcf5;color:#4a2d8f;font-weight:600;font-size:11px;padding:0 2px}
.toks .t.img{outline:2px solid #2e9d57}.legend span{margin-right:10px;padding:1px 4px}
.thumbs img{max-height:72px;margin:4px 6px 0 0;border:1px solid #ccc}
"""

SCRIPT = """
const q=document.getElementById('q'),src=document.getElementById('src'),shown=document.getElementById('shown');
const items=[...document.querySelectorAll('.sample')].map(el=>[el,el.textContent.toLowerCase()]);
const at=(s,w)=>s===w||s.endsWith('/'+w)||(!/:\\d+$/.test(w)&&s.includes(w));  // file:line exactly, a file in part
function apply(){const t=q.value.toLowerCase(),w=src.value.trim();let n=0;
 for(const [el,text] of items){const ok=(!t||text.includes(t))&&(!w||at(el.dataset.source,w));
  el.hidden=!ok;n+=ok;}shown.textContent=n;}
q.addEventListener('input',apply);src.addEventListener('input',apply);
document.addEventListener('mouseover',e=>{const el=e.target;if(!el.dataset||!el.dataset.id||el.title)return;
 const trained=el.classList.contains('t');el.title='id '+el.dataset.id+' \\u00b7 label '+
 (trained?el.dataset.id:'-100 (not trained)')+' \\u00b7 '+el.classList[1];});
const h=new URLSearchParams(location.hash.slice(1));q.value=h.get('q')||'';src.value=h.get('source')||'';
apply();document.body.dataset.ready='1';
"""

_KIND_LEGEND = [("t text", "trained"), ("p text", "prompt (not trained)"), ("t think", "thinking"),
                ("t tool", "tool call"), ("p img", "[IMG]×N image"), ("p ctl", "[CONTROL]")]


def _token(t: Token) -> str:
    ids = ",".join(map(str, t.ids if len(t.ids) == 1 else sorted(set(t.ids))))
    return f'<span class="{"t" if t.trained else "p"} {t.kind}" data-id="{ids}">{escape(t.text)}</span>'


def _image(blob, budget: list[int]) -> str:
    data = bytes(blob)
    mime = next((m for magic, m in ((b"\x89PNG", "png"), (b"\xff\xd8", "jpeg"), (b"GIF8", "gif"), (b"RIFF", "webp"))
                 if data.startswith(magic)), None)
    if mime is None or len(data) > MAX_IMAGE_BYTES or budget[0] < len(data):
        return f'<span class="muted">[image, {len(data) / 1024:.0f} KiB, not embedded]</span>'
    budget[0] -= len(data)
    return f'<img alt="image" src="data:image/{mime};base64,{base64.b64encode(data).decode()}">'


def _sample(ins: Inspection, index: int, it: Item, budget: list[int]) -> str:
    seqs = []
    for seq in it.sequences:
        tokens = display_tokens(seq.ids, seq.labels, ins.namer)
        name = f"{seq.name}: " if len(it.sequences) > 1 else ""
        title = f"<h4>{escape(name)}{len(seq.ids)} tokens, {seq.n_trained} trained</h4>"
        seqs.append(f'<div class="seq" data-name="{seq.name}">{title}<pre class="toks">'
                    f'{"".join(map(_token, tokens))}</pre></div>')
    note = f' <span class="note">{escape(it.note)}</span>' if it.note else ""
    thumbs = "".join(_image(img, budget) for img in it.images)
    return (f'<div class="sample" data-index="{index}" data-source="{escape(it.source)}" data-split="{it.split}">'
            f'<div class="head">#{index} {escape(it.source)} <span class="note">({it.split})</span>{note}</div>'
            f'<div class="seqs{" pair" if len(it.sequences) == 2 else ""}">{"".join(seqs)}</div>'
            + (f'<div class="thumbs">{thumbs}</div>' if thumbs else "") + "</div>")


def _dataset(f: DatasetFigures, sequence_len: int, kind: str) -> str:
    rows = [("kept samples", f.samples), ("rejected records", f.rejected), ("dropped for length", f.dropped),
            ("tokens", f"{f.tokens:,}"), ("trained tokens", f"{f.trained:,} ({f.trained_share:.1%})")]
    table = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
    plots = share_bar([("trained", f.trained_share, "trained"), ("prompt", 1 - f.trained_share, "prompt")],
                      "trained share of tokens") if f.tokens else ""
    what = {"preference": "pair (the longer side)", "grpo": "prompt"}.get(kind, "sample")
    plots += bar_chart(length_buckets(f.lengths, sequence_len), f"tokens per {what}")
    if f.packing is not None:
        plots += share_bar([("real tokens", f.packing, "packed")], f"packing efficiency (its samples in rows of {sequence_len})")
    return (f'<div class="dataset" data-dataset="{escape(f.label)}"><b>{escape(f.label)}</b>'
            f"<table>{table}</table>{plots}</div>")


def _records_table(records, css: str, empty: str) -> str:
    if not records:
        return f'<p class="muted">{empty}</p>'
    rows = "".join(f'<tr class="{css}" data-source="{escape(r.source)}"><td>{escape(r.source)}</td>'
                   f"<td>{escape(r.reason)}</td><td>{escape(r.message)}</td></tr>" for r in records)
    return f'<table class="list"><tr><th>file:line</th><th>reason</th><th>message</th></tr>{rows}</table>'


def render_page(ins: Inspection, title: str, max_samples: int) -> str:
    items = ins.items[:max_samples]
    budget = [IMAGE_BUDGET]
    samples = "".join(_sample(ins, k, it, budget) for k, it in enumerate(items, 1))
    more = (f'<p class="muted">the first {len(items)} of {len(ins.items)} samples (--html-samples sets how many)</p>'
            if len(items) < len(ins.items) else "")
    legend = "".join(f'<span class="{c}">{escape(n)}</span>' for c, n in _KIND_LEGEND)
    summary = "".join(f"<li>{escape(line)}</li>" for line in ins.summary)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>magistune inspect: {escape(title)}</title>
<style>{CSS}</style></head>
<body data-kind="{ins.kind}" data-samples="{len(items)}">
<h1>What magistune trains on</h1><p class="muted">{escape(title)} · data kind: {ins.kind}</p>
<ul>{summary}</ul>
<h2>Datasets</h2><div class="datasets">{"".join(_dataset(f, ins.sequence_len, ins.kind) for f in ins.datasets)}</div>
<h2 id="rejected">Rejected records ({len(ins.rejected)})</h2>
{_records_table(ins.rejected, "rejected", "none: every record is valid")}
<h2>Dropped for length ({len(ins.dropped)})</h2>
{_records_table(ins.dropped, "dropped", "none")}
<h2 id="samples">Samples</h2>
<div class="filters"><input id="q" type="search" placeholder="search the text"><input id="src" type="search"
placeholder="source, e.g. data.jsonl:12"><span id="shown">{len(items)}</span> of {len(items)} shown
<div class="legend toks">{legend} · hover a token for its id and label</div></div>
{more}{samples}
<script>{SCRIPT}</script>
</body></html>
"""


def write_report(ins: Inspection, path: Path, title: str, max_samples: int) -> None:
    path.write_text(render_page(ins, title, max_samples), encoding="utf-8")
