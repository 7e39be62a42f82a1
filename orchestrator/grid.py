"""The sweep grid: resolutions x models x seeds (x tasks in single task mode), and its trials.

The grid only enumerates. Each point becomes a ``trainer.config.TrainConfig`` (the base config
with the point's axes filled in), and that construction normalises and checks every value: the
``efficientnet`` alias becomes the variant matched to the resolution, resolutions and seeds are
range-checked. The trial id is ``TrainConfig.trial_id`` (the hash of every field that changes
the result plus the store's manifest hash, docs/architecture.md), so a trial has one id whichever
command makes it, re-running the same command finds the same ids, adding a resolution or seed
adds only new ids, and changing a hyperparameter gives new ids instead of mixing results.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Sequence

from common.cli import UserError
from common.schema import TASKS
from orchestrator.sweep_config import DEFAULT_MODELS, DEFAULT_SEEDS


@dataclass(frozen=True, order=True)
class TrialParams:
    """One grid point as the trial runs it (``model`` resolved: efficientnet-b3, not efficientnet)."""
    resolution: int
    model: str
    seed: int
    task_mode: str = "multi"
    task: str = ""            # the task in single mode, '' in multi

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, cfg) -> "TrialParams":
        """The grid point of a resolved TrainConfig."""
        return cls(resolution=cfg.resolution, model=cfg.model, seed=cfg.seed,
                   task_mode=cfg.task_mode, task=cfg.task)


@dataclass
class Trial:
    trial_id: str
    params: TrialParams
    config: object            # trainer.config.TrainConfig


def build_grid(resolutions: Sequence[int], models: Sequence[str] = DEFAULT_MODELS,
               seeds: Sequence[int] = DEFAULT_SEEDS, task_mode: str = "multi",
               tasks: Sequence[str] = TASKS) -> list[TrialParams]:
    """Every (resolution, model, seed[, task]) point, resolution-major, as given (aliases are
    resolved by TrainConfig in :func:`plan_trials`)."""
    task_axis: Iterable[str] = tasks if task_mode == "single" else ("",)
    points = [TrialParams(resolution=r, model=m, seed=s, task_mode=task_mode, task=t)
              for r in resolutions for m in models for s in seeds for t in task_axis]
    if not points:
        raise UserError("the grid is empty: give at least one resolution, model and seed"
                        + (" and task" if task_mode == "single" else ""))
    return list(dict.fromkeys(points))


def plan_trials(points: Sequence[TrialParams], base, manifest_hash: str) -> list[Trial]:
    """The trials of ``points`` on ``base`` (a TrainConfig), duplicates after normalisation removed
    (``efficientnet`` and ``efficientnet-b3`` at 320 px are one trial)."""
    from trainer.config import TrainConfig
    out: dict[str, Trial] = {}
    for p in points:
        cfg = TrainConfig.from_dict({"resolution": p.resolution, "model": p.model, "seed": p.seed,
                                     "task_mode": p.task_mode, "task": p.task}, base=base)
        tid = cfg.trial_id(manifest_hash)
        out.setdefault(tid, Trial(trial_id=tid, params=TrialParams.of(cfg), config=cfg))
    return list(out.values())
