"""Reward functions: TRL's signature, the built-ins, and loading `module.fn` from the config's folder.

A reward function is called once per step on the step's completions (TRL's signature, so TRL reward functions
run unchanged):

    fn(prompts, completions, **columns) -> list[float | None]

    prompts       each completion's prompt: the record's messages, e.g. [{"role": "user", "content": "…"}]
    completions   [{"role": "assistant", "content": answer, "reasoning_content": thinking or None}] each
                  (the answer without its [THINK] block and </s>; the thinking apart, as chat shows it)
    columns       every other field of the records as a keyword list (answer=[…], one per completion), plus
                  TRL's completion_ids (the generated ids, </s> included when produced)

None means "does not apply" (TRL): it counts as 0 in the total. The total reward is Σ_k weight_k · r_k; a
built-in marked `gates_total` (magistral_format) sets the total to 0 when it scores 0, as in the paper.

Names in `reward_funcs`: a built-in (`magistral_format`, `boxed_math`, `overlong_penalty`), or `module.fn`:
`rewards.my_fn` imports `rewards.py` from the config's folder (else an installed module, e.g. a TRL one).
This runs the user's Python file by design, exactly as TRL does with its reward functions: only use reward
files you trust, like any training script.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from magistune.config import Config, ConfigError
from magistune.tokenizer import SpecialIds

RewardFn = Callable[..., list]


class RewardError(RuntimeError):
    """A reward function raised or returned something unusable: the message names it and the prompt."""


# --- built-ins -------------------------------------------------------------------------------------------

def magistral_format(special: SpecialIds) -> RewardFn:
    """0.1 when the completion holds exactly one closed `[THINK]…[/THINK]` block, first, followed by a non-empty
    answer, and stopped with `</s>`; else 0, which sets the total reward to 0 (Magistral paper, §2.2.1).
    Judged on the ids (the control tokens), never on text that merely spells them."""

    def fn(prompts, completions, completion_ids, **_) -> list[float]:
        out = []
        for ids, comp in zip(completion_ids, completions):
            ok = bool(ids) and ids[-1] == special.eos and special.has_think and ids[0] == special.begin_think
            if ok:
                body = ids[:-1]
                ok = body.count(special.begin_think) == 1 and body.count(special.end_think) == 1
                ok = ok and bool(comp[0]["content"].strip())
            out.append(0.1 if ok else 0.0)
        return out

    fn.__name__, fn.gates_total = "magistral_format", True  # type: ignore[attr-defined]
    return fn


_BOXED = re.compile(r"\\boxed\s*\{")


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{…}` (braces balanced), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, i = 1, starts[-1]
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def boxed_math() -> RewardFn:
    """0.9 when the answer's last `\\boxed{…}` is mathematically equal to the `answer` column (Hugging Face's
    math-verify: LaTeX and plain expressions parsed with sympy, 1/2 = 0.5 = \\frac{1}{2}); else 0."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ConfigError("trl.reward_funcs: boxed_math needs the math-verify package (pip install math-verify, or "
                          "pip install magistune[rl])") from None

    def fn(prompts, completions, answer, **_) -> list[float]:
        out = []
        for comp, gold in zip(completions, answer):
            boxed = last_boxed(comp[0]["content"])
            if boxed is None or gold is None:
                out.append(0.0)
                continue
            got, want = parse(f"${boxed}$"), parse(f"${gold}$")
            out.append(0.9 if got and want and verify(want, got) else 0.0)
        return out

    fn.__name__ = "boxed_math"
    return fn


def overlong_penalty(max_completion_length: int, cache: int) -> RewardFn:
    """DAPO's soft overlong punishment on the completion's token count |y| (L_max = max_completion_length):
    0 while |y| ≤ L_max − L_cache, then falling linearly to −1 at L_max: (L_max − L_cache − |y|) / L_cache."""

    def fn(prompts, completions, completion_ids, **_) -> list[float]:
        free = max_completion_length - cache
        return [0.0 if len(ids) <= free else max((free - len(ids)) / cache, -1.0) for ids in completion_ids]

    fn.__name__ = "overlong_penalty"
    return fn


BUILTINS = ("magistral_format", "boxed_math", "overlong_penalty")


# --- loading ---------------------------------------------------------------------------------------------

def _import(name: str, config_dir: Path):
    module_name, _, attr = name.rpartition(".")
    path = config_dir / (module_name.replace(".", "/") + ".py")
    try:
        if path.is_file():  # the config's own rewards.py: runs the user's code, by design (module docstring)
            spec = importlib.util.spec_from_file_location(f"magistune_rewards_{module_name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"trl.reward_funcs: {name}: no {path} and no installed module {module_name} ({e})") from None
    except Exception as e:
        raise ConfigError(f"trl.reward_funcs: {name}: importing {path if path.is_file() else module_name} failed: "
                          f"{type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"trl.reward_funcs: {name}: {module_name} has no function {attr!r}")
    return fn


def load_reward_funcs(cfg: Config, special: SpecialIds) -> list[tuple[str, RewardFn]]:
    """(name, function) for every entry of trl.reward_funcs. Raises ConfigError naming the entry."""
    trl = cfg.trl
    out = []
    for name in trl.reward_funcs:
        if name == "magistral_format":
            if not special.has_think:
                raise ConfigError("trl.reward_funcs: magistral_format needs a tokenizer with [THINK] (v13)")
            fn = magistral_format(special)
        elif name == "boxed_math":
            fn = boxed_math()
        elif name == "overlong_penalty":
            cache = trl.overlong_cache or max(1, trl.max_completion_length // 5)
            if cache > trl.max_completion_length:
                raise ConfigError(f"trl.overlong_cache: {cache} > max_completion_length {trl.max_completion_length}")
            fn = overlong_penalty(trl.max_completion_length, cache)
        elif "." in name:
            fn = _import(name, cfg.config_dir)
        else:
            raise ConfigError(f"trl.reward_funcs: {name}: not a built-in ({', '.join(BUILTINS)}) nor module.function")
        out.append((name, fn))
    return out


# --- scoring ---------------------------------------------------------------------------------------------

@dataclass
class Scores:
    total: list[float]  # one per completion
    per_func: dict[str, list[float]]  # each function's values (NaN where it returned None)


def _accepts(fn: RewardFn, key: str) -> bool:
    params = inspect.signature(fn).parameters
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _call(name: str, fn: RewardFn, args: dict, sources: list[str]) -> list[float]:
    n = len(args["completions"])
    try:
        values = fn(**{k: v for k, v in args.items() if k in ("prompts", "completions") or _accepts(fn, k)})
    except Exception as e:
        raise RewardError(f"reward function {name} raised {type(e).__name__}: {e} (on the prompt of "
                          f"{sources[0]})") from e
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise RewardError(f"reward function {name} returned {got} for {n} completions (prompts {sources[0]} …); "
                          "it must return one float (or None) per completion")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
        elif hasattr(v, "__float__"):  # int, float, numpy and 0-d torch values
            out.append(float(v))
        else:
            raise RewardError(f"reward function {name} returned {v!r} for a completion of the prompt of {sources[i]}")
    return out


def score(funcs: list[tuple[str, RewardFn]], weights: list[float] | None, prompts: list, completions: list,
          columns: dict[str, list], completion_ids: list[list[int]], sources: list[str],
          group_size: int) -> Scores:
    """Every reward function on the batch; a failing function is re-run prompt by prompt to name the culprit."""
    args = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns}
    per_func: dict[str, list[float]] = {}
    for name, fn in funcs:
        try:
            per_func[name] = _call(name, fn, args, sources)
        except RewardError:
            for start in range(0, len(completions), group_size):  # which prompt? one group at a time
                part = {k: v[start:start + group_size] for k, v in args.items()}
                _call(name, fn, part, sources[start:start + group_size])
            raise
    weights = weights or [1.0] * len(funcs)
    total = []
    for i in range(len(completions)):
        t = sum(w * per_func[name][i] for (name, _), w in zip(funcs, weights) if not math.isnan(per_func[name][i]))
        gated = any(getattr(fn, "gates_total", False) and per_func[name][i] == 0 for name, fn in funcs)
        total.append(0.0 if gated else t)
    return Scores(total, per_func)

