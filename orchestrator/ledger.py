"""The trial ledger: one JSON file per trial under ``STORAGE/SWEEP/ledger/``, the truth for resume.

Ray Tune's experiment state lags storage by seconds and its restore has known bugs, so the sweep
decides what to run from this ledger and the trial folders, never from Tune. Each file is written
whole through ``common.storage`` (atomic on a local or shared filesystem, one PUT on S3) and has
one writer at a time: the driver (one per sweep, ``orchestrator.lock``) before the trial starts,
then the trial's own worker.

States: ``pending`` (registered, not started), ``running`` (a worker is on it), ``finished``
(``result.json`` exists; never run again), ``failed`` (the last attempt raised), ``interrupted``
(the last attempt was cut short: Ctrl-C, or its driver was killed). A ``running`` entry of an
earlier driver run was cut short by that driver's death: the next driver marks it
``interrupted`` (:func:`mark_stale_interrupted`); like failed trials these run again, and
``run_trial`` continues from the newest checkpoint in the folder.

The trial folder outranks the ledger: ``result.json`` means finished whatever the entry says, and
an entry that cannot be read is named and rebuilt from the folder (:func:`read_all`).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
from dataclasses import dataclass
from typing import Callable

from common import storage
from common.sweep_folder import SweepFolder
from common.trial_folder import TrialFolder

STATES = ("pending", "running", "finished", "failed", "interrupted")
MAX_HISTORY = 50   # attempts kept per entry (a trial crashing in a loop must not grow its file forever)
#: Grid parameters kept in an entry (rebuilt from a trial's config.json when the entry is damaged).
PARAM_KEYS = ("resolution", "model", "seed", "task_mode", "task")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def entry_location(sweep_loc: str, trial_id: str) -> str:
    return SweepFolder(sweep_loc).ledger_entry(trial_id)


def trial_dir(sweep_loc: str, trial_id: str) -> str:
    return SweepFolder(sweep_loc).trial(trial_id).location


class DamagedEntry(ValueError):
    """A ledger file that is not a readable entry (torn write, disk error, edited by hand)."""


def read_entry(sweep_loc: str, trial_id: str) -> dict | None:
    """The entry, None when absent; DamagedEntry naming the file when it cannot be used."""
    loc = entry_location(sweep_loc, trial_id)
    try:
        data = storage.read_bytes(loc)
    except FileNotFoundError:
        return None
    try:
        entry = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedEntry(f"ledger entry {storage.display(loc)} is damaged ({exc})") from None
    if not isinstance(entry, dict) or entry.get("trial_id") != trial_id or "state" not in entry:
        raise DamagedEntry(f"ledger entry {storage.display(loc)} is not an entry of {trial_id}")
    return entry


def rebuild_entry(sweep_loc: str, trial_id: str) -> dict:
    """A fresh entry from the trial folder (the truth): finished with its result summary when
    result.json is there, interrupted when the folder holds a started trial, else pending. The
    attempt history of the damaged entry is lost; ``rebuilt`` says so."""
    folder = SweepFolder(sweep_loc).trial(trial_id)
    params: dict = {}
    try:
        config = folder.read_config().get("config") or {}
        params = {k: config[k] for k in PARAM_KEYS if k in config}
    except (FileNotFoundError, ValueError, AttributeError):
        pass
    entry = _new_entry(trial_id, params, run_id=None)
    entry["rebuilt"] = now()
    try:
        if folder.is_finished():
            entry.update(state="finished", result=result_summary(folder.read_result()))
        elif folder.exists():
            entry.update(state="interrupted",
                         error="ledger entry was damaged; rebuilt from the trial folder")
    except ValueError:   # an unreadable result.json: run it again
        entry.update(state="interrupted", error="result.json unreadable")
    return _write(sweep_loc, entry)


def read_all(sweep_loc: str, warn: Callable[[str], None] = _warn) -> dict[str, dict]:
    """Every ledger entry by trial id (empty for a new sweep). A damaged entry is named (``warn``)
    and rebuilt from its trial folder, so one torn file never stops the sweep."""
    out = {}
    for name in storage.listdir(SweepFolder(sweep_loc).ledger_dir):
        if not name.endswith(".json") or ".tmp-" in name:
            continue
        trial_id = name[:-len(".json")]
        try:
            entry = read_entry(sweep_loc, trial_id)
        except DamagedEntry as exc:
            entry = rebuild_entry(sweep_loc, trial_id)
            warn(f"{exc}; rebuilt from the trial folder as {entry['state']} (its attempt history "
                 f"is lost)")
        if entry is not None:
            out[trial_id] = entry
    return out


def _write(sweep_loc: str, entry: dict) -> dict:
    entry["updated"] = now()
    storage.write_json(entry_location(sweep_loc, entry["trial_id"]), entry)
    return entry


def _new_entry(trial_id: str, params: dict, run_id: str | None) -> dict:
    return {"trial_id": trial_id, "params": params, "state": "pending", "attempts": 0,
            "created": now(), "started": None, "ended": None, "node": None, "gpu_ids": [],
            "cuda_visible_devices": None, "driver_run": run_id, "error": None, "result": None,
            "history": []}


def register(sweep_loc: str, trial_id: str, params: dict, run_id: str) -> dict:
    """Create a ``pending`` entry for a new trial; an existing entry is returned unchanged."""
    try:
        entry = read_entry(sweep_loc, trial_id)
    except DamagedEntry:
        entry = rebuild_entry(sweep_loc, trial_id)
    if entry is not None:
        if not entry.get("params"):
            entry["params"] = params
            _write(sweep_loc, entry)
        return entry
    return _write(sweep_loc, _new_entry(trial_id, params, run_id))


def _load(sweep_loc: str, trial_id: str) -> dict:
    try:
        entry = read_entry(sweep_loc, trial_id)
    except DamagedEntry:
        entry = None   # the worker is about to write a whole new state anyway
    if entry is None:   # a trial started outside a registered sweep (e.g. a test trainable)
        entry = _new_entry(trial_id, {}, run_id=None)
    return entry


def mark_running(sweep_loc: str, trial_id: str, *, run_id: str, node: str, gpu_ids: list,
                 cuda_visible_devices: str | None, node_id: str | None = None,
                 resumed_from_epoch: int = 0) -> dict:
    entry = _load(sweep_loc, trial_id)
    history = entry.get("history") or []
    if history and history[-1].get("state") == "running":
        # the previous attempt never closed itself: its worker process died (killed, out of
        # memory, node lost) and Tune is retrying it
        history[-1].update(state="failed", ended=now(),
                           error="the worker died mid-attempt (killed, out of memory, or node lost)")
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


def mark_interrupted(sweep_loc: str, trial_id: str, reason: str) -> dict:
    entry = _load(sweep_loc, trial_id)
    _close_attempt(entry, "interrupted", reason)
    entry["error"] = reason
    return _write(sweep_loc, entry)


def set_resumed_from(sweep_loc: str, trial_id: str, epoch: int) -> dict:
    """Correct the current attempt's ``resumed_from_epoch`` (what the trainer really continued
    after, known once it reports its first epoch)."""
    entry = _load(sweep_loc, trial_id)
    if entry.get("history"):
        entry["history"][-1]["resumed_from_epoch"] = int(epoch)
    return _write(sweep_loc, entry)


def mark_stale_interrupted(sweep_loc: str, entries: dict[str, dict], run_id: str) -> list[str]:
    """Entries still ``running`` for another driver run: that driver died mid-attempt (there is
    one driver per sweep, and this one holds the lock). Marked interrupted; returns their ids."""
    stale = [tid for tid, e in entries.items()
             if e.get("state") == "running" and e.get("driver_run") != run_id]
    for tid in stale:
        run = entries[tid].get("driver_run") or "?"
        entries[tid] = mark_interrupted(
            sweep_loc, tid, f"interrupted: driver run {run} ended before this attempt did "
                            f"(driver killed, or its machine lost)")
    return stale


def close_run(sweep_loc: str, trial_ids: list[str], run_id: str, state: str, reason: str) -> list[str]:
    """At the end of a driver run: entries of this run still ``running`` get ``state``
    (``failed`` after a worker death, ``interrupted`` after Ctrl-C) and ``reason``."""
    assert state in ("failed", "interrupted"), state
    closed = []
    for tid in trial_ids:
        try:
            entry = read_entry(sweep_loc, tid)
        except DamagedEntry:
            continue
        if entry is None or entry.get("state") != "running" or entry.get("driver_run") != run_id:
            continue
        if SweepFolder(sweep_loc).trial(tid).is_finished():
            adopt_finished(sweep_loc, tid)
            continue
        (mark_interrupted if state == "interrupted" else mark_failed)(sweep_loc, tid, reason)
        closed.append(tid)
    return closed


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
    if SweepFolder(sweep_loc).trial(trial_id).is_finished():
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
    try:
        entry = read_entry(sweep_loc, trial_id)
    except DamagedEntry:
        entry = None
    if entry is not None and entry.get("state") == "finished":
        return
    result = SweepFolder(sweep_loc).trial(trial_id).read_result()
    mark_finished(sweep_loc, trial_id, result_summary(result))
