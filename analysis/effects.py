"""A configuration's mean AUROC over seeds and the difference of two configurations, each with a
DeLong 95% interval, and the report's answer per task (best configuration and its effect over the
lowest resolution).

Every run of a sweep is scored on the same validation studies, so the AUROCs of several runs are
correlated. DeLong's covariance of k AUROCs on the same cases (``delong.delong_covariance``) gives
the variance of any linear contrast ``c'AUC`` as ``c' S c``: the mean of one configuration's seeds
(``c = 1/k``) and the difference of two such means (``+1/k_a, -1/k_b``) are both contrasts, so one
method serves the points and error bars of the figures and the effect sizes of the answer. With one
seed per configuration it is the per-run DeLong interval and the paired DeLong test.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from analysis import delong

Z95 = delong.Z95


@dataclass(frozen=True)
class Estimate:
    """A contrast of AUROCs on the studies every run involved scored."""
    value: float
    low: float
    high: float
    p_value: float       # two-sided, against 0 (meaningful for differences only)
    runs: int
    studies: int


NO_ESTIMATE = Estimate(math.nan, math.nan, math.nan, math.nan, 0, 0)


def usable(trials: pd.DataFrame) -> pd.DataFrame:
    """Rows with a best AUROC (a trial whose task never got both classes has none)."""
    return trials[trials["best_auroc"].notna()] if not trials.empty else trials


def _aligned(predictions: dict, runs: Sequence[tuple[str, str]]
             ) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels (n,), scores (k, n)) on the studies all runs scored with the same label."""
    frames = [predictions.get(r) for r in runs]
    if not frames or any(f is None or f.empty for f in frames):
        return None
    common = set(frames[0]["study_id"])
    for f in frames[1:]:
        common &= set(f["study_id"])
    ids = sorted(common)
    if not ids:
        return None
    labels = np.stack([f.set_index("study_id").loc[ids, "label"].to_numpy(float) for f in frames])
    scores = np.stack([f.set_index("study_id").loc[ids, "probability"].to_numpy(float)
                       for f in frames])
    same = (labels == labels[0]).all(axis=0)   # a study must carry one label in every run
    return labels[0][same], scores[:, same]


def contrast(predictions: dict, runs: Sequence[tuple[str, str]], weights: Sequence[float]
             ) -> Estimate:
    """``sum(w_i * AUROC_i)`` with its DeLong 95% interval and two-sided p against 0.

    ``runs`` are (trial_id, task_key) keys of ``predictions`` (study_id, label, probability)."""
    aligned = _aligned(predictions, runs)
    if aligned is None:
        return NO_ESTIMATE
    labels, scores = aligned
    try:
        aucs, cov = delong.delong_covariance(labels, *scores)
    except (delong.AUROCUndefined, ValueError):
        return NO_ESTIMATE
    w = np.asarray(weights, dtype=float)
    value = float(w @ aucs)
    se = math.sqrt(max(float(w @ cov @ w), 0.0))
    if se > 0:
        p = float(2.0 * stats.norm.sf(abs(value) / se))
    else:   # identical rankings: no evidence unless the contrast itself is not zero
        p = 1.0 if value == 0 else 0.0
    return Estimate(value, value - Z95 * se, value + Z95 * se, p, len(runs), len(labels))


def mean_of_runs(predictions: dict, runs: Sequence[tuple[str, str]]) -> Estimate:
    """The mean AUROC of runs (one configuration's seeds) with its DeLong interval in [0, 1]."""
    e = contrast(predictions, runs, [1.0 / len(runs)] * len(runs)) if runs else NO_ESTIMATE
    if math.isnan(e.value):
        return e
    return Estimate(e.value, max(0.0, e.low), min(1.0, e.high), math.nan, e.runs, e.studies)


def difference(predictions: dict, runs_a: Sequence[tuple[str, str]],
               runs_b: Sequence[tuple[str, str]]) -> Estimate:
    """mean AUROC(a) - mean AUROC(b), correlated through the shared studies."""
    if not runs_a or not runs_b:
        return NO_ESTIMATE
    w = [1.0 / len(runs_a)] * len(runs_a) + [-1.0 / len(runs_b)] * len(runs_b)
    return contrast(predictions, list(runs_a) + list(runs_b), w)


# --- configurations --------------------------------------------------------------------------------
CONFIG_COLUMNS = ["task_mode", "task", "task_key", "model", "resolution", "runs", "mean", "ci_low",
                  "ci_high", "studies"]


def configurations(trials: pd.DataFrame, predictions: dict) -> pd.DataFrame:
    """One row per (task mode, task, model, resolution): the mean best-epoch AUROC over its seeds
    and the DeLong interval of that mean (NaN bounds when predictions are missing)."""
    t = usable(trials)
    rows = []
    for (mode, key, model, res), g in t.groupby(["task_mode", "task_key", "model", "resolution"],
                                                sort=False):
        runs = [(tid, key) for tid in g["trial_id"]]
        e = mean_of_runs(predictions, runs)
        rows.append({"task_mode": mode, "task": g["task"].iloc[0], "task_key": key, "model": model,
                     "resolution": int(res), "runs": len(runs),
                     "mean": float(g["best_auroc"].mean()), "ci_low": e.low, "ci_high": e.high,
                     "studies": e.studies})
    return pd.DataFrame(rows, columns=CONFIG_COLUMNS)


def _runs(trials: pd.DataFrame, mode: str, key: str, model: str, res: int) -> list[tuple[str, str]]:
    t = usable(trials)
    sel = t[(t["task_mode"] == mode) & (t["task_key"] == key) & (t["model"] == model)
            & (t["resolution"] == res)]
    return [(tid, key) for tid in sel["trial_id"]]


ANSWER_COLUMNS = ["task_mode", "task", "best_model", "best_resolution", "runs", "best_mean",
                  "best_ci_low", "best_ci_high", "lowest_resolution", "baseline_model",
                  "baseline_mean", "delta", "delta_ci_low", "delta_ci_high", "p_value", "studies"]


def answer(trials: pd.DataFrame, predictions: dict, same_model) -> pd.DataFrame:
    """Per task: the configuration with the highest mean AUROC over seeds, and its effect over the
    lowest resolution of the sweep. The baseline is the same model at the lowest resolution
    (``same_model(a, b)``: EfficientNet's compound-scaled variants count as one model), so the
    effect is the resolution's; when that model did not run there, the best model there.
    The best is chosen on the validation set it is tested on: the p-value is exploratory."""
    conf = configurations(trials, predictions)
    rows = []
    for (mode, key), g in conf.groupby(["task_mode", "task_key"], sort=False):
        g = g.sort_values(["resolution", "model"])
        best = g.loc[g["mean"].idxmax()]
        lowest = int(g["resolution"].min())
        at_low = g[g["resolution"] == lowest]
        same = at_low[[same_model(m, best["model"]) for m in at_low["model"]]]
        base = (same if not same.empty else at_low).sort_values("mean").iloc[-1]
        row = {"task_mode": mode, "task": best["task"], "best_model": best["model"],
               "best_resolution": int(best["resolution"]), "runs": int(best["runs"]),
               "best_mean": best["mean"], "best_ci_low": best["ci_low"],
               "best_ci_high": best["ci_high"], "lowest_resolution": lowest,
               "baseline_model": base["model"], "baseline_mean": base["mean"],
               "delta": math.nan, "delta_ci_low": math.nan, "delta_ci_high": math.nan,
               "p_value": math.nan, "studies": 0}
        if int(best["resolution"]) != lowest:
            d = difference(predictions, _runs(trials, mode, key, best["model"], int(best["resolution"])),
                           _runs(trials, mode, key, base["model"], lowest))
            # The interval is centred on the contrast over the shared studies; without
            # predictions the difference of the means is still worth showing.
            delta = d.value if not math.isnan(d.value) else best["mean"] - base["mean"]
            row.update(delta=delta, delta_ci_low=d.low, delta_ci_high=d.high,
                       p_value=d.p_value, studies=d.studies)
        rows.append(row)
    return pd.DataFrame(rows, columns=ANSWER_COLUMNS)
