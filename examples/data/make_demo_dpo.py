"""Writes demo_dpo.jsonl: 64 preference pairs for the tiny DPO demo (examples/demo-tiny-dpo.yaml).

The rule to learn: the chosen answer answers in a full sentence (some with thinking), the rejected one dodges
("I don't know.", "Ask someone else.", ...). Half the records give the prompt explicitly, half implicitly (TRL's
two conversational forms). Run `python examples/data/make_demo_dpo.py` to regenerate; the output is deterministic.
"""

import json
import random
from pathlib import Path

rng = random.Random(0)
CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Peru": "Lima",
            "Kenya": "Nairobi", "Canada": "Ottawa", "Norway": "Oslo", "Egypt": "Cairo", "Chile": "Santiago"}
DODGES = ["I don't know.", "Ask someone else.", "No idea, sorry.", "Why do you want to know?"]


def question_and_answer(i: int) -> tuple[str, dict]:
    if i % 2 == 0:
        country = rng.choice(sorted(CAPITALS))
        return (f"What is the capital of {country}?",
                {"role": "assistant", "content": f"The capital of {country} is {CAPITALS[country]}."})
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return (f"What is {a} + {b}?", {"role": "assistant", "reasoning_content": f"I add {a} and {b}: {a + b}.",
                                    "content": f"{a} + {b} = {a + b}."})


def record(i: int) -> dict:
    question, chosen = question_and_answer(i)
    prompt = [{"role": "user", "content": question}]
    rejected = {"role": "assistant", "content": rng.choice(DODGES)}
    if i % 4 < 2:  # explicit prompt
        return {"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}
    return {"chosen": prompt + [chosen], "rejected": prompt + [rejected]}  # implicit: the shared first messages


if __name__ == "__main__":
    out = Path(__file__).with_name("demo_dpo.jsonl")
    out.write_text("".join(json.dumps(record(i)) + "\n" for i in range(64)), encoding="utf-8")
    print(f"wrote {out}")
