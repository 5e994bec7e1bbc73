"""Reward functions for examples/demo-tiny-grpo.yaml, in TRL's signature: fn(prompts, completions, **columns).

`reward_funcs: [rewards.lowercase_share]` in a config imports this file from the config's folder (it runs as
Python: only use reward files you trust, as with any training script).
"""


def lowercase_share(prompts, completions, **kwargs):
    """The share of the answer's characters that are ASCII lowercase letters (0 for an empty answer): a toy reward
    that a random-weight model can learn within minutes, by favouring the vocabulary's lowercase tokens."""
    out = []
    for completion in completions:
        text = completion[0]["content"]
        out.append(sum("a" <= ch <= "z" for ch in text) / len(text) if text else 0.0)
    return out
