"""The ledger's rules: the trial folder outranks the entry, damaged entries are rebuilt, attempts cut
short are marked interrupted, and each way an attempt ends lands in the ledger as what it was."""
from __future__ import annotations

import errno
import json

import pytest

from common import storage
from common.cli import UserError
from common.sweep_folder import SweepFolder
from orchestrator import ledger, trainable

PARAMS = {"resolution": 32, "model": "resnet18", "seed": 0, "task_mode": "multi", "task": ""}
RESULT = {"trial_id": "t", "best": {"cardiomegaly": {"epoch": 2, "auroc": 0.75},
                                    "edema": {"epoch": 1, "auroc": 0.25}},
          "history": [{"epoch": 1}, {"epoch": 2}], "seconds": 3.0, "images_per_s": 10.0,
          "peak_memory_bytes": 0, "device": "cpu", "finished": "2026-11-30T00:00:00"}


def trial_folder(sweep_loc, tid, *, result=False, config=True):
    folder = SweepFolder(sweep_loc).trial(tid)
    if config:
        folder.write_config({"trial_id": tid, "config": {**PARAMS, "lr": 0.1}, "manifest_hash": "m"})
    if result:
        folder.write_result({**RESULT, "trial_id": tid})
    return folder


def test_result_json_means_finished_whatever_the_entry_says(tmp_path):
    loc = str(tmp_path / "sweep")
    ledger.register(loc, "a", PARAMS, "run1")
    ledger.mark_running(loc, "a", run_id="run1", node="n", gpu_ids=[], cuda_visible_devices=None)
    ledger.mark_failed(loc, "a", "RuntimeError: after result.json, before the ledger")
    ledger.register(loc, "b", PARAMS, "run1")
    trial_folder(loc, "a", result=True)
    trial_folder(loc, "b", result=False)
    plan = ledger.plan(loc, ["a", "b"])
    assert plan.finished == ["a"] and plan.to_run == ["b"]
    ledger.adopt_finished(loc, "a")
    entry = ledger.read_entry(loc, "a")
    assert entry["state"] == "finished" and entry["result"]["best_auroc_mean"] == 0.5


@pytest.mark.parametrize("folder_has, state", [("result", "finished"), ("config", "interrupted"),
                                               ("nothing", "pending")])
def test_damaged_entry_is_named_and_rebuilt_from_the_trial_folder(tmp_path, folder_has, state):
    loc = str(tmp_path / "sweep")
    ledger.register(loc, "t1", PARAMS, "run1")
    if folder_has != "nothing":
        trial_folder(loc, "t1", result=folder_has == "result")
    entry_file = ledger.entry_location(loc, "t1")
    whole = storage.read_bytes(entry_file)
    storage.write_bytes(entry_file, whole[:len(whole) // 2])        # a torn write
    warnings = []
    entries = ledger.read_all(loc, warn=warnings.append)
    assert len(warnings) == 1 and storage.display(entry_file) in warnings[0]
    assert f"rebuilt from the trial folder as {state}" in warnings[0]
    rebuilt = entries["t1"]
    assert rebuilt["state"] == state and rebuilt["rebuilt"]
    assert rebuilt["params"] == (PARAMS if folder_has != "nothing" else {})
    if state == "finished":
        assert rebuilt["result"]["best"] == RESULT["best"]
    assert json.loads(storage.read_bytes(entry_file))["state"] == state   # written back whole
    assert ledger.read_all(loc, warn=warnings.append)["t1"]["state"] == state and len(warnings) == 1
    # registering again fills in the grid parameters the folder could not give
    assert ledger.register(loc, "t1", PARAMS, "run2")["params"] == PARAMS


def test_entry_of_another_trial_or_not_an_object_is_damaged(tmp_path):
    loc = str(tmp_path / "sweep")
    storage.write_json(ledger.entry_location(loc, "x"), {"trial_id": "y", "state": "running"})
    storage.write_bytes(ledger.entry_location(loc, "z"), b"[1, 2]")
    warnings = []
    entries = ledger.read_all(loc, warn=warnings.append)
    assert sorted(entries) == ["x", "z"] and len(warnings) == 2
    assert all(e["state"] == "pending" for e in entries.values())


def start(loc, tid, run_id):
    ledger.register(loc, tid, PARAMS, run_id)
    return ledger.mark_running(loc, tid, run_id=run_id, node="n", gpu_ids=[],
                               cuda_visible_devices=None, resumed_from_epoch=0)


def test_attempts_of_a_dead_driver_are_marked_interrupted(tmp_path):
    loc = str(tmp_path / "sweep")
    start(loc, "old", "run1")          # its driver was SIGKILLed: the entry stayed running
    start(loc, "mine", "run2")
    ledger.register(loc, "new", PARAMS, "run2")
    entries = ledger.read_all(loc)
    stale = ledger.mark_stale_interrupted(loc, entries, "run2")
    assert stale == ["old"]
    old = ledger.read_entry(loc, "old")
    assert old["state"] == "interrupted" and "driver run run1" in old["error"]
    assert old["history"][-1]["state"] == "interrupted" and old["history"][-1]["ended"]
    assert entries["old"]["state"] == "interrupted"
    assert ledger.read_entry(loc, "mine")["state"] == "running"
    assert ledger.plan(loc, ["old", "mine", "new"]).to_run == ["old", "mine", "new"]


def test_an_attempt_whose_worker_died_is_closed_when_tune_retries_it(tmp_path):
    loc = str(tmp_path / "sweep")
    start(loc, "t", "run1")                                # the worker is SIGKILLed: no close
    entry = ledger.mark_running(loc, "t", run_id="run1", node="n2", gpu_ids=[],
                                cuda_visible_devices=None, resumed_from_epoch=1)
    first, second = entry["history"]
    assert first["state"] == "failed" and "worker died" in first["error"] and first["ended"]
    assert second["state"] == "running" and entry["attempts"] == 2


def test_close_run_marks_only_this_runs_running_entries(tmp_path):
    loc = str(tmp_path / "sweep")
    start(loc, "a", "run2")
    start(loc, "b", "run2")
    start(loc, "c", "run1")
    trial_folder(loc, "b", result=True)   # died between result.json and the ledger
    closed = ledger.close_run(loc, ["a", "b", "c"], "run2", "interrupted", "interrupted by Ctrl-C")
    assert closed == ["a"]
    assert ledger.read_entry(loc, "a")["state"] == "interrupted"
    assert ledger.read_entry(loc, "a")["history"][-1]["error"] == "interrupted by Ctrl-C"
    assert ledger.read_entry(loc, "b")["state"] == "finished"
    assert ledger.read_entry(loc, "c")["state"] == "running"


# --- how an attempt ends, through the trainable (without Ray: placement and config stubbed) ------
class Raises:
    def __init__(self, exc):
        self.exc = exc

    def __call__(self, cfg, trial_dir, on_epoch=None):
        raise self.exc


def enospc() -> OSError:
    try:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/sweeps/s/x.tmp-1")
    except OSError as inner:
        try:
            raise RuntimeError("cannot write the checkpoint") from inner
        except RuntimeError as outer:
            return outer


@pytest.fixture
def run_attempt(tmp_path, monkeypatch):
    monkeypatch.setattr(trainable, "placement", lambda: {"node": "n", "node_id": "i", "gpu_ids": [],
                                                          "cuda_visible_devices": None})
    loc = str(tmp_path / "sweep")

    def run(exc):
        ledger.register(loc, "t", PARAMS, "run1")
        fn = trainable.make_trainable(Raises(exc))
        spec = trainable.trial_spec("t", {"store": "x"}, loc, "run1", PARAMS)
        fn({"trial": spec})
        return ledger.read_entry(loc, "t"), SweepFolder(loc).trial("t")
    run.loc = loc
    return run


def test_deterministic_errors_fail_once_and_are_not_retried(run_attempt):
    entry, folder = run_attempt(UserError("store /x does not verify at 32 px: shard 3"))
    assert entry["state"] == "failed" and entry["attempts"] == 1    # returned: Tune does not retry
    assert entry["error"].startswith("UserError: store /x does not verify at 32 px")
    assert "not retried" in entry["error"]
    assert "Traceback" in storage.read_bytes(folder.error_path).decode()


def test_a_full_disk_names_its_cause_and_is_not_retried(run_attempt):
    entry, _ = run_attempt(enospc())
    assert entry["state"] == "failed"
    assert entry["error"].startswith("OSError: No space left on device (/data/sweeps/s/x.tmp-1)")


def test_infrastructure_errors_are_raised_for_tune_to_retry(run_attempt):
    with pytest.raises(RuntimeError, match="worker lost"):
        run_attempt(RuntimeError("worker lost"))


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(0)])
def test_ctrl_c_and_a_stopped_actor_are_interrupted_not_failed(run_attempt, exc):
    with pytest.raises(type(exc)):
        run_attempt(exc)
    entry = ledger.read_entry(run_attempt.loc, "t")
    assert entry["state"] == "interrupted" and entry["history"][-1]["state"] == "interrupted"
    assert type(exc).__name__ in entry["error"] and "SystemExit: 0" not in entry["error"]
