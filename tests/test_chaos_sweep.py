"""Chaos on a running sweep (shared local Ray, 2 CPUs): a trial's worker process SIGKILLed
mid-trial is retried by Tune, continues from its checkpoint, and the ledger tells the story."""
from __future__ import annotations

import io
import os
import signal

import pytest

from common import storage
from orchestrator import ledger
from test_sweep_helpers import (FakeTrial, local_ray, make_tiny_store, read_jsonl, run_small_sweep,
                                stable_result)

pytestmark = pytest.mark.slow

FAST = {"epochs_frozen": 1, "epochs_unfrozen": 2, "weights": "none"}


class KillWorkerOnce(FakeTrial):
    """FakeTrial whose worker process SIGKILLs itself after epoch 1 (checkpointed), once."""

    def __call__(self, cfg, trial_dir, on_epoch=None):
        marker = os.path.join(self.marker_dir, "killed-once")

        def hook(record):
            if on_epoch is not None:
                on_epoch(record)
            if record["epoch"] == 1 and not os.path.exists(marker):
                open(marker, "a").close()
                os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(cfg, trial_dir, on_epoch=hook)


@pytest.fixture(scope="module")
def ray_shared():
    with local_ray(by_value_modules=(__name__,)):
        yield


def test_worker_sigkill_is_retried_from_its_checkpoint(ray_shared, tmp_path):
    from trainer.config import TrainConfig
    store = make_tiny_store(tmp_path / "store", resolutions=(32,))
    out = io.StringIO()
    res = run_small_sweep(store, tmp_path / "sweeps", "chaos", resolutions=(32,), models=("resnet18",),
                          seeds=(0,), config=FAST, trial_fn=KillWorkerOnce(marker_dir=str(tmp_path)),
                          max_failures=1, cpus_per_trial=1, progress="lines", aggregate=False,
                          reuse_actors=False, out=out)
    assert res.exit_code == 0, out.getvalue()
    (tid,) = res.trial_ids
    entry = ledger.read_entry(res.sweep_loc, tid)
    assert entry["state"] == "finished" and entry["attempts"] == 2
    first, second = entry["history"]
    assert first["state"] == "failed" and "worker died" in first["error"]
    assert second["state"] == "finished" and second["resumed_from_epoch"] == 1
    folder = ledger.trial_dir(res.sweep_loc, tid)
    runs = read_jsonl(storage.join(folder, "executions.jsonl"))
    assert [r["epoch"] for r in runs] == [1, 2, 3]           # epoch 1 was not trained twice
    assert runs[0]["pid"] != runs[1]["pid"]                  # the retry ran in a new process
    cfg = TrainConfig.from_dict({**FAST, "store": store, "model": "resnet18", "resolution": 32})
    reference = FakeTrial()(cfg, str(tmp_path / "reference"))
    from common.trial_folder import TrialFolder
    assert stable_result(TrialFolder(folder).read_result()) == stable_result(reference)


def test_tune_itself_failing_closes_the_attempts_and_a_rerun_finishes(ray_shared, tmp_path, monkeypatch):
    """Ray Tune raising on its own before any trial started (on a full disk it raised ``EOFError:
    Ran out of input``): the driver survives and prints the cause, the exit code is 1 with the
    re-run advice, no entry is left ``running`` (never-started trials stay ``pending``), and the
    same command then finishes every trial."""
    from ray import tune
    store = make_tiny_store(tmp_path / "store", resolutions=(32,))
    real_fit = tune.Tuner.fit

    def broken_fit(self):
        raise EOFError("Ran out of input")

    monkeypatch.setattr(tune.Tuner, "fit", broken_fit)
    out = io.StringIO()
    args = dict(resolutions=(32,), models=("resnet18",), seeds=(0, 1), config=FAST,
                cpus_per_trial=1, progress="lines", aggregate=False)
    res = run_small_sweep(store, tmp_path / "sweeps", "tune-fails", trial_fn=FakeTrial(), out=out, **args)
    text = out.getvalue()
    assert res.exit_code == 1, text
    assert "the sweep stopped: EOFError: Ran out of input" in text and "re-run the same command" in text
    entries = ledger.read_all(res.sweep_loc)
    assert {e["state"] for e in entries.values()} == {"pending"} and len(entries) == 2

    monkeypatch.setattr(tune.Tuner, "fit", real_fit)
    again = run_small_sweep(store, tmp_path / "sweeps", "tune-fails", trial_fn=FakeTrial(),
                            out=io.StringIO(), **args)
    assert again.exit_code == 0
    assert {e["state"] for e in ledger.read_all(res.sweep_loc).values()} == {"finished"}


def test_ctrl_c_records_interrupted_and_gives_our_advice_only(tmp_path):
    """SIGINT to a real driver (the command line, embedded Ray, the real trainer): exit 130, the
    running trial recorded as interrupted, our re-run advice and no Tuner.restore advice."""
    import subprocess
    import sys
    import time

    from test_sweep_helpers import ray_env
    mp = pytest.MonkeyPatch()
    base = ray_env(mp)
    try:
        store = make_tiny_store(tmp_path / "store", resolutions=(32,))
        storage_loc = tmp_path / "sweeps"
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        cmd = [sys.executable, "-m", "orchestrator.sweep", "--store", store, "--storage",
               str(storage_loc), "--name", "ctrlc", "--resolutions", "32", "--models", "smallcnn",
               "--seeds", "0", "--weights", "none", "--epochs-frozen", "1", "--epochs-unfrozen", "500",
               "--num-cpus", "1", "--progress", "lines", "--no-aggregate", "--log", "none"]
        proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=dict(os.environ))
        sweep_loc = str(storage_loc / "ctrlc")
        deadline = time.time() + 400
        while time.time() < deadline:
            entries = ledger.read_all(sweep_loc) if os.path.isdir(sweep_loc) else {}
            if any(e["state"] == "running" for e in entries.values()):
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        else:
            proc.kill()
            pytest.fail("the trial never started")
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if "proc" in locals() and proc.poll() is None:
            proc.kill()
        mp.undo()
        import shutil
        shutil.rmtree(base, ignore_errors=True)
    assert proc.returncode == 130, output[-3000:]
    assert "re-run the same command" in output and "Tuner.restore" not in output, output[-3000:]
    (entry,) = ledger.read_all(sweep_loc).values()
    assert entry["state"] == "interrupted", entry
    assert "SystemExit: 0" not in (entry["error"] or "") and entry["history"][-1]["state"] == "interrupted"
    from common.sweep_folder import SweepFolder
    assert not os.path.exists(SweepFolder(sweep_loc).lock_file)   # released on the way out
