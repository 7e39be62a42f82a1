"""The report's numbers: configuration means and effects with DeLong intervals (analysis.effects),
model families and every scaling pair (analysis.families), on sweeps fabricated here.

``fabricate`` writes a sweep folder through common.sweep_folder / common.trial_folder in the
trainer's record formats, with scores whose class separation is planted per task, model and
resolution, so the best configuration of every task is known in advance. The tests recompute
every number independently (scikit-learn's AUROC, DeLong's covariance by its O(m n) definition).
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from analysis import delong, effects, families
from common import storage
from common.schema import TASKS, task_key
from common.sweep_folder import SweepFile, SweepFolder

FINE, COARSE = "Edema", "Cardiomegaly"
KEYS = [task_key(t) for t in TASKS]
BASE_CONFIG = {"epochs_frozen": 0, "epochs_unfrozen": 2, "lr_frozen": 0.005, "lr_body": 0.001,
               "lr_head": 0.01, "batch_studies": 8, "weight_decay": 0.1, "betas": [0.9, 0.99],
               "augment": False, "weights": "none", "tasks": list(TASKS)}


def separation(task: str, resolution: int, model: str) -> float:
    """The planted answer: the fine task gains with resolution and with model size, the coarse
    task is flat; ``resnet34`` is the best model except for the fine task at 64 px, where
    ``resnet50`` (flat in resolution) beats it."""
    size = {"resnet18": 0.0, "resnet34": 0.6, "smallcnn": -0.3}.get(model, 0.2)
    if task == FINE and model == "resnet50":
        return 1.2
    if task == FINE:
        return 0.3 + 2.5 * (resolution - 64) / 64 + size
    return 1.5 + size


@dataclass
class Fabricated:
    location: str
    store: str
    labels: np.ndarray                     # studies x tasks (NaN: excluded)
    scores: dict = field(default_factory=dict)   # (trial_id, task_key) -> probabilities per study
    trial_ids: list = field(default_factory=list)
    studies: list = field(default_factory=list)


def fabricate(root, *, resolutions=(64, 128), models=("resnet18", "resnet34"), seeds=(0,),
              task_mode="multi", studies=80, phantom=True, finished=None, checkpoint=None,
              boost=None) -> Fabricated:
    """A sweep folder under ``root``. ``finished(params) -> bool`` picks the trials with records
    (default all); ``checkpoint(params, key)`` returning a state_dict writes best-<key>.pt;
    ``boost`` = {model: extra class separation} plants another best model."""
    root = str(root)
    store = os.path.join(root, "store")
    manifest = {"format_version": 1, "dataset": "phantom" if phantom else "chexpert",
                "tasks": list(TASKS), "resolutions": list(resolutions), "encoding": "png",
                "policy": {t: ("ones" if t in ("Atelectasis", "Edema") else "zeros") for t in TASKS},
                "counts": {"rows_in": 120, "stored": 118, "rejected": 2, "converted": 0,
                           "per_split": {"train": {"stored": 98}, "valid": {"stored": 20}}},
                "resize": {"filter": "lanczos"}, "sources": {"train.csv": "ab" * 32}}
    if phantom:
        manifest["phantom"] = {"seed": 0}
    storage.write_json(os.path.join(store, "manifest.json"), manifest)
    rng = np.random.default_rng(0)
    study_ids = [f"patient{i:05d}/study1" for i in range(studies)]
    labels = (rng.random((studies, len(TASKS))) < 0.4).astype(float)
    labels[rng.random((studies, len(TASKS))) < 0.1] = np.nan
    folder = SweepFolder(os.path.join(root, "sweeps", "fab"))
    points = []
    for res in resolutions:
        for model in models:
            for seed in seeds:
                for task in (TASKS if task_mode == "single" else ("",)):
                    name = model if not model.startswith("efficientnet") else \
                        {64: "efficientnet-b0", 128: "efficientnet-b1"}.get(res, "efficientnet-b2")
                    points.append({"resolution": res, "model": name, "seed": seed,
                                   "task_mode": task_mode, "task": task})
    ids = [f"r{p['resolution']}-{p['model']}-s{p['seed']}-{task_mode}"
           + (f"-{task_key(p['task'])}" if p["task"] else "") + "-0123456789" for p in points]
    fab = Fabricated(folder.location, store, labels, trial_ids=ids, studies=study_ids)
    folder.write_sweep_file(SweepFile(
        name="fab", store_location=store, store=store, manifest_hash="f" * 64,
        grid={"resolutions": list(resolutions), "models": list(models), "seeds": list(seeds)},
        base_config=dict(BASE_CONFIG), trial_ids=ids, trials=dict(zip(ids, points)),
        all_trials=dict(zip(ids, points)), command="python -m orchestrator.sweep --name fab",
        argv=["--name", "fab"], git_commit="0123abcd" * 5,
        versions={"python": "3.11.2", "torch": "2.9.0"}, created="2026-11-30T00:00:00+00:00"))
    for tid, p in zip(ids, points):
        storage.write_json(folder.ledger_entry(tid), {"trial_id": tid, "state": "pending",
                                                      "params": p})
        if finished is not None and not finished(p):
            continue
        tf = folder.trial(tid)
        tf.write_config({"config": {**BASE_CONFIG, **p}, "manifest_hash": "f" * 64,
                         "trial_id": tid, "git_commit": "test"})
        keys = [task_key(p["task"])] if p["task"] else KEYS
        trial_rng = np.random.default_rng([p["resolution"], p["seed"], len(p["model"])])
        rows, best = [], {}
        for k in keys:
            j = KEYS.index(k)
            sep = separation(TASKS[j], p["resolution"], p["model"]) + (boost or {}).get(p["model"], 0)
            s = trial_rng.normal(size=studies) + sep * np.nan_to_num(labels[:, j])
            prob = (1 / (1 + np.exp(-s))).astype(np.float32)
            mask = ~np.isnan(labels[:, j])
            for sid, lab, pr in zip(np.array(study_ids)[mask], labels[mask, j], prob[mask]):
                rows.append({"study_id": sid, "task": k, "label": float(lab), "probability": float(pr)})
            fab.scores[(tid, k)] = prob[mask].astype(float)
            best[k] = {"epoch": 1, "auroc": float(roc_auc_score(labels[mask, j], prob[mask]))}
            if checkpoint is not None:
                state = checkpoint(p, k)
                if state is not None:
                    import torch
                    buf = io.BytesIO()
                    torch.save({"model": state, "epoch": 1, "task": k, "trial_id": tid}, buf)
                    storage.write_bytes(tf.best_checkpoint(k), buf.getvalue())
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False), buf)
        storage.write_bytes(tf.predictions_path(1), buf.getvalue())
        record = {"epoch": 1, "stage": "unfrozen", "train_loss": 0.5, "val_loss": 0.5,
                  **{f"auroc_{k}": b["auroc"] for k, b in best.items()}}
        tf.write_epochs([record])
        tf.write_result({"trial_id": tid, "config": {**BASE_CONFIG, **p}, "manifest_hash": "f" * 64,
                         "tasks": keys, "best": best, "history": [record], "seconds": 1.0,
                         "device": "cpu", "finished": "2026-11-30T00:00:00Z"})
        storage.write_json(folder.ledger_entry(tid), {"trial_id": tid, "state": "finished",
                                                      "params": p})
    return fab


def load(location: str):
    from analysis.records import load_sweep
    return load_sweep(location)


# --- the numbers ---------------------------------------------------------------------------------
def _mask(fab, k):
    return ~np.isnan(fab.labels[:, KEYS.index(k)])


def _structural(labels, scores):
    """DeLong's placement values by their O(m n) definition (no midranks)."""
    pos, neg = scores[:, labels == 1], scores[:, labels == 0]
    psi = lambda a, b: (a > b) + 0.5 * (a == b)   # noqa: E731
    v10 = np.stack([psi(pos[r][:, None], neg[r][None, :]).mean(axis=1) for r in range(len(scores))])
    v01 = np.stack([psi(pos[r][:, None], neg[r][None, :]).mean(axis=0) for r in range(len(scores))])
    return v10.mean(axis=1), np.cov(v10) / pos.shape[1] + np.cov(v01) / neg.shape[1]


def test_mean_over_seeds_is_a_delong_contrast(tmp_path):
    fab = fabricate(tmp_path, resolutions=(64, 128), models=("resnet18", "resnet34"), seeds=(0, 1, 2))
    data = load(fab.location)
    conf = effects.configurations(data.trials, data.predictions)
    row = conf[(conf["task"] == FINE) & (conf["model"] == "resnet34") & (conf["resolution"] == 128)]
    assert len(row) == 1 and int(row["runs"].iloc[0]) == 3
    ids = [t for t in fab.trial_ids if t.startswith("r128-resnet34-")]
    k = task_key(FINE)
    scores = np.stack([fab.scores[(t, k)] for t in ids])
    labels = fab.labels[_mask(fab, k), KEYS.index(k)]
    aucs, cov = _structural(labels, scores)
    w = np.full(3, 1 / 3)
    mean, se = float(w @ aucs), math.sqrt(float(w @ cov @ w))
    assert row["mean"].iloc[0] == pytest.approx(mean, abs=1e-12)
    assert row["ci_low"].iloc[0] == pytest.approx(mean - delong.Z95 * se, abs=1e-12)
    assert row["ci_high"].iloc[0] == pytest.approx(min(1.0, mean + delong.Z95 * se), abs=1e-12)
    assert row["studies"].iloc[0] == len(labels)


def test_copies_of_one_run_are_no_extra_evidence(tmp_path):
    """Runs on the same studies are correlated: the mean of a run and its exact copy has the
    run's own interval (a method that treated seeds as independent would shrink it by sqrt 2)."""
    fab = fabricate(tmp_path, seeds=(0,))
    data = load(fab.location)
    tid, k = fab.trial_ids[0], task_key(COARSE)
    one = effects.mean_of_runs(data.predictions, [(tid, k)])
    preds = dict(data.predictions)
    preds[("copy", k)] = preds[(tid, k)].copy()
    two = effects.mean_of_runs(preds, [(tid, k), ("copy", k)])
    assert two.value == pytest.approx(one.value, abs=1e-12)
    assert two.high - two.low == pytest.approx(one.high - one.low, rel=1e-9)
    ci = delong.auroc_ci(fab.labels[_mask(fab, k), KEYS.index(k)], fab.scores[(tid, k)])
    assert (one.low, one.high) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_answer_finds_the_planted_best_and_its_paired_test(tmp_path):
    fab = fabricate(tmp_path, resolutions=(64, 128), models=("smallcnn", "resnet18", "resnet34",
                                                             "resnet50"))
    data = load(fab.location)
    ans = effects.answer(data.trials, data.predictions, families.same_model).set_index("task")
    fine = ans.loc[FINE]
    assert (fine["best_model"], fine["best_resolution"], fine["lowest_resolution"]) == ("resnet34", 128, 64)
    at_64 = data.trials[(data.trials["task"] == FINE) & (data.trials["resolution"] == 64)]
    assert at_64.loc[at_64["best_auroc"].idxmax(), "model"] == "resnet50"
    assert fine["baseline_model"] == "resnet34"   # the same model at the lowest, not the best there
    k = task_key(FINE)
    a, b = fab.scores[(f"r128-resnet34-s0-multi-0123456789", k)], fab.scores[(f"r64-resnet34-s0-multi-0123456789", k)]
    labels = fab.labels[_mask(fab, k), KEYS.index(k)]
    t = delong.paired_test(labels, a, b)
    assert fine["delta"] == pytest.approx(roc_auc_score(labels, a) - roc_auc_score(labels, b), abs=1e-12)
    assert fine["p_value"] == pytest.approx(t.p_value, rel=1e-9)
    assert fine["delta_ci_low"] == pytest.approx(t.difference - delong.Z95 * t.se, abs=1e-12)
    assert fine["delta"] > 0 and fine["p_value"] < 0.05 and fine["studies"] == len(labels)


def test_answer_says_when_the_best_is_the_lowest_resolution(tmp_path):
    fab = fabricate(tmp_path, resolutions=(64, 128), models=("resnet34",))
    data = load(fab.location)
    # Make the coarse task's best run the one at 64 px by construction: drop the 128 px rows.
    trials = data.trials[~((data.trials["task"] == COARSE) & (data.trials["resolution"] == 128))]
    row = effects.answer(trials, data.predictions, families.same_model).set_index("task").loc[COARSE]
    assert row["best_resolution"] == 64 and math.isnan(row["delta"]) and math.isnan(row["p_value"])


def test_baseline_falls_back_to_the_best_model_at_the_lowest_resolution(tmp_path):
    fab = fabricate(tmp_path, resolutions=(64, 128), models=("resnet18", "resnet34"),
                    finished=lambda p: not (p["model"] == "resnet34" and p["resolution"] == 64))
    data = load(fab.location)
    row = effects.answer(data.trials, data.predictions, families.same_model).set_index("task").loc[FINE]
    assert (row["best_model"], row["best_resolution"], row["baseline_model"]) == ("resnet34", 128, "resnet18")


# --- families ----------------------------------------------------------------------------------
def test_families_and_size_order():
    """From the registry's metadata where it knows the model, else from the name."""
    sizes = [families.family_and_size(n) for n in ("resnet18", "resnet34", "resnet50", "resnet152")]
    assert {f for f, _ in sizes} == {"resnet"}
    assert [s for _, s in sizes] == sorted(s for _, s in sizes) and len({s for _, s in sizes}) == 4
    assert families.family_and_size("densenet121")[0] == families.family_and_size("densenet161")[0] == "densenet"
    assert families.family_and_size("efficientnet-b3")[0] == "efficientnet"
    assert families.family("smallcnn") == "smallcnn"
    # A model an older sweep ran that the registry does not know: parsed from its name.
    assert families.family_and_size("wideresnet999") == ("wideresnet", 999.0)
    assert families.family_and_size("notamodel") == ("notamodel", None)


def test_every_pair_of_sizes_of_one_family_is_a_scaling_pair(tmp_path):
    fab = fabricate(tmp_path, resolutions=(64,), models=("smallcnn", "resnet18", "resnet34", "resnet50"),
                    seeds=(0, 1))
    data = load(fab.location)
    s = families.scaling_pairs(data.trials)
    pairs = set(zip(s["larger"], s["smaller"]))
    assert pairs == {("resnet34", "resnet18"), ("resnet50", "resnet18"), ("resnet50", "resnet34")}
    assert len(s) == 3 * len(TASKS)
    t = data.trials
    row = s[(s["task"] == FINE) & (s["larger"] == "resnet34") & (s["smaller"] == "resnet18")].iloc[0]
    fine = t[t["task"] == FINE].groupby("model")["best_auroc"]
    assert row["delta_mean"] == pytest.approx(fine.mean()["resnet34"] - fine.mean()["resnet18"], abs=1e-12)
    assert row["delta_max"] == pytest.approx(fine.max()["resnet34"] - fine.max()["resnet18"], abs=1e-12)
    assert row["best_model"] == "resnet50"     # the planted best for the fine task at 64 px
    assert set(s[s["task"] == COARSE]["best_model"]) == {"resnet34"}


def test_compound_scaling_is_one_model_across_resolutions(tmp_path):
    fab = fabricate(tmp_path, resolutions=(64, 128), models=("efficientnet", "resnet18"))
    data = load(fab.location)
    c = families.compound_scaling(data.trials)
    assert sorted(set(zip(c["resolution"], c["model"]))) == [(64, "efficientnet-b0"), (128, "efficientnet-b1")]
    assert families.same_model("efficientnet-b0", "efficientnet-b1")
    assert not families.same_model("resnet18", "resnet34")
    assert families.scaling_pairs(data.trials).empty   # b0 and b1 never ran at one resolution
