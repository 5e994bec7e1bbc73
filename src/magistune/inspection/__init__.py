"""`magistune inspect`: the tokens a run trains on, in the terminal and as one self-contained HTML report.

    command.py   the command: checks the arguments, prints, writes the report
    collect.py   the config's data (the training cache when fresh; GRPO prompts encoded) → Inspection
    tokens.py    ids + labels → display tokens: text, control tokens by name, images folded, kind, trained
    terminal.py  samples as text: trained spans coloured, or between ⟦ ⟧ when stdout is not a terminal
    page.py      the HTML report (per-dataset figures, rejected records, a searchable sample list)
    svg.py       the report's plots, drawn as inline SVG
"""
