"""The process's random streams (torch, CUDA, numpy, Python) as checkpoint state that loads with
``torch.load(weights_only=True)``, so a resumed run draws what the uninterrupted one would have drawn."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Every stream's state as tensors and plain Python values (numpy's key array becomes an int64 tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned (the CUDA streams only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def seed_iteration(seed: int, iteration: int, rank: int) -> None:
    """Seed torch from (seed, iteration, rank), so an iteration draws the same numbers whatever ran before it."""
    torch.manual_seed(((seed * 1_000_003 + iteration) * 10_007 + rank) % 2**63)
