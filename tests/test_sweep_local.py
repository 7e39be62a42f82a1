"""The sweep on one shared local Ray (2 CPUs) with a fake trial: resume semantics, retries, ids.

One Ray instance serves the whole module (run_sweep uses an already-initialised Ray and leaves
it running); tests/test_sweep_embedded.py covers the private instance run_sweep starts itself.
"""
from __future__ import annotations

import io
import json
import os

import pytest

from common import storage
from orchestrator import ledger
from test_sweep_helpers import (FakeTrial, local_ray, make_tiny_store, read_jsonl,
                               run_small_sweep, stable_result)

FAST = {"epochs_frozen": 1, "epochs_unfrozen": 1, "weights": "none"}


@pytest.fixture(scope="module")
def ray_shared(tmp_path_factory):
    with local_ray():
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("store"))


def sweep(store, storage_loc, name, *, resolutions=(32, 40), seeds=(0,), fake=None, **kw):
    out = io.StringIO()
    kw.setdefault("config", dict(FAST))
    res = run_small_sweep(store, storage_loc, name, resolutions=resolutions, models=("resnet18",),
                          seeds=seeds, trial_fn=fake or FakeTrial(), cpus_per_trial=1,
                          gpus_per_trial="1", progress_interval=0.01, progress="lines",
                          aggregate=False, out=out, **kw)
    return res, out.getvalue()


def uninterrupted(store, tmp_path, resolution):
    """The result of the same trial run in one go, in-process (the reference for resumed runs)."""
    from trainer.config import TrainConfig
    cfg = TrainConfig.from_dict({**FAST, "store": store, "model": "resnet18", "resolution": resolution})
    return FakeTrial()(cfg, str(tmp_path / f"reference-{resolution}"))


def attempts(sweep_loc):
    return {tid: e["attempts"] for tid, e in ledger.read_all(sweep_loc).items()}


def test_run_rerun_extend_and_new_ids(ray_shared, store, tmp_path):
    res, text = sweep(store, tmp_path, "s1", seeds=(0, 1))
    assert res.exit_code == 0 and len(res.trial_ids) == 4 and sorted(res.ran) == sorted(res.trial_ids)
    assert "the Ray cluster has no GPUs: running trials on CPUs" in text
    assert "4/4 finished" in text and "ETA" in text
    entries = ledger.read_all(res.sweep_loc)
    assert {e["state"] for e in entries.values()} == {"finished"}
    assert all(e["attempts"] == 1 and e["result"]["epochs"] == 2 for e in entries.values())
    for tid in res.trial_ids:
        assert tid.startswith(("r32-resnet18-s", "r40-resnet18-s")) and "-multi-" in tid
        assert storage.exists(storage.join(res.sweep_loc, "trials", tid, "result.json"))
    doc = storage.read_json(storage.join(res.sweep_loc, "sweep.json"))
    assert sorted(doc["trial_ids"]) == sorted(res.trial_ids) and doc["grid"]["resolutions"] == [32, 40]
    before = attempts(res.sweep_loc)

    # the same command again runs nothing
    again, text = sweep(store, tmp_path, "s1", seeds=(0, 1))
    assert again.ran == [] and sorted(again.skipped_finished) == sorted(res.trial_ids)
    assert attempts(res.sweep_loc) == before

    # one more resolution: only its trials run
    more, _ = sweep(store, tmp_path, "s1", resolutions=(32, 40, 48), seeds=(0, 1))
    new = set(more.trial_ids) - set(res.trial_ids)
    assert len(new) == 2 and all(t.startswith("r48-") for t in new) and set(more.ran) == new
    after = attempts(res.sweep_loc)
    assert {t: after[t] for t in before} == before

    # a changed hyperparameter: new ids, all to run, nothing mixed with the old results
    changed, text = sweep(store, tmp_path, "s1", seeds=(0, 1), config={**FAST, "lr_head": 1e-3},
                          dry_run=True)
    assert set(changed.trial_ids).isdisjoint(res.trial_ids) and "0 finished, 4 to run" in text
    # the store location, loader workers and weight cache do not change ids
    moved, _ = sweep(store, tmp_path, "s1", seeds=(0, 1), config={**FAST, "workers": 0,
                                                                   "weights_dir": "/elsewhere"})
    assert sorted(moved.trial_ids) == sorted(res.trial_ids) and moved.ran == []


def test_retry_within_run_resumes_from_checkpoint(ray_shared, store, tmp_path, monkeypatch):
    fake = FakeTrial(fail={"r32-": 1}, marker_dir=str(tmp_path))
    # relative locations work although Ray workers run in another working directory
    monkeypatch.chdir(tmp_path)
    res, text = sweep(os.path.relpath(store), "sweeps", "retry", resolutions=(32,), fake=fake,
                      max_failures=1)
    assert res.sweep_loc == str(tmp_path / "sweeps" / "retry")
    assert res.exit_code == 0
    (tid,) = res.trial_ids
    entry = ledger.read_entry(res.sweep_loc, tid)
    assert entry["state"] == "finished" and entry["attempts"] == 2
    assert entry["history"][0]["state"] == "failed" and "injected failure" in entry["history"][0]["error"]
    assert entry["history"][1]["resumed_from_epoch"] == 1
    runs = read_jsonl(storage.join(res.sweep_loc, "trials", tid, "executions.jsonl"))
    assert [r["epoch"] for r in runs] == [1, 2]            # epoch 1 was not trained again
    assert len({r["pid"] for r in runs}) == 2                # ... by a second worker process
    assert "retrying" in text


def test_failed_sweep_rerun_finishes_only_that_trial_exactly(ray_shared, store, tmp_path):
    fake = FakeTrial(fail={"r40-": 1}, marker_dir=str(tmp_path))
    res, text = sweep(store, tmp_path, "fail", fake=fake, max_failures=0)
    assert res.exit_code == 1 and len(res.failed) == 1 and res.failed[0].startswith("r40-")
    assert "FAILED" in text and "re-run the same command" in text
    failed = res.failed[0]
    assert ledger.read_entry(res.sweep_loc, failed)["state"] == "failed"
    before = attempts(res.sweep_loc)

    again, _ = sweep(store, tmp_path, "fail", fake=fake, max_failures=0)
    assert again.exit_code == 0 and again.ran == [failed]
    after = attempts(again.sweep_loc)
    assert after[failed] == 2 and all(after[t] == before[t] for t in before if t != failed)
    resumed = stable_result(storage.read_json(storage.join(res.sweep_loc, "trials", failed, "result.json")))
    assert resumed == stable_result(uninterrupted(store, tmp_path, resolution=40))


def test_interrupted_running_entry_is_resumed(ray_shared, store, tmp_path):
    """A 'running' entry left by a dead driver continues from its folder's newest checkpoint."""
    from trainer.config import TrainConfig
    plan, _ = sweep(store, tmp_path, "int", resolutions=(32,), dry_run=True)
    (tid,) = plan.trial_ids
    cfg = TrainConfig.from_dict({**FAST, "store": store, "model": "resnet18", "resolution": 32})
    folder = storage.join(plan.sweep_loc, "trials", tid)
    with pytest.raises(RuntimeError):   # a worker that died after epoch 1
        FakeTrial(fail={tid: 1}, marker_dir=str(tmp_path))(cfg, folder)
    ledger.register(plan.sweep_loc, tid, {"resolution": 32}, "dead-driver")
    ledger.mark_running(plan.sweep_loc, tid, run_id="dead-driver", node="x", gpu_ids=[],
                        cuda_visible_devices=None)
    res, _ = sweep(store, tmp_path, "int", resolutions=(32,))
    assert res.ran == [tid] and res.exit_code == 0
    runs = read_jsonl(storage.join(folder, "executions.jsonl"))
    assert [r["epoch"] for r in runs] == [1, 2]
    entry = ledger.read_entry(res.sweep_loc, tid)
    assert entry["attempts"] == 2 and entry["history"][-1]["resumed_from_epoch"] == 1
    assert stable_result(storage.read_json(storage.join(folder, "result.json"))) == stable_result(
        uninterrupted(store, tmp_path, resolution=32))


def _wandb_records(path: str) -> list[bytes]:
    """The records of a W&B transaction log (``run-*.wandb``): LevelDB's log format, 32 KiB
    blocks of [crc32 (4), length (2), type (1)] + data, after a 7-byte file header."""
    import struct
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    out, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:                      # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk   # full/first, else middle/last
        if kind in (1, 4):
            out.append(pending)
            pending = b""
    return out


def _wandb_history(wandb_dir) -> list[dict]:
    """Every history row W&B recorded offline below ``wandb_dir`` (all runs)."""
    import glob

    from wandb.proto import wandb_internal_pb2
    rows = []
    paths = {os.path.realpath(p)   # wandb/latest-run links to the newest run folder
             for p in glob.glob(os.path.join(str(wandb_dir), "**", "*.wandb"), recursive=True)}
    for path in sorted(paths):
        for data in _wandb_records(path):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(data)
            if rec.WhichOneof("record_type") != "history":
                continue
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                kind = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
                row[key] = (getattr(item, kind) if kind and kind != "value_json"
                            else json.loads(item.value_json) if item.value_json else None)
            rows.append(row)
    return rows


@pytest.mark.slow
def test_trackers_record_per_epoch_auroc_per_task(ray_shared, store, tmp_path, monkeypatch):
    """--log tensorboard,mlflow,wandb: Tune's own callbacks; every tracker holds each epoch's
    AUROC of every task. MLflow writes a local SQLite store, W&B runs offline."""
    import glob

    import mlflow
    from common.schema import TASKS, task_key
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    res, text = sweep(store, tmp_path, "tracked", resolutions=(32,),
                      log=("tensorboard", "mlflow", "wandb"))
    assert res.exit_code == 0, text
    (tid,) = res.trial_ids
    epochs = 2
    keys = [f"auroc_{task_key(t)}" for t in TASKS]
    # TensorBoard: Tune's trial folder below STORAGE/NAME/tune
    assert glob.glob(os.path.join(res.sweep_loc, "tune", "*", tid + "*", "events.out.tfevents.*"))
    # MLflow: the local store STORAGE/NAME/mlflow.db, experiment NAME, one run per trial
    client = mlflow.tracking.MlflowClient(
        tracking_uri="sqlite:///" + os.path.join(res.sweep_loc, "mlflow.db"))
    exp = client.get_experiment_by_name("tracked")
    (run,) = client.search_runs([exp.experiment_id])
    for key in keys:
        assert len(client.get_metric_history(run.info.run_id, key)) == epochs, key
    # W&B: offline files in STORAGE/NAME/wandb
    rows = [r for r in _wandb_history(os.path.join(res.sweep_loc, "wandb")) if "auroc_mean" in r]
    assert len(rows) == epochs and all(k in r for r in rows for k in keys)
    # without --log, no TensorBoard files
    quiet, _ = sweep(store, tmp_path, "quiet", resolutions=(32,), log=())
    assert not glob.glob(os.path.join(quiet.sweep_loc, "tune", "**", "events.out.tfevents.*"),
                         recursive=True)


@pytest.mark.slow
def test_the_cards_command_as_typed_with_a_settings_file(ray_shared, store, tmp_path, monkeypatch,
                                                          capsys):
    """``python -m orchestrator.sweep --resolutions 32`` in a folder below a cxr-sweep.toml: the
    real trainer runs, sweep.json records the command and the code, the report lands in
    STORAGE/NAME/results."""
    from orchestrator import sweep as sweep_mod
    for key in [k for k in os.environ if k.startswith("CXR_SWEEP_")]:
        monkeypatch.delenv(key)
    (tmp_path / "cxr-sweep.toml").write_text(
        f'store = "{store}"\nstorage = "{tmp_path / "sweeps"}"\nname = "card"\n'
        'models = ["smallcnn"]\nseeds = "0"\nweights = "none"\nepochs-frozen = 0\n'
        'epochs-unfrozen = 1\nworkers = 0\nlog = "none"\nprogress = "lines"\n')
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    code = sweep_mod.main(["--resolutions", "32"])
    out = capsys.readouterr().out
    assert code == 0, out
    loc = str(tmp_path / "sweeps" / "card")
    doc = storage.read_json(os.path.join(loc, "sweep.json"))
    assert doc["command"] == "python -m orchestrator.sweep --resolutions 32"
    assert doc["argv"] == ["--resolutions", "32"] and doc["grid"]["models"] == ["smallcnn"]
    assert len(doc["git_commit"]) == 40
    assert set(doc["versions"]) == {"python", "torch", "ray", "cxr-sweep"} and all(doc["versions"].values())
    assert os.path.exists(os.path.join(loc, "results", "summary.json")), out
    assert "epoch 1/1 AUROC" in out
