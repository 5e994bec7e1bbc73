"""The random generators a training step draws from (python, numpy, torch CPU and CUDA: LoRA dropout, shuffles),
captured at a step boundary and stored as plain JSON values: integers, and the torch generators' byte states in
base64. Never pickled: a checkpoint's files must not be able to run code when loaded.
"""

from __future__ import annotations

import base64
import random

import numpy as np
import torch


def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)


def rng_to_json(state: dict) -> dict:
    """capture_rng()'s state as plain JSON values."""
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    out = {"python": [version, list(internal), gauss],
           "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
           "torch": _b64(state["torch"])}
    if "cuda" in state:
        out["cuda"] = [_b64(t) for t in state["cuda"]]
    return out


def rng_from_json(data: dict) -> dict:
    """rng_to_json's output back as capture_rng()'s state; a malformed one raises ValueError/TypeError/KeyError."""
    version, internal, gauss = data["python"]
    name, keys, pos, has_gauss, cached = data["numpy"]
    state = {"python": (int(version), tuple(int(i) for i in internal), None if gauss is None else float(gauss)),
             "numpy": (str(name), np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)),
             "torch": _bytes_tensor(data["torch"])}
    if "cuda" in data:
        state["cuda"] = [_bytes_tensor(t) for t in data["cuda"]]
    return state
