"""The trial ledger: one JSON file per trial under ``STORAGE/SWEEP/ledger/``, the truth for resume.

Ray Tune's experiment state lags storage by seconds and its restore has known bugs
(../shared/RAY_NOTES.md), so the sweep decides what to run from this ledger and the trial folders,
never from Tune. Each file is written whole through ``common.storage`` (atomic on a local or
shared filesystem, one PUT on S3) and has one writer at a time: the driver before the trial starts,
then the trial's own worker.

States: ``pending`` (registered, not started), ``running`` (a worker is on it), ``finished``
(``result.json`` exists; never run again), ``failed`` (the last attempt raised). A ``running``
entry whose driver run is not the current one was interrupted (driver killed, node lost): like a
failed trial it is run again, and ``run_trial`` continues from the newest checkpoint in its folder.
"""
from __future__ import annotations

import datetime as _dt
import os
import socket
from dataclasses import dataclass
from typing import Any

from common import storage

STATES = ("pending", "running", "finished", "failed")
LEDGER_DIR = "ledger"
TRIALS_DIR = "trials"
MAX_HISTORY = 50   # attempts kept per entry (a trial crashing in a loop must not grow its file forever)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def entry_location(sweep_loc: str, trial_id: str) -> str:
    return storage.join(sweep_loc, LEDGER_DIR, f"{trial_id}.json")


def trial_dir(sweep_loc: str, trial_id: str) -> str:
    return storage.join(sweep_loc, TRIALS_DIR, trial_id)


def read_entry(sweep_loc: str, trial_id: str) -> dict | None:
    try:
        return storage.read_json(entry_location(sweep_loc, trial_id))
    except FileNotFoundError:
        return None


def read_all(sweep_loc: str) -> dict[str, dict]:
    """Every ledger entry by trial id (empty for a new sweep)."""
    out = {}
    for name in storage.listdir(storage.join(sweep_loc, LEDGER_DIR)):
        if name.endswith(".json") and ".tmp-" not in name:
            entry = read_entry(sweep_loc, name[:-len(".json")])
            if entry is not None:
                out[entry["trial_id"]] = entry
    return out


def _write(sweep_loc: str, entry: dict) -> dict:
    entry["updated"] = now()
    storage.write_json(entry_location(sweep_loc, entry["trial_id"]), entry)
    return entry


def register(sweep_loc: str, trial_id: str, params: dict, run_id: str) -> dict:
    """Create a ``pending`` entry for a new trial; an existing entry is returned unchanged."""
    entry = read_entry(sweep_loc, trial_id)
    if entry is not None:
        return entry
    return _write(sweep_loc, {
        "trial_id": trial_id, "params": params, "state": "pending", "attempts": 0,
        "created": now(), "started": None, "ended": None, "node": None, "gpu_ids": [],
        "cuda_visible_devices": None, "driver_run": run_id, "error": None, "result": None,
        "history": [],
    })


def _load(sweep_loc: str, trial_id: str) -> dict:
    entry = read_entry(sweep_loc, trial_id)
    if entry is None:   # a trial started outside a registered sweep (e.g. a test trainable)
        entry = {"trial_id": trial_id, "params": {}, "state": "pending", "attempts": 0,
                 "created": now(), "history": [], "result": None, "error": None}
    return entry


def mark_running(sweep_loc: str, trial_id: str, *, run_id: str, node: str, gpu_ids: list,
                 cuda_visible_devices: str | None, node_id: str | None = None,
                 resumed_from_epoch: int = 0) -> dict:
    entry = _load(sweep_loc, trial_id)
    entry.update(state="running", attempts=int(entry.get("attempts", 0)) + 1, started=now(),
                 ended=None, node=node, node_id=node_id, gpu_ids=list(gpu_ids),
                 cuda_visible_devices=cuda_visible_devices, driver_run=run_id, error=None,
                 pid=os.getpid(), host=socket.gethostname())
    entry.setdefault("history", []).append({
        "attempt": entry["attempts"], "state": "running", "started": entry["started"], "ended": None,
        "node": node, "node_id": node_id, "gpu_ids": list(gpu_ids),
        "cuda_visible_devices": cuda_visible_devices, "driver_run": run_id, "resumed_from_epoch": resumed_from_epoch})
    entry["history"] = entry["history"][-MAX_HISTORY:]
    return _write(sweep_loc, entry)


def _close_attempt(entry: dict, state: str, error: str | None = None) -> None:
    entry["state"] = state
    entry["ended"] = now()
    if entry.get("history"):
        last = entry["history"][-1]
        last["state"] = state
        last["ended"] = entry["ended"]
        if error:
            last["error"] = error


def mark_finished(sweep_loc: str, trial_id: str, summary: dict) -> dict:
    entry = _load(sweep_loc, trial_id)
    _close_attempt(entry, "finished")
    entry["result"] = summary
    entry["error"] = None
    return _write(sweep_loc, entry)


def mark_failed(sweep_loc: str, trial_id: str, error: str) -> dict:
    entry = _load(sweep_loc, trial_id)
    _close_attempt(entry, "failed", error)
    entry["error"] = error
    return _write(sweep_loc, entry)


def result_summary(result: dict) -> dict:
    """What the ledger keeps of a trial's result record: best AUROC per task and the cost."""
    best = result.get("best") or {}
    aurocs = {k: v.get("auroc") for k, v in best.items() if isinstance(v, dict)}
    vals = [a for a in aurocs.values() if isinstance(a, (int, float))]
    history = result.get("history") or []
    return {
        "best": best,
        "best_auroc_mean": (sum(vals) / len(vals)) if vals else None,
        "epochs": len(history),
        "seconds": result.get("seconds"),
        "images_per_s": result.get("images_per_s"),
        "peak_memory_bytes": result.get("peak_memory_bytes"),
        "device": result.get("device"),
        "finished": result.get("finished"),
    }


@dataclass
class Plan:
    """What a (re-)run does with each trial of the grid."""
    to_run: list[str]          # new, failed or interrupted trials, in grid order
    finished: list[str]        # never run again
    resumed: list[str]         # the subset of to_run that has a ledger entry (continues on storage)


def effective_state(entry: dict | None, sweep_loc: str, trial_id: str) -> str:
    """The state a new driver should act on: 'finished' also when result.json exists although the
    worker died before writing the ledger (the trial folder is the truth), 'new' without an entry."""
    if entry is not None and entry.get("state") == "finished":
        return "finished"
    if storage.exists(storage.join(trial_dir(sweep_loc, trial_id), "result.json")):
        return "finished"
    if entry is None:
        return "new"
    return entry.get("state", "pending")


def plan(sweep_loc: str, trial_ids: list[str], entries: dict[str, dict] | None = None) -> Plan:
    entries = read_all(sweep_loc) if entries is None else entries
    to_run, finished, resumed = [], [], []
    for tid in trial_ids:
        state = effective_state(entries.get(tid), sweep_loc, tid)
        if state == "finished":
            finished.append(tid)
        else:
            to_run.append(tid)
            if state != "new":
                resumed.append(tid)
    return Plan(to_run=to_run, finished=finished, resumed=resumed)


def adopt_finished(sweep_loc: str, trial_id: str) -> None:
    """Mark finished a trial whose folder holds result.json but whose ledger entry does not say so."""
    entry = read_entry(sweep_loc, trial_id)
    if entry is not None and entry.get("state") == "finished":
        return
    result = storage.read_json(storage.join(trial_dir(sweep_loc, trial_id), "result.json"))
    mark_finished(sweep_loc, trial_id, result_summary(result))


def counts(entries: dict[str, dict], trial_ids: list[str]) -> dict[str, int]:
    out = {s: 0 for s in STATES}
    for tid in trial_ids:
        state = (entries.get(tid) or {}).get("state", "pending")
        out[state] = out.get(state, 0) + 1
    return out


def as_rows(entries: dict[str, dict]) -> list[dict[str, Any]]:
    """Flat rows (one per trial) for tables and the dry run."""
    rows = []
    for tid, e in sorted(entries.items()):
        p = e.get("params") or {}
        r = e.get("result") or {}
        rows.append({"trial_id": tid, "state": e.get("state"), "attempts": e.get("attempts", 0),
                     "resolution": p.get("resolution"), "model": p.get("model"),
                     "seed": p.get("seed"), "task": p.get("task") or "",
                     "best_auroc_mean": r.get("best_auroc_mean"), "node": e.get("node"),
                     "gpu_ids": e.get("gpu_ids")})
    return rows
