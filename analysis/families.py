"""Model families and sizes, and the model-scaling deltas of every pair of sizes a sweep holds.

A model's family and its size order come from the model registry's metadata when it has any
(``trainer.models.model_info``), else from the name: ``resnet152`` is ResNet size 152,
``densenet121`` DenseNet 121, ``efficientnet-b3`` EfficientNet B3. A name that is neither (for
example ``smallcnn``) is a family of one and has no pairs.
"""
from __future__ import annotations

import functools
import itertools
import re

import pandas as pd

from analysis.effects import usable

_NAME = re.compile(r"^(?P<family>[a-z]+?)[-_]?(?P<size>b?\d+)$")


@functools.lru_cache(maxsize=None)
def _registry_info(name: str):
    try:
        from trainer.models import model_info
    except ImportError:
        return None
    try:
        return model_info(name)
    except Exception:   # a name the registry does not know (an old sweep's model): parse it
        return None


@functools.lru_cache(maxsize=None)
def family_and_size(name: str) -> tuple[str, float | None]:
    """('resnet', 152.0), ('efficientnet', 3.0), ('smallcnn', None)."""
    info = _registry_info(str(name))
    family = getattr(info, "family", None) if info is not None else None
    size = None
    for attr in ("size_order", "size", "order"):
        value = getattr(info, attr, None) if info is not None else None
        if isinstance(value, (int, float)):
            size = float(value)
            break
    m = _NAME.match(str(name).lower())
    if m:
        family = family or m.group("family")
        if size is None:
            size = float(m.group("size").lstrip("b"))
    return (str(family or name), size)


def family(name: str) -> str:
    return family_and_size(name)[0]


def is_compound_scaled(name: str) -> bool:
    """EfficientNet's variants are matched to the resolution (B0 at 160 ... B5 at 480)."""
    info = _registry_info(str(name))
    if isinstance(getattr(info, "compound_scaled", None), bool):
        return info.compound_scaled
    return family(name) == "efficientnet"


def same_model(a: str, b: str) -> bool:
    """'The same model at another resolution': itself, or any variant of a compound-scaled family."""
    return a == b or (is_compound_scaled(a) and is_compound_scaled(b))


SCALING_COLUMNS = ["task_mode", "task", "resolution", "family", "larger", "smaller", "delta_max",
                   "delta_mean", "runs_larger", "runs_smaller", "best_model", "best_mean"]


def scaling_pairs(trials: pd.DataFrame) -> pd.DataFrame:
    """Per task and resolution, every pair of sizes of one family that both ran there:
    delta(max) and delta(mean) of the best-epoch AUROC, larger minus smaller, and the best model
    (highest mean) at that task and resolution."""
    t = usable(trials)
    if t.empty:
        return pd.DataFrame(columns=SCALING_COLUMNS)
    stats = (t.groupby(["task_mode", "task_key", "resolution", "model"], sort=False)["best_auroc"]
             .agg(runs="count", mean="mean", max="max").reset_index())
    names = dict(zip(t["task_key"], t["task"]))
    rows = []
    for (mode, key, res), g in stats.groupby(["task_mode", "task_key", "resolution"], sort=False):
        best = g.loc[g["mean"].idxmax()]
        sized = [(family_and_size(m), m) for m in g["model"]]
        by_family: dict[str, list[tuple[float, str]]] = {}
        for (fam, size), m in sized:
            if size is not None:
                by_family.setdefault(fam, []).append((size, m))
        s = g.set_index("model")
        for fam in sorted(by_family):
            for (_, small), (_, large) in itertools.combinations(sorted(by_family[fam]), 2):
                rows.append({"task_mode": mode, "task": names[key], "resolution": int(res),
                             "family": fam, "larger": large, "smaller": small,
                             "delta_max": s.at[large, "max"] - s.at[small, "max"],
                             "delta_mean": s.at[large, "mean"] - s.at[small, "mean"],
                             "runs_larger": int(s.at[large, "runs"]),
                             "runs_smaller": int(s.at[small, "runs"]),
                             "best_model": best["model"], "best_mean": best["mean"]})
    return pd.DataFrame(rows, columns=SCALING_COLUMNS)


def compound_scaling(trials: pd.DataFrame) -> pd.DataFrame:
    """The compound-scaled family per task and resolution: its variant there, runs, mean, std, max."""
    cols = ["task_mode", "task", "resolution", "model", "runs", "mean", "std", "max"]
    t = usable(trials)
    if t.empty:
        return pd.DataFrame(columns=cols)
    t = t[t["model"].map(is_compound_scaled)]
    if t.empty:
        return pd.DataFrame(columns=cols)
    out = (t.groupby(["task_mode", "task_key", "task", "resolution", "model"], sort=False)["best_auroc"]
           .agg(runs="count", mean="mean", std="std", max="max").reset_index())
    return out.sort_values(["task_mode", "task_key", "resolution"])[cols].reset_index(drop=True)
