"""Load one sweep into one data model: a :class:`SweepData` of :class:`TrialRecord` s.

Everything is read through ``common.sweep_folder.SweepFolder`` and ``common.trial_folder.TrialFolder``:
``sweep.json`` (the grid, the base configuration, the store's manifest hash), the ledger (state and
last error per trial) and each trial folder (config, epochs, result, predictions). A trial's
parameters and its configuration come from its own ``config.json`` only; the grid in ``sweep.json``
names the trials that have none yet.

Only trials of the sweep's main configuration (the current ``sweep.json`` base config and store) go
into :attr:`SweepData.trials`, the frame every table, figure and paired test starts from. Trials of
another configuration (an earlier run of the same sweep name with another hyperparameter) go into
:attr:`SweepData.other_trials` and the problems list: listed, never pooled.

Nothing here trusts a record blindly: an unreadable or inconsistent file becomes a :class:`Problem`
and the rest is loaded, so a partial or damaged sweep gives a partial report.
"""
from __future__ import annotations

import math
import posixpath
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import pandas as pd

from analysis import delong
from analysis.configuration import configuration_fields, configuration_key, differences
from common import storage
from common.cli import UserError
from common.schema import MANIFEST_NAME, TASK_KEYS, TASKS, task_key
from common.sweep_folder import SWEEP_FILE, SweepFile, SweepFolder
from common.trial_folder import CONFIG, RESULT, TrialFolder

GRID_STATES = ("finished", "failed", "running", "pending", "missing")
TASK_NAMES = dict(zip(TASK_KEYS, TASKS))

#: One row per finished trial and task (:attr:`SweepData.trials`, ``trials.csv``).
TRIAL_COLUMNS = ["resolution", "model", "family", "variant", "seed", "task_mode", "task", "task_key",
                 "best_epoch", "best_auroc", "ci_low", "ci_high", "ci_note", "auroc_from_predictions",
                 "n_pos", "n_neg", "trial_id", "configuration"]
BOOTSTRAP_COLUMNS = ["boot_low", "boot_high"]


@dataclass
class Problem:
    """A record that could not be used (or looks wrong): where it is and what is the matter."""
    where: str
    what: str


def task_name(key: str, names: dict[str, str] | None = None) -> str:
    """The task's name: the store's own label when its manifest is at hand, else CheXpert's."""
    return (names or {}).get(key) or TASK_NAMES.get(key, key)


def model_family(name: str) -> tuple[str, str]:
    """'resnet152' -> ('resnet', '152'); 'efficientnet-b3' -> ('efficientnet', 'b3'); the family
    from analysis.families (the model registry's metadata, else the name)."""
    from analysis.families import family
    fam, name = family(name), str(name)
    variant = name[len(fam):].lstrip("-_") if name.startswith(fam) and fam != name else ""
    return fam, variant


def resolve_model(name: str, resolution: int | None) -> str:
    """Older records may hold the 'efficientnet' alias; the tables need the variant it ran."""
    if name != "efficientnet" or resolution is None:
        return name
    try:
        from trainer.models import resolve_model_name
        return resolve_model_name(name, int(resolution))
    except Exception:  # an unknown resolution: keep the alias rather than fail the report
        return name


def task_order(key: str) -> int:
    return TASK_KEYS.index(key) if key in TASK_KEYS else len(TASK_KEYS)


@dataclass
class TrialRecord:
    """One trial as the sweep knows it, whatever its state or configuration."""
    trial_id: str
    folder: TrialFolder
    state: str                          # one of GRID_STATES
    resolution: int | None = None
    model: str = ""
    seed: int | None = None
    task_mode: str = ""
    task: str = ""                      # the task of a single-task trial ('' in multi mode)
    configuration: str = ""             # analysis.configuration key ('' = unknown: no config.json)
    config: dict | None = None          # the trial's config.json "config"
    manifest_hash: str = ""             # the store it was trained on (config.json)
    in_current_grid: bool = True        # in the grid of the latest run of the sweep
    error: str = ""                     # the ledger's last error line
    result: dict | None = None          # result.json when finished
    epochs: list[dict] = field(default_factory=list)

    def params(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, "resolution": self.resolution, "model": self.model,
                "seed": self.seed, "task_mode": self.task_mode, "task": self.task}


@dataclass
class Configuration:
    """One configuration met in the sweep: its key, the fields that define it, its trials."""
    key: str
    fields: dict[str, Any]
    is_main: bool
    trial_ids: list[str] = field(default_factory=list)
    differs: list[str] = field(default_factory=list)    # from the main configuration


@dataclass
class SweepData:
    """Everything read from one sweep's storage."""
    location: str
    name: str
    sweep: SweepFile | None
    manifest: dict | None
    main_configuration: str
    configurations: dict[str, Configuration]
    records: list[TrialRecord]          # every trial met, the current grid first
    trials: pd.DataFrame                # main configuration: one row per finished trial and task
    other_trials: pd.DataFrame          # other configurations, same columns: never pooled
    epochs: pd.DataFrame                # main configuration: one row per recorded epoch
    predictions: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    bootstrap: int = 0                  # resamples of the bootstrap CI (0 = none)

    @property
    def is_phantom(self) -> bool:
        return bool(self.manifest) and self.manifest.get("dataset") == "phantom"

    def main_records(self) -> list[TrialRecord]:
        return [r for r in self.records if r.configuration == self.main_configuration]

    @property
    def grid(self) -> list[dict]:
        """The trials of the main configuration: id and grid point each."""
        return [r.params() for r in self.main_records()]

    @property
    def states(self) -> dict[str, str]:
        return {r.trial_id: r.state for r in self.main_records()}

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in GRID_STATES}
        for r in self.main_records():
            out[r.state] += 1
        return out

    def incomplete(self) -> pd.DataFrame:
        """Trials of the main configuration without a result: id, parameters, state, error."""
        cols = ["trial_id", "resolution", "model", "seed", "task_mode", "task", "state", "error"]
        rows = [{**r.params(), "state": r.state, "error": r.error}
                for r in self.main_records() if r.state != "finished"]
        return pd.DataFrame(rows, columns=cols)

    def other_configurations(self) -> pd.DataFrame:
        """One row per trial of another configuration: what it is and how it differs."""
        cols = ["configuration", "trial_id", "resolution", "model", "seed", "task_mode", "task",
                "state", "differs_from_main"]
        rows = []
        for r in self.records:
            if r.configuration == self.main_configuration:
                continue
            conf = self.configurations.get(r.configuration)
            rows.append({"configuration": r.configuration or "unknown", **r.params(),
                         "state": r.state,
                         "differs_from_main": "; ".join(conf.differs) if conf else
                         f"no readable {CONFIG}"})
        return pd.DataFrame(rows, columns=cols)


# --- reading ------------------------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _read_json(read, where: str, what: str, problems: list[Problem], required: bool = True):
    """``read()`` with every failure turned into a problem (None returned)."""
    try:
        return read()
    except FileNotFoundError:
        if required:
            problems.append(Problem(where, f"{what} is missing"))
    except Exception as exc:  # bad JSON, bad bytes, storage error
        problems.append(Problem(where, f"{what} is unreadable: {_one_line(exc)}"))
    return None


def _read_sweep_file(folder: SweepFolder, problems: list[Problem]) -> SweepFile | None:
    where = storage.display(folder.sweep_file)
    try:
        return folder.read_sweep_file()
    except FileNotFoundError:
        problems.append(Problem(where, f"{SWEEP_FILE} is missing"))
    except Exception as exc:
        problems.append(Problem(where, f"{SWEEP_FILE} is unreadable: {_one_line(exc)}"))
    return None


def _load_manifest(sweep: SweepFile | None, problems: list[Problem]) -> dict | None:
    """The store's manifest: a copy in sweep.json if there is one, else read from the store."""
    if sweep is None:
        return None
    if isinstance(sweep.extra.get("manifest"), dict):
        return sweep.extra["manifest"]
    store = sweep.store_location or sweep.store
    if not store:
        problems.append(Problem(SWEEP_FILE, "no store location: dataset manifest not shown"))
        return None
    loc = storage.join(store, MANIFEST_NAME)
    return _read_json(lambda: storage.read_json(loc), storage.display(loc), "the store's manifest",
                      problems)


def _trial_order(sweep: SweepFile | None, folder: SweepFolder, ledger_ids: list[str],
                 trial_dirs: list[str], problems: list[Problem]) -> tuple[list[str], dict[str, dict], set[str]]:
    """(trial ids in order, grid point per id from sweep.json, ids of the current grid).

    The current grid first, then trials an earlier run of the same sweep registered. Folders and
    ledger entries sweep.json does not know are listed as problems and left out."""
    trials = sweep.trials if sweep is not None and isinstance(sweep.trials, dict) else {}
    trial_ids = sweep.trial_ids if sweep is not None and isinstance(sweep.trial_ids, list) else []
    if not (trials or trial_ids):
        if sweep is not None:
            problems.append(Problem(storage.display(folder.sweep_file),
                                    f"{SWEEP_FILE} lists no trials: missing trials cannot be named"))
        ids = sorted(set(ledger_ids) | set(trial_dirs))
        return ids, {}, set(ids)
    all_trials = sweep.all_trials if isinstance(sweep.all_trials, dict) else {}
    points = {t: p for t, p in all_trials.items() if isinstance(p, dict)}
    points.update({t: p for t, p in trials.items() if isinstance(p, dict)})
    current = [t for t in trial_ids if isinstance(t, str)]
    current += [t for t in trials if t not in set(current)]
    earlier = [t for t in all_trials if t not in set(current)]
    order = current + earlier
    for tid in sorted((set(ledger_ids) | set(trial_dirs)) - set(order)):
        problems.append(Problem(storage.display(folder.trial(tid).location),
                                f"trial is not in {SWEEP_FILE}'s grid: left out"))
    return order, points, set(current)


def _ledger_entry(folder: SweepFolder, tid: str, problems: list[Problem]) -> dict | None:
    loc = folder.ledger_entry(tid)
    entry = _read_json(lambda: storage.read_json(loc), storage.display(loc), "ledger entry",
                       problems, required=False)
    if entry is not None and not isinstance(entry, dict):
        problems.append(Problem(storage.display(loc), "ledger entry is not an object"))
        return None
    return entry


def _read_record(folder: SweepFolder, tid: str, point: dict | None, in_current: bool,
                 has_folder: bool, entry: dict | None, problems: list[Problem]) -> TrialRecord:
    tf = folder.trial(tid)
    rec = TrialRecord(trial_id=tid, folder=tf, state="missing", in_current_grid=in_current)
    err = (entry or {}).get("error") or ""
    rec.error = str(err).strip().splitlines()[-1][:200] if err else ""
    if has_folder:
        doc = _read_json(tf.read_config, storage.display(tf.config_path), CONFIG, problems,
                         required=False)
        if isinstance(doc, dict) and isinstance(doc.get("config"), dict):
            rec.config = doc["config"]
            rec.manifest_hash = str(doc.get("manifest_hash") or "")
            rec.configuration = configuration_key(rec.config, rec.manifest_hash)
        elif doc is not None:
            problems.append(Problem(storage.display(tf.config_path), f"{CONFIG} holds no 'config'"))
        result = _read_json(tf.read_result, storage.display(tf.result_path), RESULT,
                            problems, required=False)
        if result is not None and not (isinstance(result, dict) and isinstance(result.get("best"), dict)):
            problems.append(Problem(storage.display(tf.result_path),
                                    f"{RESULT} has no 'best' record: trial skipped"))
            result = None
        rec.result = result
        rec.epochs, bad = tf.read_epochs_checked()
        for n, why in bad:
            problems.append(Problem(f"{storage.display(tf.epochs_path)}:{n}", f"line skipped: {why}"))
    source = rec.config if rec.config is not None else (point or {})
    rec.resolution = int(source["resolution"]) if source.get("resolution") is not None else None
    rec.model = resolve_model(str(source.get("model") or ""), rec.resolution)
    rec.seed = int(source["seed"]) if source.get("seed") is not None else None
    rec.task_mode = str(source.get("task_mode") or "")
    rec.task = str(source.get("task") or "") if rec.task_mode == "single" else ""
    state = (entry or {}).get("state") or ("pending" if entry else "missing")
    if rec.result is not None:
        state = "finished"
    elif state == "finished":   # the ledger says finished but the result record is not usable
        problems.append(Problem(storage.display(tf.result_path),
                                f"ledger says finished but {RESULT} is missing or unreadable"))
        state = "failed"
    rec.state = state if state in GRID_STATES else "pending"
    return rec


def _choose_main(sweep: SweepFile | None, records: list[TrialRecord],
                 problems: list[Problem], where: str) -> str:
    """The current sweep.json's configuration; without one, the configuration of most trials."""
    if sweep is not None and sweep.base_config and isinstance(sweep.base_config, dict):
        return configuration_key(sweep.base_config, sweep.manifest_hash)
    counted = Counter(r.configuration for r in records if r.configuration)
    if not counted:
        return ""
    main = sorted(counted.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    if len(counted) > 1:
        problems.append(Problem(where, f"no base configuration in {SWEEP_FILE}: the configuration of "
                                       f"most trials ({main}) is taken as the main one"))
    return main


def _configurations(sweep: SweepFile | None, records: list[TrialRecord], main: str
                    ) -> dict[str, Configuration]:
    out: dict[str, Configuration] = {}
    if sweep is not None and sweep.base_config and isinstance(sweep.base_config, dict):
        out[main] = Configuration(main, configuration_fields(sweep.base_config, sweep.manifest_hash),
                                  True)
    for r in records:
        if not r.configuration:
            continue
        if r.configuration not in out:
            out[r.configuration] = Configuration(
                r.configuration, configuration_fields(r.config or {}, r.manifest_hash),
                r.configuration == main)
        out[r.configuration].trial_ids.append(r.trial_id)
    reference = out[main].fields if main in out else {}
    for conf in out.values():
        if not conf.is_main:
            conf.differs = differences(conf.fields, reference)
    return out


# --- per task rows ------------------------------------------------------------------------------
def _task_rows(rec: TrialRecord, bootstrap: int, seed: int, predictions: dict,
               problems: list[Problem], names: dict[str, str]) -> list[dict]:
    """One row per task of a finished trial, with its DeLong (and bootstrap) interval from the best
    epoch's predictions, which must reproduce result.json's AUROC."""
    family, variant = model_family(rec.model)
    meta = {"trial_id": rec.trial_id, "resolution": rec.resolution, "model": rec.model,
            "family": family, "variant": variant, "seed": rec.seed, "task_mode": rec.task_mode,
            "configuration": rec.configuration}
    result_where = storage.display(rec.folder.result_path)
    frames: dict[int, pd.DataFrame | None] = {}
    rows = []
    for raw_key, best in sorted(rec.result["best"].items()):
        key = task_key(raw_key)
        try:
            epoch = int(best["epoch"])
            auroc = float(best["auroc"]) if best.get("auroc") is not None else math.nan
        except Exception as exc:
            problems.append(Problem(result_where, f"best record of {key} unreadable: {_one_line(exc)}"))
            continue
        row = {**meta, "task": task_name(key, names), "task_key": key, "best_epoch": epoch,
               "best_auroc": auroc, "ci_low": math.nan, "ci_high": math.nan, "ci_note": "",
               "auroc_from_predictions": math.nan, "n_pos": 0, "n_neg": 0}
        if bootstrap:
            row.update(boot_low=math.nan, boot_high=math.nan)
        rows.append(row)
        where = storage.display(rec.folder.predictions_path(epoch))
        if epoch not in frames:
            frames[epoch] = _predictions(rec.folder, epoch, where, problems)
        preds = frames[epoch]
        if preds is None:
            row["ci_note"] = "no predictions: no interval"
            continue
        p = preds[(preds["task"] == key) & preds["label"].notna()]
        labels = p["label"].to_numpy(dtype=float)
        probs = p["probability"].to_numpy(dtype=float)
        try:
            ci = delong.auroc_ci(labels, probs)
        except Exception as exc:   # one class only, bad labels or scores
            row["ci_note"] = f"no interval: {_one_line(exc)}"
            problems.append(Problem(where, f"{key}: no confidence interval: {_one_line(exc)}"))
            continue
        row.update(ci_low=ci.low, ci_high=ci.high, ci_note=ci.note, auroc_from_predictions=ci.auroc,
                   n_pos=ci.n_pos, n_neg=ci.n_neg)
        if not math.isnan(auroc) and abs(ci.auroc - auroc) > 1e-6:
            problems.append(Problem(where, f"{key}: AUROC from predictions {ci.auroc:.6f} != "
                                           f"{RESULT} {auroc:.6f}"))
        if bootstrap:
            lo, hi = delong.bootstrap_ci(labels, probs, n=bootstrap, seed=seed)
            row.update(boot_low=lo, boot_high=hi)
        dup = p["study_id"].duplicated(keep=False)
        if dup.any():   # one row per (study, task) is the contract: pairing leaves them out
            problems.append(Problem(where, f"{key}: {int(dup.sum())} rows with a repeated study_id "
                                           "left out of the paired tests"))
        p = p[~dup].sort_values("study_id")
        predictions[(rec.trial_id, key)] = p[["study_id", "label", "probability"]].reset_index(drop=True)
    return rows


def _predictions(tf: TrialFolder, epoch: int, where: str, problems: list[Problem]) -> pd.DataFrame | None:
    try:
        frame = tf.read_predictions(epoch)
        missing = {"study_id", "task", "label", "probability"} - set(frame.columns)
        if missing:
            raise ValueError(f"columns {sorted(missing)} missing")
    except FileNotFoundError:
        problems.append(Problem(where, "predictions missing: no confidence interval"))
        return None
    except Exception as exc:
        problems.append(Problem(where, f"predictions unreadable: {_one_line(exc)}"))
        return None
    frame = frame[["study_id", "task", "label", "probability"]].copy()
    frame["task"] = frame["task"].astype(str).map(task_key)
    frame["study_id"] = frame["study_id"].astype(str)
    return frame


def _sorted_trials(rows: list[dict], bootstrap: int) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=TRIAL_COLUMNS + (BOOTSTRAP_COLUMNS if bootstrap else []))
    if df.empty:
        return df
    return df.sort_values(["task_mode", "task_key", "resolution", "model", "seed"],
                          key=sort_key).reset_index(drop=True)


def sort_key(col: pd.Series) -> pd.Series:
    """Tasks in report order, everything else as it sorts."""
    return col.map(task_order) if col.name == "task_key" else col


# --- the loader ---------------------------------------------------------------------------------
def load_sweep(location: str, bootstrap: int = 0, seed: int = 0, progress: bool = False) -> SweepData:
    """Read a sweep's storage into the data model. Never raises for a bad record (it is listed
    instead); a location that does not exist is a UserError. ``bootstrap`` > 0 adds a stratified
    percentile bootstrap interval with that many resamples (seeded by ``seed``)."""
    location = str(location)
    if not storage.exists(location):
        raise UserError(f"sweep location {storage.display(location)} does not exist")
    folder = SweepFolder(location)
    problems: list[Problem] = []
    sweep = _read_sweep_file(folder, problems)
    name = (sweep.name if sweep else "") or posixpath.basename(
        storage.display(location).rstrip("/")) or "sweep"
    manifest = _load_manifest(sweep, problems)
    ledger_ids = folder.ledger_ids_on_storage()
    trial_dirs = folder.trial_ids_on_storage()
    order, points, current = _trial_order(sweep, folder, ledger_ids, trial_dirs, problems)
    dirs, in_ledger = set(trial_dirs), set(ledger_ids)

    iterator: Iterable[str] = order
    if progress:
        from tqdm import tqdm
        iterator = tqdm(order, desc="trials", unit="trial", file=sys.stderr)
    records = []
    for tid in iterator:
        entry = _ledger_entry(folder, tid, problems) if tid in in_ledger else None
        records.append(_read_record(folder, tid, points.get(tid), tid in current, tid in dirs,
                                    entry, problems))
    where = storage.display(folder.sweep_file)
    main = _choose_main(sweep, records, problems, where)
    for r in records:   # a current-grid trial that never started was planned on the base config
        if not r.configuration and r.in_current_grid and r.config is None:
            r.configuration = main
    configurations = _configurations(sweep, records, main)
    # An earlier run's trial that never started has no config to compare and no result: it is
    # not part of this sweep's answer (a current-grid one is: it is missing or pending).
    records = [r for r in records if r.configuration or r.in_current_grid or r.result is not None]

    names = {task_key(str(t)): str(t) for t in (manifest or {}).get("tasks") or []}
    predictions: dict[tuple[str, str], pd.DataFrame] = {}
    main_rows, other_rows, epoch_rows = [], [], []
    for r in records:
        is_main = r.configuration == main
        if not is_main:
            conf = configurations.get(r.configuration)
            why = ("; ".join(conf.differs) or "the same fields, another key") if conf else \
                f"its {CONFIG} is missing or unreadable"
            problems.append(Problem(r.folder.display(), f"another configuration than the sweep's "
                                                        f"({why}): listed separately, not pooled"))
        if is_main:
            epoch_rows += [{**r.params(), "state": r.state, **e} for e in r.epochs]
        if r.result is not None:
            target = main_rows if is_main else other_rows
            target += _task_rows(r, bootstrap, seed, predictions if is_main else {}, problems, names)
    epochs = pd.DataFrame(epoch_rows)
    if not epochs.empty:
        epochs = epochs.sort_values(["trial_id", "epoch"]).reset_index(drop=True)
    return SweepData(location=location, name=str(name), sweep=sweep, manifest=manifest,
                     main_configuration=main, configurations=configurations, records=records,
                     trials=_sorted_trials(main_rows, bootstrap),
                     other_trials=_sorted_trials(other_rows, bootstrap), epochs=epochs,
                     predictions=predictions, problems=problems, bootstrap=bootstrap)


def usable(trials: pd.DataFrame) -> pd.DataFrame:
    """Rows with a best-epoch AUROC (what every summary averages)."""
    return trials[trials["best_auroc"].notna()] if not trials.empty else trials

