"""The result tables of one configuration: summaries over runs, best configurations, best runs.

Every function takes ``SweepData.trials`` (one row per finished trial and task of the sweep's main
configuration, analysis.records) and returns a DataFrame, except :func:`results_table`, the
printable task x resolution table, and :func:`markdown_table`, the Markdown form of any table.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from analysis.families import is_compound_scaled
from analysis.records import sort_key, usable


def task_names(trials: pd.DataFrame) -> dict[str, str]:
    """task key -> the task's name as the trials table spells it (the dataset's own label)."""
    return dict(zip(trials["task_key"], trials["task"])) if not trials.empty else {}


def model_group(name: str) -> str:
    """What 'the same model' means across resolutions: a compound-scaled family (EfficientNet, B0
    at 160 ... B5 at 480) is one model, every other model is itself."""
    return "efficientnet" if is_compound_scaled(name) else str(name)


# --- summaries ------------------------------------------------------------------------------------
def summary_by_resolution(trials: pd.DataFrame) -> pd.DataFrame:
    """Per task and resolution: runs, mean, std (ddof 1), min and max of the best-epoch AUROC."""
    cols = ["task_mode", "task", "resolution", "runs", "mean", "std", "min", "max"]
    t = usable(trials)
    if t.empty:
        return pd.DataFrame(columns=cols)
    g = t.groupby(["task_mode", "task_key", "resolution"], sort=False)["best_auroc"]
    out = g.agg(runs="count", mean="mean", std="std", min="min", max="max").reset_index()
    out.insert(1, "task", out["task_key"].map(task_names(t)))
    out = out.sort_values(["task_mode", "task_key", "resolution"], key=sort_key)
    return out[cols].reset_index(drop=True)


def summary_by_model(trials: pd.DataFrame) -> pd.DataFrame:
    """Per task, resolution and model: runs, mean, std, max (the configurations of the grid)."""
    cols = ["task_mode", "task", "task_key", "resolution", "model", "runs", "mean", "std", "max"]
    t = usable(trials)
    if t.empty:
        return pd.DataFrame(columns=cols)
    g = t.groupby(["task_mode", "task_key", "resolution", "model"], sort=False)["best_auroc"]
    out = g.agg(runs="count", mean="mean", std="std", max="max").reset_index()
    out["task"] = out["task_key"].map(task_names(t))
    out = out.sort_values(["task_mode", "task_key", "resolution", "model"], key=sort_key)
    return out[cols].reset_index(drop=True)


def best_configurations(trials: pd.DataFrame) -> pd.DataFrame:
    """Per task: the grid point (model, resolution) with the highest mean AUROC over seeds, with
    its spread and its best single run."""
    cols = ["task_mode", "task", "model", "resolution", "runs", "mean", "std", "max",
            "best_run_trial_id", "best_run_ci_low", "best_run_ci_high"]
    by_model = summary_by_model(trials)
    t = usable(trials)
    rows = []
    for (mode, key), grp in by_model.groupby(["task_mode", "task_key"], sort=False):
        best = grp.loc[grp["mean"].idxmax()]
        runs = t[(t["task_mode"] == mode) & (t["task_key"] == key) & (t["model"] == best["model"])
                 & (t["resolution"] == best["resolution"])]
        top = runs.loc[runs["best_auroc"].idxmax()]
        rows.append({"task_mode": mode, "task": best["task"], "model": best["model"],
                     "resolution": int(best["resolution"]), "runs": int(best["runs"]),
                     "mean": best["mean"], "std": best["std"], "max": best["max"],
                     "best_run_trial_id": top["trial_id"], "best_run_ci_low": top["ci_low"],
                     "best_run_ci_high": top["ci_high"]})
    return pd.DataFrame(rows, columns=cols)


def best_runs(trials: pd.DataFrame) -> pd.DataFrame:
    """Per task and resolution, the best model's best run (its checkpoint is the one Grad-CAM
    shows): the model with the highest mean best-epoch AUROC over seeds, as the answer and the best
    configurations rank them, then its seed with the highest AUROC. A lucky seed of a model that is
    worse on average is not shown as "the best model". Rows of ``trials``, in task and resolution
    order."""
    t = usable(trials)
    if t.empty:
        return t
    point = ["task_mode", "task_key", "resolution"]
    ranked = t.assign(_model_mean=t.groupby(point + ["model"], sort=False)["best_auroc"].transform("mean"))
    ranked = ranked.sort_values(["_model_mean", "best_auroc", "trial_id"], ascending=[False, False, True],
                                kind="stable")
    best = ranked.drop_duplicates(point).drop(columns="_model_mean")
    return best.sort_values(point, key=sort_key).reset_index(drop=True)


# --- printable ------------------------------------------------------------------------------------
def results_table(trials: pd.DataFrame) -> str:
    """The printable table: mean best-epoch AUROC per task (rows) and resolution (columns), runs in
    brackets; one block per task mode."""
    s = summary_by_resolution(trials)
    if s.empty:
        return "no finished trials yet"
    blocks = []
    for mode, grp in s.groupby("task_mode", sort=False):
        res = sorted(grp["resolution"].unique())
        head = f"{'task (' + str(mode) + ')':<20}" + "".join(f"{str(r) + ' px':>14}" for r in res)
        lines = [head, "-" * len(head)]
        tasks = list(dict.fromkeys(grp["task"]))   # already in report order
        for task in tasks:
            tg = grp[grp["task"] == task].set_index("resolution")
            cells = [f"{tg.at[r, 'mean']:.4f} ({int(tg.at[r, 'runs'])})".rjust(14) if r in tg.index
                     else f"{'–':>14}" for r in res]
            lines.append(f"{task:<20}" + "".join(cells))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n(mean best-epoch validation AUROC over runs; runs in brackets)"


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, (float, np.floating)):
        return "–" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def format_cell(column: str, x: Any, digits: int = 4) -> str:
    """A table cell: p-values below 0.001 in scientific notation (0.0000 would read as 'none')."""
    if str(column).startswith("p_") and isinstance(x, (float, np.floating)) and 0 < x < 1e-3:
        return f"{x:.1e}"
    return _fmt(x, digits)


def markdown_table(df: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency); floats to ``digits`` places."""
    if df is None or df.empty:
        return "_(no rows)_\n"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |",
             "| " + " | ".join("---:" if pd.api.types.is_numeric_dtype(df[c]) else "---"
                               for c in df.columns) + " |"]
    for row in df.itertuples(index=False):
        cells = [format_cell(c, v, digits).replace("|", "\\|") for c, v in zip(cols, row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- configurations -------------------------------------------------------------------------------
def configurations_table(data) -> pd.DataFrame:
    """One row per configuration met in the sweep (``data``: records.SweepData): its key, whether
    it is the main one (the one every other table shows), its trials and how it differs."""
    cols = ["configuration", "main", "trials", "finished", "differs_from_main"]
    states = {r.trial_id: r.state for r in data.records}
    rows = [{"configuration": c.key, "main": c.is_main, "trials": len(c.trial_ids),
             "finished": sum(states.get(t) == "finished" for t in c.trial_ids),
             "differs_from_main": "; ".join(c.differs)}
            for c in sorted(data.configurations.values(), key=lambda c: (not c.is_main, c.key))]
    return pd.DataFrame(rows, columns=cols)
