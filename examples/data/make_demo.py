"""Writes demo.jsonl: small multi-turn, thinking and tool-call conversations for the tiny demo.

Run `python examples/data/make_demo.py` to regenerate; the output is deterministic.
"""

import json
import random
from pathlib import Path

rng = random.Random(0)
CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Peru": "Lima",
            "Kenya": "Nairobi", "Canada": "Ottawa", "Norway": "Oslo", "Egypt": "Cairo", "Chile": "Santiago"}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def capital_chat(country, city):
    return {"messages": [
        {"role": "user", "content": f"What is the capital of {country}?"},
        {"role": "assistant", "content": f"The capital of {country} is {city}."},
        {"role": "user", "content": "Thanks! Spell it in capitals."},
        {"role": "assistant", "content": city.upper()},
    ]}


def thinking_chat(a, b):
    return {"messages": [
        {"role": "system", "content": "You are a careful assistant. Think before answering."},
        {"role": "user", "content": f"What is {a} + {b}?"},
        {"role": "assistant", "reasoning_content": f"I add {a} and {b}: the sum is {a + b}.",
         "content": f"{a} + {b} = {a + b}."},
    ]}


def tool_chat(country, city, i):
    call_id = f"call{i:05d}"
    sky = rng.choice(["sunny", "cloudy", "rainy"])
    return {"tools": [WEATHER_TOOL], "messages": [
        {"role": "user", "content": f"How is the weather in {city}?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": f"I should call get_weather for {city}.", "closed": True}],
         "tool_calls": [{"id": call_id, "type": "function",
                         "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
        {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"city": city, "sky": sky})},
        {"role": "assistant", "content": f"It is {sky} in {city}."},
    ]}


records = []
for i, (country, city) in enumerate(CAPITALS.items()):
    records.append(capital_chat(country, city))
    records.append(tool_chat(country, city, i))
for _ in range(20):
    records.append(thinking_chat(rng.randint(1, 9), rng.randint(1, 9)))
rng.shuffle(records)
out = Path(__file__).with_name("demo.jsonl")
out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
print(f"wrote {len(records)} conversations to {out}")
