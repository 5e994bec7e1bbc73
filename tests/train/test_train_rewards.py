"""Reward functions: the built-ins' rules, loading `module.fn` from the config's folder, and failures that name the
function and the prompt's file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from magistune.config import ConfigError, parse_config
from magistune.model_files.tiny import tiny_special_ids
from magistune.train.rewards import (
    RewardError, boxed_math, last_boxed, load_reward_funcs, magistral_format, overlong_penalty, score,
)


def _msg(answer: str) -> list[dict]:
    return [{"role": "assistant", "content": answer}]


def test_magistral_format_needs_one_closed_think_block_then_an_answer():
    s = tiny_special_ids()
    fn = magistral_format(s)
    B, E, EOS = s.begin_think, s.end_think, s.eos
    cases = [([B, 100, E, 200, EOS], "x", 0.1),
             ([B, 100, E, 200, EOS], "  ", 0.0),  # empty answer
             ([B, 100, E, 200], "x", 0.0),  # no </s>: truncated
             ([B, 100, 200, EOS], "x", 0.0),  # never closed
             ([200, B, 100, E, EOS], "x", 0.0),  # answer before the thinking
             ([B, 100, E, B, 101, E, 200, EOS], "x", 0.0)]  # two blocks
    got = fn([None] * len(cases), [_msg(a) for _, a, _ in cases], completion_ids=[c for c, _, _ in cases])
    assert got == [w for _, _, w in cases]


def test_a_failed_format_zeroes_the_total():
    s = tiny_special_ids()
    funcs = [("magistral_format", magistral_format(s)), ("one", lambda prompts, completions, **_: [1.0, 1.0])]
    ids = [[s.begin_think, 5, s.end_think, 6, s.eos], [6, s.eos]]
    got = score(funcs, None, [[], []], [_msg("a"), _msg("a")], {}, ids, ["f:1", "f:1"], 2)
    assert got.total == pytest.approx([1.1, 0.0])


def test_boxed_math_compares_mathematically():
    assert last_boxed(r"so \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    fn = boxed_math()
    got = fn([None] * 4, [_msg(r"\boxed{\frac{1}{2}}"), _msg(r"\boxed{0.5}"), _msg("0.5"), _msg(r"\boxed{3}")],
             answer=["0.5", r"\frac12", "0.5", "4"])
    assert got == [0.9, 0.9, 0.0, 0.0]


def test_overlong_penalty_is_dapos_formula():
    fn = overlong_penalty(100, 20)
    lengths = [10, 80, 81, 90, 100]
    got = fn(None, None, completion_ids=[[0] * n for n in lengths])
    assert got == pytest.approx([0, 0, (80 - 81) / 20, (80 - 90) / 20, -1.0])


def _cfg(tmp_path: Path, funcs: list[str]):
    cfg, _ = parse_config({"base_model": "tiny-random", "datasets": [{"path": "d.jsonl"}], "rl": "grpo",
                           "trl": {"reward_funcs": funcs}}, config_dir=tmp_path)
    return cfg


def test_user_functions_load_from_the_config_folder_with_trl_columns(tmp_path):
    (tmp_path / "rewards.py").write_text(
        "def exact(prompts, completions, answer, **kw):\n"
        "    return [float(c[0]['content'] == a) for c, a in zip(completions, answer)]\n", encoding="utf-8")
    funcs = load_reward_funcs(_cfg(tmp_path, ["rewards.exact", "overlong_penalty"]), tiny_special_ids())
    got = score(funcs, [2.0, 1.0], [[]] * 2, [_msg("4"), _msg("5")], {"answer": ["4", "4"]}, [[1], [1]],
                ["d.jsonl:1"] * 2, 2)
    assert got.total == [2.0, 0.0] and got.per_func["rewards.exact"] == [1.0, 0.0]


def test_bad_names_are_config_errors(tmp_path):
    for name, msg in (("nope", "not a built-in"), ("rewards.missing", "no "), ("magistune.config.nothing", "no function")):
        with pytest.raises(ConfigError, match=msg):
            load_reward_funcs(_cfg(tmp_path, [name]), tiny_special_ids())


def test_a_raising_function_names_itself_and_the_prompt():
    def picky(prompts, completions, answer, **_):
        if "boom" in answer:
            raise ValueError("cannot parse")
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"picky raised ValueError: cannot parse \(on the prompt of data.jsonl:7\)"):
        score([("picky", picky)], None, [[]] * 4, [_msg("a")] * 4, {"answer": ["ok", "ok", "boom", "boom"]},
              [[1]] * 4, ["data.jsonl:3", "data.jsonl:3", "data.jsonl:7", "data.jsonl:7"], 2)
    with pytest.raises(RewardError, match=r"short returned 1 values for 2 completions \(prompts data.jsonl:3"):
        score([("short", lambda prompts, completions, **_: [1.0])], None, [[]] * 2, [_msg("a")] * 2, {}, [[1]] * 2,
              ["data.jsonl:3"] * 2, 2)
