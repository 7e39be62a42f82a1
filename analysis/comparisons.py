"""Comparisons between grid points of one configuration: paired DeLong tests between resolutions
and between best configurations (Holm-corrected per family). The model-scaling deltas of every
pair of sizes of one family are analysis.families.scaling_pairs.

Two runs are compared only when their configurations are identical (analysis.configuration):
:func:`paired_delong` refuses anything else, so a table can never hold a test of one hyperparameter
set against another. A pair whose test is undefined (a single case in a class, zero variance) stays
in the table with NaN and the reason in ``note``; Holm's correction leaves it out of the family.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import pandas as pd

from analysis import delong
from analysis.records import SweepData, task_order, usable
from analysis.tables import model_group, summary_by_model
from common.schema import task_key

ALPHA = 0.05
TEST_COLUMNS = ["comparison", "task_mode", "task", "model_a", "resolution_a", "model_b",
                "resolution_b", "seed", "auroc_a", "auroc_b", "difference", "se", "z", "p_value",
                "p_holm", "significant", "studies", "note", "trial_a", "trial_b"]


class MixedConfigurations(ValueError):
    """Two runs of different configurations were about to be compared."""


def paired_delong(data: SweepData, task_key: str, a: Mapping, b: Mapping) -> dict:
    """DeLong's paired test of run ``a`` against run ``b`` (rows of ``data.trials``) for one task,
    on the validation studies both scored with the same label. NaN and a ``note`` when there is no
    test; MixedConfigurations when the two runs are not of one configuration."""
    if not a["configuration"] or a["configuration"] != b["configuration"]:
        raise MixedConfigurations(f"{a['trial_id']} (configuration {a['configuration'] or 'unknown'}) "
                                  f"and {b['trial_id']} (configuration {b['configuration'] or 'unknown'}) "
                                  "are not one configuration: not compared")
    none = {"auroc_a": math.nan, "auroc_b": math.nan, "difference": math.nan, "se": math.nan,
            "z": math.nan, "p_value": math.nan, "studies": 0}
    pa_ = data.predictions.get((a["trial_id"], task_key))
    pb_ = data.predictions.get((b["trial_id"], task_key))
    if pa_ is None or pb_ is None:
        return {**none, "note": "predictions missing: no test"}
    ida, idb = pa_["study_id"].to_numpy(), pb_["study_id"].to_numpy()
    la, lb = pa_["label"].to_numpy(float), pb_["label"].to_numpy(float)
    sa, sb = pa_["probability"].to_numpy(float), pb_["probability"].to_numpy(float)
    if not (len(ida) == len(idb) and (ida == idb).all()):   # usually the same validation studies
        _, ia, ib = np.intersect1d(ida, idb, assume_unique=True, return_indices=True)
        la, sa, lb, sb = la[ia], sa[ia], lb[ib], sb[ib]
    same = la == lb            # a study must carry the same label in both runs
    la, sa, sb = la[same], sa[same], sb[same]
    try:
        t = delong.paired_test(la, sa, sb)
    except (delong.AUROCUndefined, ValueError) as exc:
        return {**none, "studies": len(la), "note": f"no test: {exc}"}
    return {"auroc_a": t.auroc_a, "auroc_b": t.auroc_b, "difference": t.difference, "se": t.se,
            "z": t.z, "p_value": t.p_value, "studies": len(la), "note": t.note}


def with_holm(rows: list[dict]) -> pd.DataFrame:
    """The tests as a table with Holm-adjusted p-values; a family = one comparison kind for one
    task (and task mode)."""
    df = pd.DataFrame(rows, columns=TEST_COLUMNS)
    if df.empty:
        return df
    df["p_holm"] = np.nan
    for _, idx in df.groupby(["comparison", "task_mode", "task"], sort=False).groups.items():
        df.loc[idx, "p_holm"] = delong.holm(df.loc[idx, "p_value"].to_numpy(float))
    df["significant"] = df["p_holm"] < ALPHA
    return df


def _row(kind: str, mode: str, key: str, a: Mapping, b: Mapping, seed, test: dict) -> dict:
    return {"comparison": kind, "task_mode": mode, "task": a["task"], "model_a": a["model"],
            "resolution_a": int(a["resolution"]), "model_b": b["model"],
            "resolution_b": int(b["resolution"]), "seed": seed, "trial_a": a["trial_id"],
            "trial_b": b["trial_id"], **test}


def resolution_tests(data: SweepData) -> pd.DataFrame:
    """Paired DeLong tests between every two resolutions for the same model (EfficientNet: the
    compound-scaled family) and seed; ``difference`` = higher minus lower resolution."""
    t = usable(data.trials)
    rows: list[dict] = []
    if t.empty:
        return with_holm(rows)
    t = t.assign(group=t["model"].map(model_group))
    for (mode, key, _, seed), grp in t.groupby(["task_mode", "task_key", "group", "seed"], sort=False):
        recs = [r for _, r in grp.sort_values("resolution").iterrows()]
        for i in range(len(recs)):
            for j in range(i + 1, len(recs)):
                a, b = recs[j], recs[i]
                rows.append(_row("resolution", mode, key, a, b, seed, paired_delong(data, key, a, b)))
    return with_holm(rows)


def best_configuration_tests(data: SweepData) -> pd.DataFrame:
    """Paired DeLong tests of each task's best grid point (highest mean AUROC) against the best
    grid point of every other resolution, seed by seed (runs with the same seed)."""
    t = usable(data.trials)
    rows: list[dict] = []
    by_model = summary_by_model(data.trials)
    for (mode, key), grp in by_model.groupby(["task_mode", "task_key"], sort=False):
        best = grp.loc[grp["mean"].idxmax()]
        runs = t[(t["task_mode"] == mode) & (t["task_key"] == key)]
        ra = runs[(runs["model"] == best["model"]) & (runs["resolution"] == best["resolution"])]
        for res, ogrp in grp[grp["resolution"] != best["resolution"]].groupby("resolution"):
            other = ogrp.loc[ogrp["mean"].idxmax()]
            rb = runs[(runs["model"] == other["model"]) & (runs["resolution"] == res)]
            for _, a in ra.iterrows():
                for _, b in rb[rb["seed"] == a["seed"]].iterrows():
                    rows.append(_row("best configuration", mode, key, a, b, a["seed"],
                                     paired_delong(data, key, a, b)))
    return with_holm(rows)


def resolution_test_summary(tests: pd.DataFrame) -> pd.DataFrame:
    """Resolution tests per task and resolution pair: how many (model, seed) pairs were tested,
    the mean difference (higher - lower) and how many are significantly higher / lower (Holm)."""
    cols = ["task_mode", "task", "higher", "lower", "pairs", "tested", "mean_difference",
            "significant_higher", "significant_lower"]
    if tests.empty:
        return pd.DataFrame(columns=cols)
    out = []
    for (mode, task, ra, rb), g in tests.groupby(["task_mode", "task", "resolution_a", "resolution_b"],
                                                 sort=False):
        out.append({"task_mode": mode, "task": task, "higher": ra, "lower": rb, "pairs": len(g),
                    "tested": int(g["p_value"].notna().sum()),
                    "mean_difference": g["difference"].mean(),
                    "significant_higher": int((g["significant"] & (g["difference"] > 0)).sum()),
                    "significant_lower": int((g["significant"] & (g["difference"] < 0)).sum())})
    df = pd.DataFrame(out, columns=cols)
    df["_k"] = df["task"].map(lambda name: task_order(task_key(name)))
    return df.sort_values(["task_mode", "_k", "lower", "higher"]).drop(columns="_k").reset_index(drop=True)
