"""Cost of producing labels: magistune's one-pass encoder vs a plain mistral-common `encode_chat_completion`.

Both sides start from the same OpenAI-format records and end with token ids:
    plain:     ChatCompletionRequest.from_openai → MistralTokenizer.encode_chat_completion
    magistune: parse_record (validation + from_openai) → ConversationEncoder.encode (ids + labels)
Target: magistune ≤ 1.2× plain. Usage: python bench/encode_overhead.py [N] → bench/results/encode_overhead.{json,md}
"""

from __future__ import annotations

import datetime
import json
import platform
import random
import sys
import time
from pathlib import Path

import mistral_common
from mistral_common.protocol.instruct.request import ChatCompletionRequest

from magistune.data.encode import ConversationEncoder
from magistune.data.records import RecordOptions, parse_record
from magistune.data.synthetic import generate
from magistune.tokenizer import load_tokenizer, tiny_tokenizer_path


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(n: int = 2000) -> dict:
    tok = load_tokenizer(tiny_tokenizer_path())  # v13 Tekken: the Magistral 2507/2509 format
    enc = ConversationEncoder(tok)
    rng = random.Random(0)
    records = [generate(rng, tools_ok=True, think_ok=True) for _ in range(n)]
    plain_msgs = [([{k: v for k, v in m.items() if k != "weight"} for m in r["messages"]], r.get("tools")) for r in records]
    opts = RecordOptions()

    def plain():
        for msgs, tools in plain_msgs:
            tok.encode_chat_completion(ChatCompletionRequest.from_openai(msgs, tools=tools))

    def ours():
        for r in records:
            enc.encode(parse_record(r, opts))

    plain(), ours()  # warm-up
    t_plain, t_ours = best_of(plain), best_of(ours)
    tokens = sum(len(enc.encode(parse_record(r, opts))[0]) for r in records)
    result = {
        "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(), "mistral_common": mistral_common.__version__,
        "conversations": n, "tokens": tokens,
        "plain_s": round(t_plain, 4), "magistune_s": round(t_ours, 4), "ratio": round(t_ours / t_plain, 3),
        "magistune_tokens_per_s": round(tokens / t_ours),
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "encode_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "encode_overhead.md").write_text(
        f"# Label cost: magistune encoder vs plain encode_chat_completion\n\n"
        f"{result['date']}, CPU ({result['machine']}), Python {result['python']}, mistral-common {result['mistral_common']}, "
        f"v13 Tekken, {n} generated conversations ({tokens:,} tokens), best of 5.\n\n"
        f"| path | seconds | ratio |\n|---|---|---|\n"
        f"| from_openai + encode_chat_completion | {t_plain:.3f} | 1.00 |\n"
        f"| magistune parse_record + encode (ids + labels) | {t_ours:.3f} | {result['ratio']:.2f} |\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
