"""The sweep grid: resolutions x models x seeds (x tasks in single task mode), and stable trial ids.

A grid point (:class:`TrialParams`) says only what varies between trials; everything else comes
from one base :class:`trainer.config.TrainConfig`. The trial id hashes every TrainConfig field that
changes the result plus the store's manifest hash (``TrainConfig.trial_id``, docs/architecture.md
section 3), so re-running the same command finds the same ids, adding a resolution or seed adds
only new ids, and changing a hyperparameter gives new ids instead of mixing results.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Sequence

from common.cli import UserError
from common.schema import TASKS
from trainer.config import TrainConfig
from trainer.models import resolve_model_name

#: The thesis grid (PROTOCOL.md): 'efficientnet' is matched to each resolution (B0 at 160 ... B5 at 480).
DEFAULT_MODELS = ("resnet50", "resnet152", "densenet121", "densenet161", "efficientnet")
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
TASK_MODES = ("multi", "single")


@dataclass(frozen=True, order=True)
class TrialParams:
    """One grid point. ``model`` is the resolved registry name (efficientnet-b3, not efficientnet)."""
    resolution: int
    model: str
    seed: int
    task_mode: str = "multi"
    task: str = ""            # the task in single mode, '' in multi

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_grid(resolutions: Sequence[int], models: Sequence[str] = DEFAULT_MODELS,
               seeds: Sequence[int] = DEFAULT_SEEDS, task_mode: str = "multi",
               tasks: Sequence[str] = TASKS) -> list[TrialParams]:
    """Every (resolution, model, seed[, task]) point, resolution-major, duplicates removed.

    Bad values raise a UserError naming them (the caller prints one line).
    """
    if task_mode not in TASK_MODES:
        raise UserError(f"--task-mode: {task_mode!r} is not one of {', '.join(TASK_MODES)}")
    for r in resolutions:
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise UserError(f"--resolutions: {r!r} is not a positive integer")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise UserError(f"--seeds: {s!r} is not a non-negative integer")
    for t in tasks:
        if t not in TASKS:
            raise UserError(f"--tasks: {t!r} is not one of {', '.join(TASKS)}")
    points: list[TrialParams] = []
    seen: set[TrialParams] = set()
    task_axis: Iterable[str] = tasks if task_mode == "single" else ("",)
    for r in resolutions:
        for m in models:
            name = resolve_model_name(m, r)   # UnknownModelError (a UserError) for a typo
            for s in seeds:
                for t in task_axis:
                    p = TrialParams(resolution=int(r), model=name, seed=int(s), task_mode=task_mode,
                                    task=t)
                    if p not in seen:
                        seen.add(p)
                        points.append(p)
    if not points:
        raise UserError("the grid is empty: give at least one resolution, model and seed"
                        + (" and task" if task_mode == "single" else ""))
    return points


def trial_config(params: TrialParams, base: TrainConfig) -> TrainConfig:
    """The full TrainConfig of one grid point: ``base`` with the grid axes filled in.

    In multi mode the model's outputs are ``base.tasks``; in single mode the one task.
    """
    return TrainConfig.from_dict({"resolution": params.resolution, "model": params.model,
                                  "seed": params.seed, "task_mode": params.task_mode,
                                  "task": params.task}, base=base)


def trial_id(params: TrialParams, train_cfg: TrainConfig, manifest_hash: str) -> str:
    """``r{res}-{model}-s{seed}-{mode}[-{task_key}]-{hash10}`` for ``params`` on ``train_cfg``."""
    return trial_config(params, train_cfg).trial_id(manifest_hash)


def parse_seeds(text: str) -> list[int]:
    """'0-4' -> [0..4]; '0,1,2' -> [0, 1, 2]; '0-2,7' -> [0, 1, 2, 7]."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            if sep:
                a, b = int(lo), int(hi)
                if b < a:
                    raise UserError(f"--seeds: range {part!r} is empty")
                seeds.extend(range(a, b + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise UserError(f"--seeds: {part!r} is not an integer or a range like 0-4") from None
    if not seeds:
        raise UserError("--seeds: no seeds given")
    for s in seeds:
        if s < 0:
            raise UserError(f"--seeds: {s} is negative")
    return list(dict.fromkeys(seeds))


def parse_names(text: str, flag: str) -> list[str]:
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if not names:
        raise UserError(f"{flag}: no values given")
    return list(dict.fromkeys(names))
