"""A sweep's records -> tables, statistics, figures and a report (docs/results.md).

Reads ``STORAGE/SWEEP/{sweep.json, ledger/, trials/<id>/{config.json, epochs.jsonl, result.json,
predictions/epoch-NNN.parquet}}`` (docs/architecture.md sections 2-4) and writes ``results/<sweep>/``:

    trials.parquet/.csv    one row per finished trial and task: best epoch, best AUROC, DeLong 95% CI
    epochs.parquet/.csv    one row per recorded epoch of every trial (losses, AUROC per task)
    summary_*.csv/.md      the thesis's tables; tests_*.csv/.md the paired DeLong tests (Holm)
    figures/*.png          AUROC vs resolution, model-scaling deltas, EfficientNet
    report.md, report.html the whole story, incl. what is missing; problems.csv: unreadable records

Nothing here trusts a record blindly: an unreadable or inconsistent file is listed in
``problems.csv`` and the report, and the rest is aggregated. A partial sweep gives a partial report.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import posixpath
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from analysis import delong
from common import storage
from common.cli import HelpFormatter, UserError, run_cli
from common.schema import MANIFEST_NAME, TASK_KEYS, TASKS, task_key

TASK_NAMES = dict(zip(TASK_KEYS, TASKS))
#: Model-scaling pairs of the thesis: (family, larger, smaller).
SCALING_PAIRS = (("resnet", "resnet152", "resnet50"), ("densenet", "densenet161", "densenet121"))
ALPHA = 0.05
GRID_STATES = ("finished", "failed", "running", "pending", "missing")


# --- small helpers ---------------------------------------------------------------------------------
@dataclass
class Problem:
    """A record that could not be used (or looks wrong): where it is and what is the matter."""
    where: str
    what: str


def task_name(key: str) -> str:
    return TASK_NAMES.get(key, key)


def model_family(name: str) -> tuple[str, str]:
    """'resnet152' -> ('resnet', '152'); 'efficientnet-b3' -> ('efficientnet', 'b3')."""
    m = re.match(r"^(resnet|densenet|efficientnet)[-_]?(.*)$", str(name))
    return (m.group(1), m.group(2)) if m else (str(name), "")


def model_group(name: str) -> str:
    """What 'the same model' means across resolutions: EfficientNet is one compound-scaled family
    (B0 at 160 ... B5 at 480), every other model is itself."""
    family, _ = model_family(name)
    return "efficientnet" if family == "efficientnet" else str(name)


def resolve_model(name: str, resolution: int) -> str:
    if name != "efficientnet":
        return name
    try:
        from trainer.models import resolve_model_name
        return resolve_model_name(name, int(resolution))
    except Exception:  # an unknown resolution: keep the alias rather than fail the report
        return name


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


# --- reading the sweep ---------------------------------------------------------------------------
@dataclass
class SweepData:
    """Everything read from one sweep's storage."""
    location: str
    name: str
    sweep: dict | None
    manifest: dict | None
    grid: list[dict]                 # expected trials: {trial_id?, resolution, model, seed, task_mode, task}
    states: dict[str, str]           # trial id -> finished|failed|running|pending|missing
    trials: pd.DataFrame             # one row per finished trial and task
    epochs: pd.DataFrame             # one row per recorded epoch
    predictions: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)  # best epoch
    problems: list[Problem] = field(default_factory=list)
    ledger: dict[str, dict] = field(default_factory=dict)
    not_in_grid: list[str] = field(default_factory=list)

    @property
    def is_phantom(self) -> bool:
        return bool(self.manifest) and self.manifest.get("dataset") == "phantom"

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in GRID_STATES}
        for s in self.states.values():
            out[s] = out.get(s, 0) + 1
        return out

    def incomplete(self) -> pd.DataFrame:
        """Grid trials without a result: id, parameters, state, error."""
        rows = []
        for g in self.grid:
            tid = g.get("trial_id") or ""
            state = self.states.get(tid, "missing") if tid else g.get("state", "missing")
            if state == "finished":
                continue
            err = ((self.ledger.get(tid) or {}).get("error") or "") if tid else ""
            rows.append({"trial_id": tid, "resolution": g.get("resolution"), "model": g.get("model"),
                         "seed": g.get("seed"), "task_mode": g.get("task_mode"),
                         "task": g.get("task") or "", "state": state,
                         "error": str(err).strip().splitlines()[-1][:200] if err else ""})
        return pd.DataFrame(rows, columns=["trial_id", "resolution", "model", "seed", "task_mode",
                                           "task", "state", "error"])


def _read_json(loc: str, problems: list[Problem], what: str, required: bool = True) -> Any:
    try:
        return storage.read_json(loc)
    except FileNotFoundError:
        if required:
            problems.append(Problem(storage.display(loc), f"{what} is missing"))
    except Exception as exc:  # bad JSON, bad bytes, storage error
        problems.append(Problem(storage.display(loc), f"{what} is unreadable: {_one_line(exc)}"))
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


GRID_KEY = ("resolution", "model", "seed", "task_mode", "task")


def _grid_from_sweep(sweep: dict, problems: list[Problem], where: str) -> list[dict]:
    """The expected trials of ``sweep.json``: ``trials`` = {trial_id: params} in ``trial_ids``
    order (orchestrator/sweep.py), plus the trials earlier invocations of the same sweep registered
    (``all_trials``) unless the current grid has the same point under another id (a changed
    configuration: the old trial is superseded, listed, and left out). A list of ids or of
    {trial_id, params} is read as well."""
    items = sweep.get("trials")
    if isinstance(items, dict):
        order = [t for t in (sweep.get("trial_ids") or []) if t in items]
        order += [t for t in items if t not in set(order)]
        current = {t: items[t] for t in order}
        extra = sweep.get("all_trials") if isinstance(sweep.get("all_trials"), dict) else {}
        points = {tuple((p or {}).get(k) for k in GRID_KEY) for p in current.values()}
        for tid, params in extra.items():
            if tid in current or not isinstance(params, dict):
                continue
            if tuple(params.get(k) for k in GRID_KEY) in points:
                problems.append(Problem(where, f"trial {tid} of an earlier invocation is superseded "
                                               "by the current grid (another configuration): left out"))
                continue
            current[tid] = params
        items = [{"trial_id": t, "params": p} for t, p in current.items()]
    elif not isinstance(items, list) and isinstance(sweep.get("trial_ids"), list):
        items = list(sweep["trial_ids"])
    if not isinstance(items, list):
        problems.append(Problem(where, "sweep.json lists no trials: missing trials cannot be named"))
        return []
    grid = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            grid.append({"trial_id": item, **_params_from_id(item)})
            continue
        if not isinstance(item, dict):
            problems.append(Problem(where, f"grid entry {i} is not an object"))
            continue
        params = dict(item.get("params") or {}) if isinstance(item.get("params") or {}, dict) else {}
        params.update({k: item[k] for k in ("resolution", "model", "seed", "task_mode", "task")
                       if k in item})
        tid = str(item.get("trial_id") or "")
        if tid and not params:
            params = _params_from_id(tid)
        grid.append({"trial_id": tid, **params})
    return grid


_ID_RE = re.compile(r"^r(?P<resolution>\d+)-(?P<model>.+?)-s(?P<seed>\d+)-(?P<task_mode>multi|single)"
                    r"(?:-(?P<task>[a-z_]+))?-(?P<hash>[0-9a-f]{10})$")


def _params_from_id(trial_id: str) -> dict:
    """Parameters from a trial id ``r{res}-{model}-s{seed}-{mode}[-{task_key}]-{hash10}``."""
    m = _ID_RE.match(trial_id)
    if not m:
        return {}
    d = m.groupdict()
    return {"resolution": int(d["resolution"]), "model": d["model"], "seed": int(d["seed"]),
            "task_mode": d["task_mode"], "task": task_name(d["task"]) if d["task"] else ""}


def _read_epochs(trial_loc: str, problems: list[Problem]) -> list[dict]:
    loc = storage.join(trial_loc, "epochs.jsonl")
    try:
        text = storage.read_bytes(loc).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except Exception as exc:
        problems.append(Problem(storage.display(loc), f"unreadable: {_one_line(exc)}"))
        return []
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "epoch" not in rec:
                raise ValueError("not an epoch record")
            records.append(rec)
        except Exception as exc:
            problems.append(Problem(f"{storage.display(loc)}:{n}", f"line skipped: {_one_line(exc)}"))
    return records


def _read_predictions(trial_loc: str, epoch: int, cache: dict, problems: list[Problem]
                      ) -> pd.DataFrame | None:
    loc = storage.join(trial_loc, "predictions", f"epoch-{int(epoch):03d}.parquet")
    if loc in cache:
        return cache[loc]
    frame = None
    try:
        import pyarrow.parquet as pq
        with storage.open_input(loc) as f:
            frame = pq.read_table(f).to_pandas()
        missing = {"study_id", "task", "label", "probability"} - set(frame.columns)
        if missing:
            raise ValueError(f"columns {sorted(missing)} missing")
        frame = frame[["study_id", "task", "label", "probability"]].copy()
        frame["task"] = frame["task"].astype(str).map(task_key)
        frame["study_id"] = frame["study_id"].astype(str)
    except FileNotFoundError:
        problems.append(Problem(storage.display(loc), "predictions missing: no confidence interval"))
        frame = None
    except Exception as exc:
        problems.append(Problem(storage.display(loc), f"predictions unreadable: {_one_line(exc)}"))
        frame = None
    cache[loc] = frame
    return frame


def _trial_params(tid: str, config: dict | None, ledger_entry: dict | None,
                  grid_entry: dict | None) -> dict:
    """Resolution, model, seed, mode and task of a trial from the most specific record at hand."""
    out = _params_from_id(tid)
    for src in (grid_entry, (ledger_entry or {}).get("params"), config):
        if isinstance(src, dict):
            for k in ("resolution", "model", "seed", "task_mode", "task"):
                if k in src and src[k] is not None:
                    out[k] = src[k]
    if "resolution" in out:
        out["resolution"] = int(out["resolution"])
        out["model"] = resolve_model(str(out.get("model", "")), out["resolution"])
    return out


def _config_of(trial_loc: str, result: dict | None, problems: list[Problem]) -> dict | None:
    if isinstance(result, dict) and isinstance(result.get("config"), dict):
        return result["config"]
    cfg = _read_json(storage.join(trial_loc, "config.json"), problems, "config.json", required=False)
    if isinstance(cfg, dict):
        return cfg.get("config", cfg) if isinstance(cfg.get("config"), dict) else cfg
    return None


def load_sweep(location: str, bootstrap: int = 0, seed: int = 0,
               progress: bool = False) -> SweepData:
    """Read a sweep's storage into tables. Never raises for a bad record (it is listed instead);
    a location that does not exist is a UserError."""
    location = str(location)
    if not storage.exists(location):
        raise UserError(f"sweep location {storage.display(location)} does not exist")
    problems: list[Problem] = []
    sweep = _read_json(storage.join(location, "sweep.json"), problems, "sweep.json")
    if sweep is not None and not isinstance(sweep, dict):
        problems.append(Problem(storage.display(storage.join(location, "sweep.json")),
                                "sweep.json is not an object"))
        sweep = None
    name = (sweep or {}).get("name") or posixpath.basename(
        storage.display(location).rstrip("/")) or "sweep"
    grid = _grid_from_sweep(sweep, problems, storage.display(storage.join(location, "sweep.json"))) \
        if sweep else []
    manifest = _load_manifest(sweep, problems)

    # Ledger entries (each file on its own: one bad file must not hide the others).
    ledger: dict[str, dict] = {}
    ledger_loc = storage.join(location, "ledger")
    for fname in storage.listdir(ledger_loc):
        if not fname.endswith(".json") or ".tmp-" in fname:
            continue
        entry = _read_json(storage.join(ledger_loc, fname), problems, "ledger entry")
        if isinstance(entry, dict):
            ledger[entry.get("trial_id") or fname[:-5]] = entry
        elif entry is not None:
            problems.append(Problem(storage.display(storage.join(ledger_loc, fname)),
                                    "ledger entry is not an object"))
    folders = {n for n in storage.listdir(storage.join(location, "trials")) if ".tmp-" not in n}

    grid_ids = [g["trial_id"] for g in grid if g.get("trial_id")]
    grid_by_id = {g["trial_id"]: g for g in grid if g.get("trial_id")}
    known = set(ledger) | folders
    if grid_ids:
        trial_ids = list(grid_ids)
        not_in_grid = sorted(known - set(grid_ids))
    else:   # no usable grid: aggregate whatever is there
        trial_ids = sorted(known)
        not_in_grid = []
        if not grid:
            grid = [{"trial_id": t, **_params_from_id(t)} for t in trial_ids]
            grid_by_id = {g["trial_id"]: g for g in grid}

    rows, epoch_rows, states = [], [], {}
    predictions: dict[tuple[str, str], pd.DataFrame] = {}
    iterator: Iterable[str] = trial_ids
    if progress:
        from tqdm import tqdm
        iterator = tqdm(trial_ids, desc="trials", unit="trial", file=sys.stderr)
    for tid in iterator:
        trial_loc = storage.join(location, "trials", tid)
        entry = ledger.get(tid)
        result_loc = storage.join(trial_loc, "result.json")
        result = None
        if tid in folders:
            result = _read_json(result_loc, problems, "result.json", required=False)
            if result is not None and not (isinstance(result, dict)
                                           and isinstance(result.get("best"), dict)):
                problems.append(Problem(storage.display(result_loc),
                                        "result.json has no 'best' record: trial skipped"))
                result = None
        state = (entry or {}).get("state") or ("pending" if entry else "missing")
        if result is not None:
            state = "finished"
        elif state == "finished":   # ledger says finished but the result record is not usable
            problems.append(Problem(storage.display(result_loc),
                                    "ledger says finished but result.json is missing or unreadable"))
            state = "failed"
        if state not in GRID_STATES:
            state = "pending"
        states[tid] = state
        config = _config_of(trial_loc, result, problems) if tid in folders else None
        params = _trial_params(tid, config, entry, grid_by_id.get(tid))
        family, variant = model_family(params.get("model", ""))
        meta = {"trial_id": tid, "resolution": params.get("resolution"),
                "model": params.get("model"), "family": family, "variant": variant,
                "seed": params.get("seed"), "task_mode": params.get("task_mode"),
                "trial_task": params.get("task") or ""}
        if tid in folders:
            for rec in _read_epochs(trial_loc, problems):
                epoch_rows.append({**meta, "state": state, **rec})
        if result is None:
            continue
        cache: dict = {}
        for key, best in sorted(result["best"].items()):
            key = task_key(key)
            try:
                epoch = int(best["epoch"])
                auroc = float(best["auroc"]) if best.get("auroc") is not None else math.nan
            except Exception as exc:
                problems.append(Problem(storage.display(result_loc),
                                        f"best record of {key} unreadable: {_one_line(exc)}"))
                continue
            row = {**meta, "task": task_name(key), "task_key": key, "best_epoch": epoch,
                   "best_auroc": auroc, "ci_low": math.nan, "ci_high": math.nan,
                   "auroc_from_predictions": math.nan, "n_pos": 0, "n_neg": 0}
            if bootstrap:
                row.update(boot_low=math.nan, boot_high=math.nan)
            preds = _read_predictions(trial_loc, epoch, cache, problems)
            if preds is not None:
                p = preds[(preds["task"] == key) & preds["label"].notna()]
                labels = p["label"].to_numpy(dtype=float)
                probs = p["probability"].to_numpy(dtype=float)
                where = storage.display(storage.join(trial_loc, "predictions",
                                                     f"epoch-{epoch:03d}.parquet"))
                try:
                    ci = delong.auroc_ci(labels, probs)
                    row.update(ci_low=ci.low, ci_high=ci.high, auroc_from_predictions=ci.auroc,
                               n_pos=ci.n_pos, n_neg=ci.n_neg)
                    if not math.isnan(auroc) and abs(ci.auroc - auroc) > 1e-6:
                        problems.append(Problem(where, f"{key}: AUROC from predictions "
                                                       f"{ci.auroc:.6f} != result.json {auroc:.6f}"))
                    if bootstrap:
                        lo, hi = delong.bootstrap_ci(labels, probs, n=bootstrap, seed=seed)
                        row.update(boot_low=lo, boot_high=hi)
                    dup = p["study_id"].duplicated(keep=False)
                    if dup.any():   # one row per (study, task) is the contract: pairing skips them
                        problems.append(Problem(where, f"{key}: {int(dup.sum())} rows with a repeated "
                                                       "study_id left out of the paired tests"))
                    p = p[~dup].sort_values("study_id")
                    predictions[(tid, key)] = p[["study_id", "label", "probability"]].reset_index(drop=True)
                except Exception as exc:
                    problems.append(Problem(where, f"{key}: no confidence interval: {_one_line(exc)}"))
            rows.append(row)

    for g in grid:
        tid = g.get("trial_id")
        if tid and tid not in states:
            states[tid] = "missing"
    trials = pd.DataFrame(rows, columns=TRIAL_COLUMNS + (["boot_low", "boot_high"] if bootstrap else []))
    if not trials.empty:
        trials = trials.sort_values(["task_mode", "task_key", "resolution", "model", "seed"],
                                    key=_sort_key).reset_index(drop=True)
    epochs = pd.DataFrame(epoch_rows)
    if not epochs.empty:
        epochs = epochs.sort_values(["trial_id", "epoch"]).reset_index(drop=True)
    for tid in not_in_grid:
        problems.append(Problem(storage.display(storage.join(location, "trials", tid)),
                                "trial is not in sweep.json's grid: left out"))
    return SweepData(location=location, name=str(name), sweep=sweep, manifest=manifest, grid=grid,
                     states=states, trials=trials, epochs=epochs, predictions=predictions,
                     problems=problems, ledger=ledger, not_in_grid=not_in_grid)


TRIAL_COLUMNS = ["resolution", "model", "family", "variant", "seed", "task_mode", "task", "task_key",
                 "best_epoch", "best_auroc", "ci_low", "ci_high", "auroc_from_predictions",
                 "n_pos", "n_neg", "trial_id", "trial_task"]


def _sort_key(col: pd.Series) -> pd.Series:
    if col.name == "task_key":
        order = {k: i for i, k in enumerate(TASK_KEYS)}
        return col.map(lambda k: order.get(k, len(order)))
    return col


def _load_manifest(sweep: dict | None, problems: list[Problem]) -> dict | None:
    """The store's manifest: a copy in sweep.json if there is one, else read from the store."""
    if not sweep:
        return None
    for key in ("manifest",):
        if isinstance(sweep.get(key), dict):
            return sweep[key]
    store = sweep.get("store_location") or sweep.get("store")
    if not store:
        problems.append(Problem("sweep.json", "no store location: dataset manifest not shown"))
        return None
    return _read_json(storage.join(store, MANIFEST_NAME), problems, "the store's manifest")


# --- tables -----------------------------------------------------------------------------------------
def _usable(trials: pd.DataFrame) -> pd.DataFrame:
    return trials[trials["best_auroc"].notna()] if not trials.empty else trials


def summary_by_resolution(trials: pd.DataFrame) -> pd.DataFrame:
    """Per task and resolution: runs, mean, std (ddof 1), min and max of the best-epoch AUROC."""
    cols = ["task_mode", "task", "resolution", "runs", "mean", "std", "min", "max"]
    t = _usable(trials)
    if t.empty:
        return pd.DataFrame(columns=cols)
    g = t.groupby(["task_mode", "task_key", "resolution"], sort=False)["best_auroc"]
    out = g.agg(runs="count", mean="mean", std="std", min="min", max="max").reset_index()
    out.insert(1, "task", out["task_key"].map(task_name))
    out = out.sort_values(["task_mode", "task_key", "resolution"], key=_sort_key)
    return out[cols].reset_index(drop=True)


def summary_by_model(trials: pd.DataFrame) -> pd.DataFrame:
    """Per task, resolution and model: runs, mean, std, max (the configurations)."""
    cols = ["task_mode", "task", "task_key", "resolution", "model", "group", "runs", "mean", "std", "max"]
    t = _usable(trials)
    if t.empty:
        return pd.DataFrame(columns=cols)
    g = t.groupby(["task_mode", "task_key", "resolution", "model"], sort=False)["best_auroc"]
    out = g.agg(runs="count", mean="mean", std="std", max="max").reset_index()
    out["task"] = out["task_key"].map(task_name)
    out["group"] = out["model"].map(model_group)
    out = out.sort_values(["task_mode", "task_key", "resolution", "model"], key=_sort_key)
    return out[cols].reset_index(drop=True)


def model_scaling(trials: pd.DataFrame) -> pd.DataFrame:
    """delta(max) and delta(mean) of the larger minus the smaller variant per task and resolution,
    with the best model (highest mean) at that task and resolution."""
    cols = ["task_mode", "task", "resolution", "family", "larger", "smaller", "delta_max",
            "delta_mean", "runs_larger", "runs_smaller", "best_model", "best_mean"]
    by_model = summary_by_model(trials)
    rows = []
    for (mode, key, res), grp in by_model.groupby(["task_mode", "task_key", "resolution"], sort=False):
        stats = grp.set_index("model")
        best = grp.loc[grp["mean"].idxmax()]
        for family, large, small in SCALING_PAIRS:
            if large not in stats.index or small not in stats.index:
                continue
            rows.append({"task_mode": mode, "task": task_name(key), "resolution": res,
                         "family": family, "larger": large, "smaller": small,
                         "delta_max": stats.at[large, "max"] - stats.at[small, "max"],
                         "delta_mean": stats.at[large, "mean"] - stats.at[small, "mean"],
                         "runs_larger": int(stats.at[large, "runs"]),
                         "runs_smaller": int(stats.at[small, "runs"]),
                         "best_model": best["model"], "best_mean": best["mean"]})
    return pd.DataFrame(rows, columns=cols)


def best_configurations(trials: pd.DataFrame) -> pd.DataFrame:
    """Per task: the configuration (model, resolution) with the highest mean AUROC over seeds,
    with its spread and its best single run."""
    cols = ["task_mode", "task", "model", "resolution", "runs", "mean", "std", "max",
            "best_run_trial_id", "best_run_ci_low", "best_run_ci_high"]
    by_model = summary_by_model(trials)
    t = _usable(trials)
    rows = []
    for (mode, key), grp in by_model.groupby(["task_mode", "task_key"], sort=False):
        best = grp.loc[grp["mean"].idxmax()]
        runs = t[(t["task_mode"] == mode) & (t["task_key"] == key) & (t["model"] == best["model"])
                 & (t["resolution"] == best["resolution"])]
        top = runs.loc[runs["best_auroc"].idxmax()]
        rows.append({"task_mode": mode, "task": task_name(key), "model": best["model"],
                     "resolution": int(best["resolution"]), "runs": int(best["runs"]),
                     "mean": best["mean"], "std": best["std"], "max": best["max"],
                     "best_run_trial_id": top["trial_id"], "best_run_ci_low": top["ci_low"],
                     "best_run_ci_high": top["ci_high"]})
    return pd.DataFrame(rows, columns=cols)


def efficientnet_table(trials: pd.DataFrame) -> pd.DataFrame:
    """EfficientNet (compound scaling: variant matched to resolution) per task and resolution."""
    by_model = summary_by_model(trials)
    e = by_model[by_model["group"] == "efficientnet"]
    return e[["task_mode", "task", "resolution", "model", "runs", "mean", "std", "max"]] \
        .reset_index(drop=True)


def best_runs(trials: pd.DataFrame) -> pd.DataFrame:
    """Per task and resolution the single run with the highest best-epoch AUROC (Grad-CAM uses
    its checkpoint)."""
    t = _usable(trials)
    if t.empty:
        return t
    idx = t.groupby(["task_mode", "task_key", "resolution"], sort=False)["best_auroc"].idxmax()
    return t.loc[idx.values].sort_values(["task_mode", "task_key", "resolution"], key=_sort_key) \
        .reset_index(drop=True)


# --- paired tests -----------------------------------------------------------------------------------
TEST_COLUMNS = ["comparison", "task_mode", "task", "model_a", "resolution_a", "model_b",
                "resolution_b", "seed", "auroc_a", "auroc_b", "difference", "se", "z", "p_value",
                "p_holm", "significant", "studies", "trial_a", "trial_b"]


def _paired(data: SweepData, key: str, a: pd.Series, b: pd.Series) -> dict | None:
    pa_ = data.predictions.get((a["trial_id"], key))
    pb_ = data.predictions.get((b["trial_id"], key))
    if pa_ is None or pb_ is None:
        return None
    ida, idb = pa_["study_id"].to_numpy(), pb_["study_id"].to_numpy()
    la, lb = pa_["label"].to_numpy(float), pb_["label"].to_numpy(float)
    sa, sb = pa_["probability"].to_numpy(float), pb_["probability"].to_numpy(float)
    if not (len(ida) == len(idb) and (ida == idb).all()):   # usually the same validation studies
        _, ia, ib = np.intersect1d(ida, idb, assume_unique=True, return_indices=True)
        la, sa, lb, sb = la[ia], sa[ia], lb[ib], sb[ib]
    same = la == lb            # a study must carry the same label in both runs
    la, sa, sb = la[same], sa[same], sb[same]
    if len(la) == 0:
        return None
    try:
        t = delong.paired_test(la, sa, sb)
    except (delong.AUROCUndefined, ValueError):
        return None
    return {"auroc_a": t.auroc_a, "auroc_b": t.auroc_b, "difference": t.difference, "se": t.se,
            "z": t.z, "p_value": t.p_value, "studies": len(la)}


def _with_holm(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=TEST_COLUMNS)
    if df.empty:
        return df
    # Holm's family: one comparison kind for one task (and task mode).
    df["p_holm"] = np.nan
    for _, idx in df.groupby(["comparison", "task_mode", "task"], sort=False).groups.items():
        df.loc[idx, "p_holm"] = delong.holm(df.loc[idx, "p_value"].to_numpy(float))
    df["significant"] = df["p_holm"] < ALPHA
    return df


def resolution_tests(data: SweepData) -> pd.DataFrame:
    """Paired DeLong tests between every two resolutions for the same model (EfficientNet: the
    compound-scaled family) and seed, on the studies both runs scored."""
    t = _usable(data.trials)
    rows = []
    if t.empty:
        return _with_holm(rows)
    t = t.assign(group=t["model"].map(model_group))
    for (mode, key, group, seed), grp in t.groupby(["task_mode", "task_key", "group", "seed"], sort=False):
        grp = grp.sort_values("resolution")
        recs = [r for _, r in grp.iterrows()]
        for i in range(len(recs)):
            for j in range(i + 1, len(recs)):
                a, b = recs[j], recs[i]   # a = the higher resolution: difference = higher - lower
                res = _paired(data, key, a, b)
                if res is None:
                    continue
                rows.append({"comparison": "resolution", "task_mode": mode, "task": task_name(key),
                             "model_a": a["model"], "resolution_a": int(a["resolution"]),
                             "model_b": b["model"], "resolution_b": int(b["resolution"]),
                             "seed": seed, "trial_a": a["trial_id"], "trial_b": b["trial_id"], **res})
    return _with_holm(rows)


def best_configuration_tests(data: SweepData) -> pd.DataFrame:
    """Paired DeLong tests of each task's best configuration (highest mean AUROC) against the best
    configuration of every other resolution, seed by seed (runs with the same seed)."""
    t = _usable(data.trials)
    rows = []
    by_model = summary_by_model(data.trials)
    for (mode, key), grp in by_model.groupby(["task_mode", "task_key"], sort=False):
        best = grp.loc[grp["mean"].idxmax()]
        others = grp[grp["resolution"] != best["resolution"]]
        for res, ogrp in others.groupby("resolution"):
            other = ogrp.loc[ogrp["mean"].idxmax()]
            runs = t[(t["task_mode"] == mode) & (t["task_key"] == key)]
            ra = runs[(runs["model"] == best["model"]) & (runs["resolution"] == best["resolution"])]
            rb = runs[(runs["model"] == other["model"]) & (runs["resolution"] == res)]
            for _, a in ra.iterrows():
                for _, b in rb[rb["seed"] == a["seed"]].iterrows():
                    r = _paired(data, key, a, b)
                    if r is None:
                        continue
                    rows.append({"comparison": "best configuration", "task_mode": mode,
                                 "task": task_name(key), "model_a": a["model"],
                                 "resolution_a": int(a["resolution"]), "model_b": b["model"],
                                 "resolution_b": int(b["resolution"]), "seed": a["seed"],
                                 "trial_a": a["trial_id"], "trial_b": b["trial_id"], **r})
    return _with_holm(rows)


def resolution_test_summary(tests: pd.DataFrame) -> pd.DataFrame:
    """Resolution tests per task and resolution pair: how many (model, seed) pairs were tested,
    the mean difference (higher - lower) and how many are significantly higher / lower (Holm)."""
    cols = ["task_mode", "task", "higher", "lower", "pairs", "mean_difference",
            "significant_higher", "significant_lower"]
    if tests.empty:
        return pd.DataFrame(columns=cols)
    out = []
    for (mode, task, ra, rb), g in tests.groupby(["task_mode", "task", "resolution_a", "resolution_b"],
                                                 sort=False):
        out.append({"task_mode": mode, "task": task, "higher": ra, "lower": rb, "pairs": len(g),
                    "mean_difference": g["difference"].mean(),
                    "significant_higher": int((g["significant"] & (g["difference"] > 0)).sum()),
                    "significant_lower": int((g["significant"] & (g["difference"] < 0)).sum())})
    df = pd.DataFrame(out, columns=cols)
    df["_k"] = df["task"].map(lambda t: TASKS.index(t) if t in TASKS else 99)
    return df.sort_values(["task_mode", "_k", "lower", "higher"]).drop(columns="_k").reset_index(drop=True)


# --- the printable table for the sweep CLI ----------------------------------------------------------
def format_results_table(trials: pd.DataFrame) -> str:
    """Mean best-epoch AUROC per task (rows) and resolution (columns), runs in brackets."""
    s = summary_by_resolution(trials)
    if s.empty:
        return "no finished trials yet"
    blocks = []
    for mode, grp in s.groupby("task_mode", sort=False):
        res = sorted(grp["resolution"].unique())
        head = f"{'task (' + str(mode) + ')':<20}" + "".join(f"{str(r) + ' px':>14}" for r in res)
        lines = [head, "-" * len(head)]
        for task in [t for t in TASKS if t in set(grp["task"])] + \
                    sorted(set(grp["task"]) - set(TASKS)):
            tg = grp[grp["task"] == task].set_index("resolution")
            cells = []
            for r in res:
                if r in tg.index:
                    cells.append(f"{tg.at[r, 'mean']:.4f} ({int(tg.at[r, 'runs'])})".rjust(14))
                else:
                    cells.append(f"{'–':>14}")
            lines.append(f"{task:<20}" + "".join(cells))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n(mean best-epoch validation AUROC over runs; runs in brackets)"


def results_table(sweep_location: str) -> str:
    """The printable per task x resolution mean AUROC table of a sweep (for ``orchestrator.sweep``)."""
    return format_results_table(load_sweep(sweep_location).trials)


# --- writing --------------------------------------------------------------------------------------
@dataclass
class Summary:
    """What :func:`aggregate` did (the sweep prints ``table`` and logs the rest)."""
    sweep: str
    out_dir: str
    counts: dict[str, int]
    trials: int                 # rows in trials.parquet (trial x task)
    problems: int
    files: list[str]
    table: str
    figures_skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def default_out_dir(data_name: str) -> str:
    return os.path.join("results", data_name)


def _write_table(out_dir: str, name: str, df: pd.DataFrame, files: list[str],
                 parquet: bool = False, markdown: bool = True) -> None:
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    storage.write_bytes(storage.join(out_dir, f"{name}.csv"), buf.getvalue().encode())
    files.append(f"{name}.csv")
    if markdown:
        storage.write_bytes(storage.join(out_dir, f"{name}.md"), markdown_table(df).encode())
        files.append(f"{name}.md")
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq
        sink = io.BytesIO()
        clean = df.copy()
        for c in clean.columns:   # epoch records may mix types in a column: keep them as text
            if clean[c].dtype == object:
                clean[c] = clean[c].map(lambda v: v if v is None or isinstance(v, str)
                                        else json.dumps(v) if isinstance(v, (list, dict)) else str(v))
        pq.write_table(pa.Table.from_pandas(clean, preserve_index=False), sink)
        storage.write_bytes(storage.join(out_dir, f"{name}.parquet"), sink.getvalue())
        files.append(f"{name}.parquet")


def compute_tables(data: SweepData) -> dict[str, pd.DataFrame]:
    """Every summary table and test table of the report, by file stem."""
    res_tests = resolution_tests(data)
    return {
        "summary_resolution": summary_by_resolution(data.trials),
        "summary_model": summary_by_model(data.trials).drop(columns=["task_key", "group"]),
        "model_scaling": model_scaling(data.trials),
        "best_configurations": best_configurations(data.trials),
        "efficientnet": efficientnet_table(data.trials),
        "tests_resolution": res_tests,
        "tests_resolution_summary": resolution_test_summary(res_tests),
        "tests_best_configuration": best_configuration_tests(data),
        "incomplete": data.incomplete(),
        "problems": pd.DataFrame([p.__dict__ for p in data.problems], columns=["where", "what"]),
    }


def aggregate(sweep_location: str, out_dir: str | None = None, bootstrap: int = 0, seed: int = 0,
              figures: bool = True, report: bool = True, progress: bool = False) -> Summary:
    """Aggregate one sweep into ``out_dir`` (default ``results/<sweep name>``) and return a summary.

    ``bootstrap`` > 0 adds a stratified percentile bootstrap CI with that many resamples.
    """
    data = load_sweep(sweep_location, bootstrap=bootstrap, seed=seed, progress=progress)
    out_dir = out_dir or default_out_dir(data.name)
    storage.makedirs(out_dir)
    files: list[str] = []
    trials_out = data.trials.drop(columns=["trial_task"], errors="ignore")
    _write_table(out_dir, "trials", trials_out, files, parquet=True, markdown=False)
    _write_table(out_dir, "epochs", data.epochs, files, parquet=True, markdown=False)
    tables = compute_tables(data)
    for name, df in tables.items():
        _write_table(out_dir, name, df, files)
    skipped: list[str] = []
    figs: dict[str, bytes] = {}
    if figures:
        from analysis import plots
        figs, skipped = plots.all_figures(data.trials, tables)
        for fname, png in figs.items():
            storage.write_bytes(storage.join(out_dir, "figures", fname), png)
            files.append(f"figures/{fname}")
    table = format_results_table(data.trials)
    if report:
        from analysis import report as report_mod
        md, html_text = report_mod.build_report(data, tables, figs, skipped, bootstrap=bootstrap)
        storage.write_bytes(storage.join(out_dir, "report.md"), md.encode())
        storage.write_bytes(storage.join(out_dir, "report.html"), html_text.encode())
        files += ["report.md", "report.html"]
    summary = Summary(sweep=storage.display(sweep_location), out_dir=storage.display(out_dir),
                      counts=data.counts(), trials=len(data.trials), problems=len(data.problems),
                      files=files, table=table, figures_skipped=skipped)
    storage.write_json(storage.join(out_dir, "summary.json"), summary.to_dict())
    files.append("summary.json")
    return summary


# --- command line ---------------------------------------------------------------------------------
HELP = "aggregate a sweep into tables, statistics, figures and a report"
EPILOG = """examples:
  python -m analysis.aggregate --sweep sweeps/thesis
  python -m analysis.aggregate --sweep "s3://bucket/sweeps/thesis?endpoint_override=minio:9000&scheme=http" \\
      --out results/thesis --bootstrap 2000
  python -m analysis.aggregate --sweep sweeps/thesis --no-figures   # tables only

writes trials.parquet/.csv, epochs.parquet/.csv, summary_*.csv/.md, tests_*.csv/.md,
figures/*.png, report.md, report.html, problems.csv and summary.json (docs/results.md)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sweep", required=True, help="the sweep's storage location (path or s3://...)")
    parser.add_argument("--out", default=None, help="output folder (default: results/<sweep name>)")
    parser.add_argument("--bootstrap", type=int, default=0,
                        help="also a percentile bootstrap CI with this many resamples (0 = off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--no-report", action="store_true", help="skip report.md and report.html")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no table")


def run(args: argparse.Namespace) -> int:
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap: must be >= 0, got {args.bootstrap}")
    summary = aggregate(args.sweep, out_dir=args.out, bootstrap=args.bootstrap, seed=args.seed,
                        figures=not args.no_figures, report=not args.no_report,
                        progress=not args.quiet)
    if not args.quiet:
        print(summary.table)
        c = summary.counts
        print(f"\n{c.get('finished', 0)} finished, {c.get('failed', 0)} failed, "
              f"{c.get('running', 0)} running, {c.get('pending', 0)} pending, "
              f"{c.get('missing', 0)} missing; {summary.problems} problem(s) listed in "
              f"{summary.out_dir}/problems.csv")
        for name in summary.figures_skipped:
            print(f"figure skipped: {name}")
        print(f"wrote {len(summary.files)} files to {summary.out_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.aggregate", description=HELP,
                                     epilog=EPILOG, formatter_class=HelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="analysis.aggregate"))
