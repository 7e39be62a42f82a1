"""Trial checkpoints: written atomically through common.storage (local or s3://), loaded
with ``torch.load(weights_only=True)`` so a checkpoint file can never run code.

A trial keeps exactly two kinds of file (bounded disk per trial):
  checkpoints/latest.pt           everything needed to continue with the next epoch
  checkpoints/best-<task_key>.pt  the weights of the epoch with the best validation AUROC so far
"""
from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import torch

from common import storage

LATEST = "latest.pt"


def best_name(task_key: str) -> str:
    return f"best-{task_key}.pt"


def save(location: str, obj: dict[str, Any]) -> None:
    """torch.save to memory, then one atomic write (a reader sees the old or the new file)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    storage.write_bytes(location, buf.getvalue())


def load(location: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    data = storage.read_bytes(location)
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def rng_state() -> dict[str, Any]:
    """Every global RNG the training loop may touch, in weights_only-safe types."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]),
                   "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
