"""Trial checkpoints: written atomically through common.storage (local or s3://), loaded
with ``torch.load(weights_only=True)`` so a checkpoint file can never run code.

A trial keeps three kinds of file (bounded disk per trial; names in common.trial_folder):
  checkpoints/latest.pt           everything needed to continue with the next epoch
  checkpoints/previous.pt         the latest.pt before it, kept until the next one is complete
  checkpoints/best-<task_key>.pt  the weights of the epoch with the best validation AUROC so far

Saving ``latest.pt`` first moves the old one to ``previous.pt``, then writes the new one whole.
A damaged ``latest.pt`` (a torn copy, a bad disk block, a file that is not a weights-only torch
file) is therefore never the only copy: :func:`load_latest` warns naming it and falls back to
``previous.pt``, and with neither usable the trial starts over instead of failing forever.
"""
from __future__ import annotations

import io
import random
import sys
from typing import Any, Callable

import numpy as np
import torch

from common import storage
from common.trial_folder import LATEST, PREVIOUS, TrialFolder


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded safely (truncated, not weights-only, not a dict)."""


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def best_name(task_key: str) -> str:
    return f"best-{task_key}.pt"


def _previous_of(location: str) -> str:
    """.../checkpoints/latest.pt[?query] -> .../checkpoints/previous.pt[?query]."""
    base, sep, query = location.partition("?") if storage.is_remote(location) else (location, "", "")
    return base[:-len(LATEST)] + PREVIOUS + sep + query


def _move(src: str, dst: str) -> None:
    """Rename within one filesystem (atomic locally; copy + delete on S3)."""
    fs, src_path = storage.resolve(src)
    fs.move(src_path, storage.resolve(dst)[1])


def save(location: str, obj: dict[str, Any]) -> None:
    """torch.save to memory, then one atomic write (a reader sees the old or the new file).

    Saving ``latest.pt`` keeps the one it replaces as ``previous.pt`` until the new one is whole.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    if storage.display(location).endswith(LATEST) and storage.exists(location):
        _move(location, _previous_of(location))
    storage.write_bytes(location, data)


def load(location: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict; FileNotFoundError when absent, CheckpointError naming the file when it
    cannot be loaded weights-only (truncated, damaged, or a pickle that would run code)."""
    data = storage.read_bytes(location)
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {storage.display(location)} cannot be loaded "
                              f"(torch.load weights_only=True): {first[:300]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {storage.display(location)} holds a "
                              f"{type(obj).__name__}, not a checkpoint dict")
    return obj


def load_latest(trial_dir: str, map_location: str | torch.device = "cpu",
                warn: Callable[[str], None] = _warn) -> dict[str, Any] | None:
    """The newest usable checkpoint of a trial folder: latest.pt, else previous.pt (warning that
    names the damaged file), else None (the trial starts over, with a warning when a damaged
    file was skipped). Both are read weights-only: a planted pickle is refused, never run."""
    folder = TrialFolder(trial_dir)
    problems = []
    for loc in (folder.latest_checkpoint, folder.previous_checkpoint):
        try:
            obj = load(loc, map_location)
        except FileNotFoundError:
            continue
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if problems:
            warn(f"{problems[0]}; continuing from {storage.display(loc)} (epoch {obj.get('epoch')})")
        return obj
    if problems:
        warn(f"{'; '.join(problems)}; no usable checkpoint left: the trial starts over from epoch 1")
    return None


def resume_epoch(trial_dir: str) -> int:
    """The epoch the trial would continue after (0: starts fresh), read from its checkpoints."""
    obj = load_latest(trial_dir, warn=lambda message: None)
    return int(obj.get("epoch", 0)) if obj else 0


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
