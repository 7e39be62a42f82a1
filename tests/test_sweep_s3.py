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
