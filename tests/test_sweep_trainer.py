"""End to end with the real trainer on the tiny phantom store: a sweep, a failure, the re-run
that finishes only the failed trial with exactly the result of an uninterrupted run, and the
aggregated report."""
from __future__ import annotations

import io
import json
import os

import pytest

from common import storage
from orchestrator import ledger
from test_sweep_helpers import RealTrialFailingOnce, local_ray, run_small_sweep, stable_result

CONFIG = {"epochs_frozen": 1, "epochs_unfrozen": 1, "weights": "none", "max_train_studies": 40,
          "max_valid_studies": 30, "device": "cpu", "workers": 0}


@pytest.fixture(scope="module")
def ray_shared():
    with local_ray():
        yield


def sweep(store, storage_loc, name, **kw):
    out = io.StringIO()
    kw.setdefault("config", dict(CONFIG))
    kw.setdefault("resolutions", (32,))
    res = run_small_sweep(store, storage_loc, name, models=("resnet18",), seeds=(0,),
                          cpus_per_trial=1, progress="lines", out=out, **kw)
    return res, out.getvalue()


@pytest.mark.slow
def test_real_trials_fail_rerun_exact_and_report(ray_shared, tiny_phantom_store, tmp_path):
    store = tiny_phantom_store
    failing = RealTrialFailingOnce(str(tmp_path), epoch=1)
    res, text = sweep(store, tmp_path, "real", trial_fn=failing, max_failures=0, aggregate=False)
    assert res.exit_code == 1 and len(res.failed) == 1, text
    (tid,) = res.failed
    entry = ledger.read_entry(res.sweep_loc, tid)
    assert entry["state"] == "failed" and "injected failure after epoch 1" in entry["error"]
    folder = ledger.trial_dir(res.sweep_loc, tid)
    assert storage.exists(storage.join(folder, "checkpoints", "latest.pt"))
    assert not storage.exists(storage.join(folder, "result.json"))

    again, text = sweep(store, tmp_path, "real", trial_fn=failing, max_failures=0,
                        results_dir=str(tmp_path / "report"))
    assert again.exit_code == 0 and again.ran == [tid], text
    entry = ledger.read_entry(res.sweep_loc, tid)
    assert entry["attempts"] == 2 and entry["history"][-1]["resumed_from_epoch"] == 1
    assert entry["result"]["epochs"] == 2 and entry["result"]["best_auroc_mean"] is not None
    log = storage.read_bytes(storage.join(folder, "log.txt")).decode()
    assert "resumed after epoch 1" in log
    assert "report:" in text and os.path.isdir(tmp_path / "report")

    clean, _ = sweep(store, tmp_path, "real-clean", aggregate=False)   # the real run_trial
    assert clean.trial_ids == [tid] and clean.exit_code == 0
    resumed = storage.read_json(storage.join(folder, "result.json"))
    reference = storage.read_json(storage.join(ledger.trial_dir(clean.sweep_loc, tid), "result.json"))
    assert stable_result(resumed) == stable_result(reference)
    assert json.dumps(resumed["best"], sort_keys=True) == json.dumps(reference["best"], sort_keys=True)
