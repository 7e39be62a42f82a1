"""The sweep with its storage on ``s3://`` (moto's S3 server on 127.0.0.1): ledger, trial folders
and Tune's own folder all land in the bucket; a retried trial resumes from its S3 checkpoint."""
from __future__ import annotations

import io
import shutil

import pytest

from common import storage
from orchestrator import ledger
from test_sweep_helpers import (FakeTrial, by_value, make_tiny_store, ray_env, read_jsonl,
                                refresh_ray_auth, run_small_sweep)

@pytest.mark.slow
def test_sweep_on_s3(tmp_path, s3_endpoint):
    endpoint, client = s3_endpoint
    mp = pytest.MonkeyPatch()
    base = ray_env(mp)
    by_value()
    try:
        store = make_tiny_store(tmp_path / "store", resolutions=(32, 40))
        loc = f"s3://sweeps/team?endpoint_override={endpoint}&scheme=http"
        kw = dict(resolutions=(32, 40), models=("resnet18",), seeds=(0,),
                  config={"epochs_frozen": 1, "epochs_unfrozen": 1, "weights": "none"},
                  num_cpus=2, num_gpus=0, progress="lines", aggregate=False)
        out = io.StringIO()
        res = run_small_sweep(store, loc, "s3demo",
                              trial_fn=FakeTrial(fail={"r40-": 1}, marker_dir=str(tmp_path)),
                              max_failures=1, out=out, **kw)
        assert res.exit_code == 0, out.getvalue()
        assert res.sweep_loc == storage.join(loc, "s3demo")
        keys = {o["Key"] for o in client.list_objects_v2(Bucket="sweeps", MaxKeys=1000)["Contents"]}
        assert "team/s3demo/sweep.json" in keys
        for tid in res.trial_ids:
            assert f"team/s3demo/ledger/{tid}.json" in keys
            assert f"team/s3demo/trials/{tid}/result.json" in keys
        assert any(k.startswith("team/s3demo/tune/") for k in keys)
        entries = ledger.read_all(res.sweep_loc)
        retried = next(t for t in res.trial_ids if t.startswith("r40-"))
        assert entries[retried]["attempts"] == 2 and entries[retried]["state"] == "finished"
        runs = read_jsonl(storage.join(res.sweep_loc, "trials", retried, "executions.jsonl"))
        assert [r["epoch"] for r in runs] == [1, 2]      # the retry continued from the S3 checkpoint
        again = run_small_sweep(store, loc, "s3demo", trial_fn=FakeTrial(), out=io.StringIO(), **kw)
        assert again.ran == [] and sorted(again.skipped_finished) == sorted(res.trial_ids)
    finally:
        mp.undo()
        refresh_ray_auth()
        shutil.rmtree(base, ignore_errors=True)


TRAINER_KILLED_AFTER_EPOCH = """
import os, signal, sys
sys.path[:0] = [{repo!r}]
from trainer.config import TrainConfig
from trainer.train import run_trial

def hook(record):
    if record["epoch"] == 1:   # latest.pt of epoch 1 is on S3 (it is written before on_epoch)
        os.kill(os.getpid(), signal.SIGKILL)
run_trial(TrainConfig.from_dict({config!r}), {trial!r}, on_epoch=hook)
"""


@pytest.mark.slow
def test_real_trainer_on_s3_killed_and_resumed(tmp_path, s3_endpoint, tiny_phantom_store):
    """The real trainer with its trial folder on s3:// (moto): checkpoints, predictions, records and
    the result reach the bucket through the storage layer, and a trial whose process was killed
    after epoch 1 continues from its S3 checkpoint to the result of an uninterrupted local run."""
    import os
    import signal
    import subprocess
    import sys

    from common.trial_folder import TrialFolder
    from test_sweep_helpers import stable_result
    from trainer.config import TrainConfig
    from trainer.train import run_trial
    endpoint, client = s3_endpoint
    config = {"model": "smallcnn", "resolution": 32, "epochs_frozen": 1, "epochs_unfrozen": 1,
              "weights": "none", "max_train_studies": 40, "max_valid_studies": 30,
              "device": "cpu", "workers": 0, "store": tiny_phantom_store}
    folder = TrialFolder(f"s3://sweeps/real/trials/t?endpoint_override={endpoint}&scheme=http")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = TRAINER_KILLED_AFTER_EPOCH.format(repo=repo, config=config, trial=folder.location)
    import torch
    # CPU results are bitwise for a given thread count: the killed process uses this one's.
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]

    def keys():
        listing = client.list_objects_v2(Bucket="sweeps", Prefix="real/trials/t/")
        return {o["Key"][len("real/trials/t/"):] for o in listing.get("Contents", [])}
    assert {"config.json", "epochs.jsonl", "checkpoints/latest.pt",
            "predictions/epoch-001.parquet"} <= keys()
    assert "result.json" not in keys() and not any(".tmp-" in k for k in keys())
    assert [r["epoch"] for r in folder.read_epochs()] == [1]

    result = run_trial(TrainConfig.from_dict(config), folder.location)   # the retry
    assert {"result.json", "checkpoints/previous.pt", "predictions/epoch-002.parquet",
            "log.txt"} <= keys()
    assert "resumed after epoch 1" in storage.read_bytes(folder.log_path).decode()
    reference = run_trial(TrainConfig.from_dict(config), str(tmp_path / "local"))
    assert stable_result(result) == stable_result(reference)
    assert stable_result(folder.read_result()) == stable_result(reference)
    assert len(folder.read_predictions(2)) == len(TrialFolder(str(tmp_path / "local")).read_predictions(2))
