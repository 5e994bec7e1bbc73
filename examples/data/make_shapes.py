"""Draws the shapes demo for vision fine-tuning: small PNGs of coloured shapes and shapes.jsonl conversations.

Run `python examples/data/make_shapes.py` to regenerate; the output is deterministic. The images are drawn
here, not downloaded. 84×84 pixels at patch 14 with spatial merge 2 → 3×3 image tokens + 3 row ends.
"""

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

rng = random.Random(0)
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
here = Path(__file__).parent
(here / "shapes").mkdir(exist_ok=True)


def draw(shape: str, colour: str, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(img)
    m = size // 6
    box = [m, m, size - m, size - m]
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=fill)
    return img


records = []
for shape in SHAPES:
    for colour in COLOURS:
        name = f"shapes/{colour}-{shape}.png"
        draw(shape, colour, 84).save(here / name)
        records.append({"messages": [
            {"role": "user", "content": [{"type": "image", "path": name}, {"type": "text", "text": "What is in this picture?"}]},
            {"role": "assistant", "content": f"A {colour} {shape}."}]})
# Two images in one turn, and images in two turns.
for _ in range(6):
    (c1, s1), (c2, s2) = [(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(2)]
    records.append({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Name both shapes."},
                                     {"type": "image", "path": f"shapes/{c1}-{s1}.png"},
                                     {"type": "image_url", "image_url": {"url": f"shapes/{c2}-{s2}.png"}}]},
        {"role": "assistant", "content": f"First a {c1} {s1}, then a {c2} {s2}."},
        {"role": "user", "content": [{"type": "image", "path": f"shapes/{c2}-{s1}.png"}, {"type": "text", "text": "And this?"}]},
        {"role": "assistant", "content": f"A {c2} {s1}."}]})
rng.shuffle(records)
(here / "shapes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
print(f"wrote {len(records)} conversations and {len(SHAPES) * len(COLOURS)} images")
