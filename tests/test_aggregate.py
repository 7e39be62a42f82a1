"""The aggregator on fabricated sweeps that follow docs/architecture.md sections 2-3.

``fabricate_sweep`` writes sweep.json with the sweep's own writer, ledger entries with the ledger's
own functions and trial folders in the trainer's record formats (config.json, epochs.jsonl,
predictions/epoch-NNN.parquet, result.json), with known AUROCs: the tests compare the aggregator's
numbers with values computed here, independently, from the fabricated predictions.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from analysis import aggregate as agg
from analysis import comparisons, tables
from analysis.records import load_sweep
from orchestrator import ledger
from orchestrator.grid import build_grid
from orchestrator.sweep import plan_trials, write_sweep_file
from common import storage
from common.sweep_folder import SweepFolder
from common.schema import TASKS, task_key
from trainer.config import TrainConfig
from trainer.train import predictions_table

FINE, COARSE = "Atelectasis", "Cardiomegaly"   # the fabricated fine-detail and coarse tasks


def signal(task: str, resolution: int, model: str, epoch: int) -> float:
    """Class separation of the fabricated scores: the fine task improves with resolution, the
    coarse task does not; larger models help a little; later epochs help a little."""
    base = {FINE: 0.4 + 2.6 * (resolution - 160) / 320}.get(task, 1.2)
    size = {"resnet152": 0.15, "densenet161": 0.1, "densenet121": 0.05}.get(model, 0.0)
    return base + size + 0.1 * (epoch - 1)


@dataclass
class FakeSweep:
    location: str
    store: str
    trials: list            # orchestrator.sweep.Trial
    known: dict = field(default_factory=dict)      # (trial_id, task_key) -> (best epoch, best AUROC)
    studies: list = field(default_factory=list)


def fabricate_sweep(root, *, resolutions=(160, 320, 480), models=("resnet50", "resnet152"),
                    seeds=(0, 1), epochs=2, studies=120, name="fake", phantom=True,
                    finished=None, checkpoints=None, config=None) -> FakeSweep:
    """A sweep folder under ``root``; ``finished(trial) -> bool`` picks the trials that get
    records (default all); ``checkpoints(trial, task_key, epoch)`` returning a model state_dict
    (or None) writes checkpoints/best-<task>.pt as the trainer does. ``config``: TrainConfig
    fields over the defaults; called again on the same ``root`` and ``name`` it is another run
    of the same sweep, as the sweep writes it."""
    root = str(root)
    store = os.path.join(root, "store")
    manifest = {"format_version": 1, "tool_version": "test", "dataset": "phantom" if phantom else "chexpert",
                "phantom": {"seed": 0, "planted": "fine=Atelectasis"} if phantom else None,
                "tasks": list(TASKS), "resolutions": list(resolutions), "encoding": "raw-uint8",
                "policy": {t: "ones" for t in TASKS}, "counts": {"stored": studies}, "sources": {}}
    storage.write_json(os.path.join(store, "manifest.json"), manifest)
    manifest_hash = "f" * 64
    loc = os.path.join(root, "sweeps", name)
    points = build_grid(list(resolutions), list(models), list(seeds))
    base = TrainConfig.from_dict(dict(config or {}), base=TrainConfig(
        store=store, epochs_frozen=1, epochs_unfrozen=epochs - 1, weights="none"))
    trials = plan_trials(points, base, manifest_hash)
    write_sweep_file(loc, name=name, store_loc=store, manifest_hash=manifest_hash, trials=trials,
                     base=base, axes={"resolutions": list(resolutions), "models": list(models),
                                      "seeds": list(seeds), "task_mode": "multi"},
                     command="python -m orchestrator.sweep (fabricated)", run_id="run-1")
    rng = np.random.default_rng(0)
    keys = [task_key(t) for t in TASKS]
    study_ids = [f"patient{i:05d}/study1" for i in range(studies)]
    labels = (rng.random((studies, len(TASKS))) < 0.4).astype(np.float32)
    labels[rng.random((studies, len(TASKS))) < 0.1] = np.nan     # excluded for a task
    fake = FakeSweep(location=loc, store=store, trials=trials, studies=study_ids)
    for trial in trials:
        tid, p = trial.trial_id, trial.params
        ledger.register(loc, tid, p.as_dict(), "run-1")
        if finished is not None and not finished(trial):
            continue
        ledger.mark_running(loc, tid, run_id="run-1", node="127.0.0.1", gpu_ids=[],
                            cuda_visible_devices=None)
        tdir = ledger.trial_dir(loc, tid)
        storage.write_json(storage.join(tdir, "config.json"),
                           {"config": trial.config.to_dict(), "manifest_hash": manifest_hash,
                            "trial_id": tid, "git_commit": "test"})
        history, best = [], {}
        trial_rng = np.random.default_rng([p.resolution, p.seed, len(p.model)])
        for epoch in range(1, epochs + 1):
            probs = np.empty_like(labels)
            aurocs = {}
            for j, task in enumerate(TASKS):
                s = trial_rng.normal(size=studies) + signal(task, p.resolution, p.model, epoch) * np.nan_to_num(labels[:, j])
                probs[:, j] = 1 / (1 + np.exp(-s))
                mask = ~np.isnan(labels[:, j])
                aurocs[keys[j]] = float(roc_auc_score(labels[mask, j], probs[mask, j]))
            table = predictions_table(study_ids, keys, labels, probs)
            buf = io.BytesIO()
            pq.write_table(table, buf)
            storage.write_bytes(storage.join(tdir, "predictions", f"epoch-{epoch:03d}.parquet"), buf.getvalue())
            # The trainer's AUROC is on the stored (float32) probabilities' source: recompute on
            # what was written so that "known" is exactly what the file says.
            stored = table.to_pandas()
            for k in keys:
                t = stored[stored["task"] == k]
                aurocs[k] = float(roc_auc_score(t["label"], t["probability"]))
                if aurocs[k] > best.get(k, {}).get("auroc", -1.0):
                    best[k] = {"epoch": epoch, "auroc": aurocs[k]}
                    state = checkpoints(trial, k, epoch) if checkpoints is not None else None
                    if state is not None:   # the trainer's best-<task>.pt layout
                        from trainer import checkpoint as ckpt
                        ckpt.save(storage.join(tdir, "checkpoints", ckpt.best_name(k)),
                                  {"model": state, "epoch": epoch, "auroc": aurocs[k], "task": k,
                                   "trial_id": tid})
            history.append({"epoch": epoch, "stage": "frozen" if epoch == 1 else "unfrozen",
                            "train_loss": 0.7 - 0.05 * epoch, "val_loss": 0.69 - 0.04 * epoch,
                            **{f"auroc_{k}": aurocs[k] for k in keys},
                            "auroc_mean": float(np.mean(list(aurocs.values()))),
                            "images_per_s": 100.0, "epoch_seconds": 1.0, "peak_memory_bytes": 0})
        storage.write_bytes(storage.join(tdir, "epochs.jsonl"),
                            "".join(json.dumps(r) + "\n" for r in history).encode())
        result = {"trial_id": tid, "config": trial.config.to_dict(), "manifest_hash": manifest_hash,
                  "dataset": manifest["dataset"], "tasks": keys, "best": best, "history": history,
                  "images_per_s": 100.0, "peak_memory_bytes": 0, "seconds": 2.0, "device": "cpu",
                  "finished": "2026-01-01T00:00:00Z"}
        storage.write_json(storage.join(tdir, "result.json"), result)
        ledger.mark_finished(loc, tid, ledger.result_summary(result))
        for k, b in best.items():
            fake.known[(tid, k)] = (b["epoch"], b["auroc"])
    return fake


@pytest.fixture(scope="module")
def full_sweep(tmp_path_factory):
    return fabricate_sweep(tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="module")
def full_result(full_sweep, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out") / "results")
    summary = agg.aggregate_sweep(full_sweep.location, results_dir=out, bootstrap=200)
    return summary, out


def test_trials_table_holds_the_known_best_epochs_and_aurocs(full_sweep, full_result):
    summary, out = full_result
    trials = pd.read_parquet(os.path.join(out, "trials.parquet"))
    assert len(trials) == len(full_sweep.trials) * len(TASKS) == summary.trials
    for row in trials.itertuples():
        epoch, auroc = full_sweep.known[(row.trial_id, row.task_key)]
        assert row.best_epoch == epoch
        assert row.best_auroc == auroc
        assert row.auroc_from_predictions == pytest.approx(auroc, abs=1e-12)
        assert row.ci_low < auroc < row.ci_high and row.ci_high - row.ci_low < 0.3
        assert row.boot_low < auroc < row.boot_high
        family, variant = ("resnet", row.model[len("resnet"):])
        assert (row.family, row.variant) == (family, variant)
        assert row.task_mode == "multi"
    csv = pd.read_csv(os.path.join(out, "trials.csv"))
    assert list(csv["trial_id"]) == list(trials["trial_id"])
    expected_cols = {"resolution", "model", "family", "variant", "seed", "task_mode", "task",
                     "best_epoch", "best_auroc", "ci_low", "ci_high", "trial_id"}
    assert expected_cols <= set(trials.columns)


def test_epochs_table_has_every_epoch(full_sweep, full_result):
    _, out = full_result
    epochs = pd.read_parquet(os.path.join(out, "epochs.parquet"))
    assert len(epochs) == len(full_sweep.trials) * 2
    assert {"train_loss", "val_loss", "auroc_atelectasis", "auroc_mean", "epoch", "trial_id",
            "resolution", "model", "seed"} <= set(epochs.columns)
    assert os.path.exists(os.path.join(out, "epochs.csv"))


def test_summary_tables_equal_independent_computation(full_sweep, full_result):
    _, out = full_result
    s = pd.read_csv(os.path.join(out, "summary_resolution.csv"))
    res_of = {t.trial_id: t.params.resolution for t in full_sweep.trials}
    model_of = {t.trial_id: t.params.model for t in full_sweep.trials}
    for task in TASKS:
        for res in (160, 320, 480):
            vals = [a for (tid, k), (_, a) in full_sweep.known.items()
                    if k == task_key(task) and res_of[tid] == res]
            row = s[(s["task"] == task) & (s["resolution"] == res)].iloc[0]
            assert row["runs"] == len(vals) == 4
            assert row["mean"] == pytest.approx(np.mean(vals), abs=1e-12)
            assert row["std"] == pytest.approx(np.std(vals, ddof=1), abs=1e-12)
            assert row["max"] == pytest.approx(max(vals), abs=1e-12)
    scaling = pd.read_csv(os.path.join(out, "model_scaling.csv"))
    assert set(scaling["family"]) == {"resnet"}   # no DenseNet in this grid
    row = scaling[(scaling["task"] == FINE) & (scaling["resolution"] == 320)].iloc[0]
    big = [a for (tid, k), (_, a) in full_sweep.known.items()
           if k == task_key(FINE) and res_of[tid] == 320 and model_of[tid] == "resnet152"]
    small = [a for (tid, k), (_, a) in full_sweep.known.items()
             if k == task_key(FINE) and res_of[tid] == 320 and model_of[tid] == "resnet50"]
    assert row["delta_mean"] == pytest.approx(np.mean(big) - np.mean(small), abs=1e-12)
    assert row["delta_max"] == pytest.approx(max(big) - max(small), abs=1e-12)
    best = pd.read_csv(os.path.join(out, "best_configurations.csv"))
    assert best[best["task"] == FINE].iloc[0]["resolution"] == 480
    assert pd.read_csv(os.path.join(out, "efficientnet.csv")).empty


def test_paired_resolution_tests_find_the_planted_effect(full_result):
    _, out = full_result
    tests = pd.read_csv(os.path.join(out, "tests_resolution.csv"))
    # 2 models x 2 seeds x 3 resolution pairs per task
    assert len(tests[tests["task"] == FINE]) == 12
    fine = tests[(tests["task"] == FINE) & (tests["resolution_a"] == 480) & (tests["resolution_b"] == 160)]
    assert (fine["difference"] > 0.2).all() and fine["significant"].all()
    assert (fine["p_holm"] >= fine["p_value"]).all()
    coarse = tests[tests["task"] == COARSE]
    assert not coarse["significant"].any()
    summary = pd.read_csv(os.path.join(out, "tests_resolution_summary.csv"))
    row = summary[(summary["task"] == FINE) & (summary["higher"] == 480) & (summary["lower"] == 160)].iloc[0]
    assert (row["pairs"], row["significant_higher"], row["significant_lower"]) == (4, 4, 0)
    best = pd.read_csv(os.path.join(out, "tests_best_configuration.csv"))
    fine_best = best[best["task"] == FINE]
    assert set(fine_best["resolution_a"]) == {480} and set(fine_best["resolution_b"]) == {160, 320}
    assert (fine_best["seed"].value_counts() == 2).all()


def test_outputs_and_printable_table(full_sweep, full_result):
    summary, out = full_result
    for name in ("report.md", "report.html", "summary.json", "problems.csv", "incomplete.csv",
                 "summary_resolution.md", "model_scaling.md", "efficientnet.md",
                 "sweep_configurations.csv", "other_configurations.csv"):
        assert os.path.exists(os.path.join(out, name)), name
    assert all(os.path.exists(os.path.join(out, f)) for f in summary.files)
    assert any(f.startswith("figures/") and f.endswith(".png") for f in summary.files)
    configurations = pd.read_csv(os.path.join(out, "sweep_configurations.csv"))
    assert configurations[["main", "trials", "finished"]].values.tolist() == [[True, 12, 12]]
    assert summary.counts == {"finished": 12, "failed": 0, "running": 0, "pending": 0, "missing": 0}
    assert summary.problems == 0, pd.read_csv(os.path.join(out, "problems.csv"))
    table = tables.results_table(load_sweep(full_sweep.location).trials)
    assert table == summary.table
    lines = table.splitlines()
    assert "160 px" in lines[0] and "480 px" in lines[0]
    s = pd.read_csv(os.path.join(out, "summary_resolution.csv"))
    fine160 = s[(s["task"] == FINE) & (s["resolution"] == 160)].iloc[0]
    assert f"{fine160['mean']:.4f} (4)" in next(line for line in lines if line.startswith(FINE))


def test_partial_and_damaged_sweep_gives_a_partial_report(tmp_path):
    fake = fabricate_sweep(tmp_path, resolutions=(160, 320), models=("resnet50",), seeds=(0, 1, 2),
                           finished=lambda t: not (t.params.resolution == 320 and t.params.seed == 2))
    by = {(t.params.resolution, t.params.seed): t.trial_id for t in fake.trials}
    loc = fake.location
    # 320/s2: no records (pending in the ledger). 160/s2: its ledger says failed.
    ledger.mark_failed(loc, by[(160, 2)], "Traceback ...\nRuntimeError: CUDA out of memory")
    storage.delete(storage.join(ledger.trial_dir(loc, by[(160, 2)]), "result.json"))
    # 160/s1: result.json is garbage; 320/s1: one bad line in epochs.jsonl and a predictions file gone.
    storage.write_bytes(storage.join(ledger.trial_dir(loc, by[(160, 1)]), "result.json"), b"{not json")
    ep = storage.join(ledger.trial_dir(loc, by[(320, 1)]), "epochs.jsonl")
    storage.write_bytes(ep, storage.read_bytes(ep) + b"garbage line\n")
    best_epoch = fake.known[(by[(320, 1)], "edema")][0]
    storage.delete(storage.join(ledger.trial_dir(loc, by[(320, 1)]), "predictions",
                                f"epoch-{best_epoch:03d}.parquet"))
    # 320/s0: its ledger entry is unreadable (the trial folder still says finished).
    storage.write_bytes(ledger.entry_location(loc, by[(320, 0)]), b"\x00\x01")
    # A trial folder that is not in the grid.
    storage.write_json(storage.join(loc, "trials", "r999-resnet50-s0-multi-0123456789", "result.json"), {})

    out = str(tmp_path / "out")
    summary = agg.aggregate_sweep(loc, results_dir=out)
    assert summary.counts == {"finished": 3, "failed": 2, "running": 0, "pending": 1, "missing": 0}
    trials = pd.read_csv(os.path.join(out, "trials.csv"))
    assert set(trials["trial_id"]) == {by[(160, 0)], by[(320, 0)], by[(320, 1)]}
    row = trials[(trials["trial_id"] == by[(320, 1)]) & (trials["task_key"] == "edema")].iloc[0]
    assert row["best_auroc"] == fake.known[(by[(320, 1)], "edema")][1] and math.isnan(row["ci_low"])
    problems = pd.read_csv(os.path.join(out, "problems.csv"))
    text = "\n".join(problems["where"] + " " + problems["what"])
    assert "result.json is unreadable" in text and by[(160, 1)] in text
    assert "epochs.jsonl:3" in text and "predictions missing" in text
    assert "ledger entry is unreadable" in text
    assert "r999-resnet50-s0-multi-0123456789" in text and "not in sweep.json's grid" in text
    incomplete = pd.read_csv(os.path.join(out, "incomplete.csv"))
    assert set(incomplete["trial_id"]) == {by[(320, 2)], by[(160, 2)], by[(160, 1)]}
    assert "CUDA out of memory" in incomplete.set_index("trial_id").at[by[(160, 2)], "error"]
    report = open(os.path.join(out, "report.md")).read()
    assert "This report is partial" in report and by[(320, 2)] in report
    assert "3 finished, 2 failed, 0 running, 1 pending, 0 missing" in report


def test_missing_trials_of_the_grid_are_named(tmp_path):
    fake = fabricate_sweep(tmp_path, resolutions=(160,), models=("resnet50",), seeds=(0, 1))
    gone = fake.trials[1].trial_id
    storage.delete(ledger.entry_location(fake.location, gone))
    storage.delete(ledger.trial_dir(fake.location, gone))
    data = load_sweep(fake.location)
    assert data.states[gone] == "missing" and data.counts()["missing"] == 1
    assert list(data.incomplete()["trial_id"]) == [gone]


def test_unreadable_sweep_json_still_aggregates_what_is_there(tmp_path):
    fake = fabricate_sweep(tmp_path, resolutions=(160,), models=("resnet50",), seeds=(0,))
    storage.write_bytes(storage.join(fake.location, "sweep.json"), b"[[[")
    data = load_sweep(fake.location)
    assert len(data.trials) == len(TASKS)
    assert any("sweep.json is unreadable" in p.what for p in data.problems)


def test_cli_writes_the_report_and_rejects_a_bad_location(tmp_path, capsys):
    fake = fabricate_sweep(tmp_path, resolutions=(160, 240), models=("resnet50",), seeds=(0,),
                           name="clisweep")
    assert agg.main(["--sweep", fake.location, "--no-figures"]) == 0
    assert os.path.exists(os.path.join(fake.location, "results", "report.html"))   # the default
    printed = capsys.readouterr().out
    assert "Atelectasis" in printed and "2 finished" in printed
    from common.cli import run_cli
    assert run_cli(agg.main, ["--sweep", str(tmp_path / "nope")], prog="analysis.aggregate") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("analysis.aggregate: error: sweep location") and "\n" not in err
    assert run_cli(agg.main, ["--sweep", fake.location, "--bootstrap", "-1"], prog="x") == 2


def test_holm_family_is_per_task_and_comparison():
    rows = []
    for task, ps in ((FINE, [0.01, 0.02]), (COARSE, [0.04])):
        for p in ps:
            rows.append({c: None for c in comparisons.TEST_COLUMNS} | {"comparison": "resolution",
                         "task_mode": "multi", "task": task, "p_value": p, "difference": 0.1})
    df = comparisons.with_holm(rows)
    assert df["p_holm"].tolist() == pytest.approx([0.02, 0.02, 0.04])


def test_aggregate_reads_a_sweep_on_s3(tmp_path, monkeypatch):
    """The same sweep uploaded to a local S3 server (moto) aggregates to the same trials table."""
    import socket

    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fake = fabricate_sweep(tmp_path, resolutions=(160, 320), models=("resnet50",), seeds=(0,),
                           name="s3sweep")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
        client.create_bucket(Bucket="sweeps")
        for dirpath, _, files in os.walk(fake.location):
            for f in files:
                path = os.path.join(dirpath, f)
                key = "s3sweep/" + os.path.relpath(path, fake.location)
                client.upload_file(path, "sweeps", key)
        loc = f"s3://sweeps/s3sweep?endpoint_override=127.0.0.1:{port}&scheme=http"
        summary = agg.aggregate_sweep(loc, results_dir=str(tmp_path / "out"), figures=False, report=False)
    finally:
        server.stop()
    assert summary.counts["finished"] == 2
    local = load_sweep(fake.location).trials
    remote = pd.read_parquet(tmp_path / "out" / "trials.parquet")
    pd.testing.assert_frame_equal(local.reset_index(drop=True), remote,
                                  check_dtype=False)


def test_a_sweep_with_nothing_finished_gives_an_empty_report(tmp_path):
    fake = fabricate_sweep(tmp_path, resolutions=(160,), models=("resnet50",), seeds=(0, 1),
                           finished=lambda t: False)
    summary = agg.aggregate_sweep(fake.location, results_dir=str(tmp_path / "out"))
    assert summary.counts["pending"] == 2 and summary.trials == 0
    assert summary.table == "no finished trials yet"
    assert summary.figures_skipped == ["all figures: no finished trial with an AUROC"]
    assert pd.read_parquet(tmp_path / "out" / "trials.parquet").empty
    assert "This report is partial" in (tmp_path / "out" / "report.md").read_text()


def test_earlier_invocations_count_unless_superseded(tmp_path):
    fake = fabricate_sweep(tmp_path, resolutions=(160,), models=("resnet50",), seeds=(0, 1))
    kwargs = dict(name="fake", store_loc=fake.store, manifest_hash="f" * 64, axes={},
                  command="re-run", run_id="run-2")
    base = fake.trials[0].config
    # Re-run with a smaller grid (seed 0 only): seed 1's finished trial still counts.
    write_sweep_file(fake.location, trials=[fake.trials[0]], base=base, **kwargs)
    data = load_sweep(fake.location)
    assert sorted(data.trials["seed"].unique()) == [0, 1] and data.problems == []
    # Re-run with another configuration (new ids for the same points): the old trials are listed
    # as another configuration and left out; the new ones are missing.
    other_base = TrainConfig.from_dict({"lr_head": 1e-3}, base=base)
    other = plan_trials(build_grid([160], ["resnet50"], [0, 1]), other_base, "f" * 64)
    write_sweep_file(fake.location, trials=other, base=other_base, **kwargs)
    data = load_sweep(fake.location)
    assert data.trials.empty and data.counts()["missing"] == 2
    assert sum("another configuration" in p.what and "lr_head" in p.what
               for p in data.problems) == 2
    assert len(data.other_trials) == 2 * len(TASKS)


def test_a_sweep_json_of_the_wrong_shape_still_aggregates_what_is_there(tmp_path):
    fake = fabricate_sweep(tmp_path, resolutions=(160,), models=("resnet50",), seeds=(0,))
    folder = SweepFolder(fake.location)
    doc = storage.read_json(folder.sweep_file)
    doc.update(trials=["not", "a", "mapping"], trial_ids="nor a list", base_config=[1, 2])
    storage.write_json(folder.sweep_file, doc)
    data = load_sweep(fake.location)
    assert len(data.trials) == len(TASKS)
    assert any("lists no trials" in p.what for p in data.problems)
