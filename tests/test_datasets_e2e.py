"""Every dataset layout end to end, by the dataset's own task names: the phantom in that layout,
``preprocessing build`` and ``verify`` through the command line, one real trial on the store's
default tasks, and the aggregator over a sweep folder holding that trial. Then NIH from real
label rows (a sweep on the embedded local Ray and its report), and a task the dataset does not
have refused by the trainer and the sweep in one line with nothing written.

The real NIH table is not part of the repository; the test that reads it skips when it is absent.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.cli import run_cli
from common.schema import label_column, task_key
from common.sweep_folder import SweepFolder
from preprocessing import __main__ as preprocessing_cli
from preprocessing.datasets.nih import FINDINGS
from preprocessing.phantom_layouts import CSV_COLUMNS_FILE, LAYOUTS
from preprocessing.store import open_store

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NIH_TABLE = SHARED_DATA / "nih_data_entry_2017_v2020.csv.gz"
NIH_IMAGES = SHARED_DATA / "nih_images"

#: What each layout's store trains on unless told: the dataset's own label names.
CHEXPERT_FIVE = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
DEFAULT_TASKS = {"chexpert": CHEXPERT_FIVE, "nih": list(FINDINGS), "mimic-cxr-jpg": CHEXPERT_FIVE,
                 "csv": CHEXPERT_FIVE}
TRIAL = {"model": "smallcnn", "resolution": 32, "weights": "none", "epochs_frozen": 1,
         "epochs_unfrozen": 1, "batch_studies": 8, "augment": False, "workers": 0, "device": "cpu"}


def preprocessing(*argv) -> int:
    return run_cli(preprocessing_cli.main, [str(a) for a in argv], prog="preprocessing")


@pytest.fixture
def one_thread():
    """One torch thread: the machine's cores are shared, and CPU results are exact at any count."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_layout_store(layout: str, root: Path) -> str:
    """phantom -> build -> verify through ``python -m preprocessing``; the store's location."""
    images = root / "images"
    assert preprocessing("phantom", "--out", images, "--studies", 36, "--seed", 3, "--min-size", 64,
                         "--max-size", 80, "--layout", layout, "--valid-fraction", 0.35) == 0
    tables = sorted(p.name for p in images.iterdir() if p.is_file()
                    and p.suffix in (".csv", ".txt") and p.name != "phantom.json")
    store = root / "store"
    argv = ["build", "--dataset", layout, "--image-root", images, "--out", store, "--resolutions", 32,
            "--no-ray", "--no-progress"]
    for t in tables:
        argv += ["--csv", images / t]
    if layout == "csv":
        argv += ["--columns", images / CSV_COLUMNS_FILE]
    if layout == "nih":   # test_list.txt takes a third; more of the rest to valid than NIH's default
        argv += ["--valid-fraction", 0.4]
    assert preprocessing(*argv) == 0
    assert preprocessing("verify", store) == 0
    return str(store)


def sweep_folder_with(store_loc: str, sweep_loc: str, tasks: list[str], *, run_trial) -> tuple[str, dict]:
    """A one-trial sweep folder written by the sweep's own writers (sweep.json, ledger), its trial
    trained by ``run_trial`` in the folder the sweep would give it; (trial id, result)."""
    from orchestrator import ledger
    from orchestrator.grid import build_grid
    from orchestrator.sweep import plan_trials, write_sweep_file
    from trainer.config import TrainConfig
    store = open_store(store_loc)
    base = TrainConfig.from_dict({**TRIAL, "store": store_loc, "tasks": list(tasks)})
    (trial,) = plan_trials(build_grid([32], ["smallcnn"], [0]), base, store.manifest_hash)
    write_sweep_file(sweep_loc, name=os.path.basename(sweep_loc), store_loc=store_loc,
                     manifest_hash=store.manifest_hash, trials=[trial], base=base,
                     axes={"resolutions": [32], "models": ["smallcnn"], "seeds": [0], "task_mode": "multi"},
                     command="python -m orchestrator.sweep (test)", run_id="run-1")
    tid = trial.trial_id
    ledger.register(sweep_loc, tid, trial.params.as_dict(), "run-1")
    ledger.mark_running(sweep_loc, tid, run_id="run-1", node="127.0.0.1", gpu_ids=[], cuda_visible_devices=None)
    result = run_trial(trial.config, SweepFolder(sweep_loc).trial(tid).location)
    ledger.mark_finished(sweep_loc, tid, ledger.result_summary(result))
    return tid, result


# --- 1. every layout: build, verify, one trial, aggregate ------------------------------------------

@pytest.mark.filterwarnings("ignore:AUROC of .* is undefined")   # rare findings of a tiny phantom
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_builds_trains_and_aggregates_by_its_own_task_names(layout, tmp_path, one_thread):
    from analysis.aggregate import aggregate_sweep
    from trainer.train import run_trial
    store_loc = build_layout_store(layout, tmp_path)
    store = open_store(store_loc)
    assert store.layout == layout and store.default_tasks == DEFAULT_TASKS[layout]
    tasks = store.default_tasks
    keys = [task_key(t) for t in tasks]

    sweep_loc = str(tmp_path / "sweeps" / layout)
    tid, result = sweep_folder_with(store_loc, sweep_loc, tasks, run_trial=run_trial)
    assert result["tasks"] == keys and len(result["history"]) == 2
    for record in result["history"]:
        assert {f"auroc_{k}" for k in keys} <= set(record)
    # A best epoch for every task whose validation split holds both classes (a tiny phantom's
    # rarest NIH findings may have no positive there, and then no AUROC).
    defined = {k for k in keys if any(r[f"auroc_{k}"] is not None and np.isfinite(r[f"auroc_{k}"])
                                      for r in result["history"])}
    assert set(result["best"]) == defined and len(defined) >= min(len(keys), 4)
    # The trial's validation labels are the store's labels for that dataset's names.
    valid = store.read(32, "valid").to_pandas()
    predictions = SweepFolder(sweep_loc).trial(tid).read_predictions(1)
    assert set(predictions["task"]) == set(keys)
    for task in tasks:
        per_study = valid.groupby("study_id")[label_column(task)].first().dropna()
        got = predictions[predictions["task"] == task_key(task)].set_index("study_id")["label"]
        assert got.sort_index().to_dict() == per_study.astype(got.dtype).sort_index().to_dict(), task

    summary = aggregate_sweep(sweep_loc, figures=False)
    out = Path(SweepFolder(sweep_loc).results_dir)
    trials = pd.read_parquet(out / "trials.parquet")
    assert (trials["trial_id"] == tid).all()
    by_key = dict(zip(keys, tasks))
    assert sorted(trials["task"]) == sorted(by_key[k] for k in defined) and summary.trials == len(defined)
    for row in trials.itertuples():
        assert row.task == by_key[row.task_key]
        assert (row.best_epoch, row.best_auroc) == (result["best"][row.task_key]["epoch"],
                                                    result["best"][row.task_key]["auroc"])
    report = (out / "report.md").read_text()
    for key in defined:
        assert by_key[key] in report, by_key[key]
    if layout == "nih":   # NIH's own names, never CheXpert's
        assert "effusion" in defined and "Effusion" in set(trials["task"])
        assert not {"pleural_effusion", "Pleural Effusion"} & (set(trials["task"]) | set(trials["task_key"]))


# --- 2. NIH from real label rows: build, sweep on the local Ray, report ------------------------------

def real_nih_subset() -> pd.DataFrame:
    """A deterministic slice of the real table: each patient's first film, the first 30 patients
    with Effusion, 30 with Pneumothorax and 30 with No Finding, plus the two films whose real
    images are at hand. The rows are the published rows, unchanged."""
    with gzip.open(NIH_TABLE, "rt") as f:
        table = pd.read_csv(io.StringIO(f.read()), dtype=str, keep_default_na=False)
    table = table[table["View Position"].isin(["PA", "AP"])]
    first = table.sort_values("Image Index").drop_duplicates("Patient ID")
    findings = first["Finding Labels"].str.split("|")
    picked = [first[findings.apply(lambda f, n=name: n in f)].head(30)
              for name in ("Effusion", "Pneumothorax", "No Finding")]
    real = table[table["Image Index"].isin([p.name for p in NIH_IMAGES.glob("*.png")])]
    return pd.concat(picked + [real]).drop_duplicates("Image Index").sort_values("Image Index")


def write_nih_images(subset: pd.DataFrame, root: Path) -> None:
    """The real films where they are at hand, otherwise a 64 px synthetic film with the same
    name, spread over NIH's own images_NNN/images/ folders."""
    for n, name in enumerate(subset["Image Index"]):
        folder = root / f"images_{n // 25 + 1:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        if (NIH_IMAGES / name).exists():
            (folder / name).write_bytes((NIH_IMAGES / name).read_bytes())
            continue
        seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
        pixels = np.random.default_rng(seed).integers(0, 256, (64, 64), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)


@pytest.mark.skipif(not NIH_TABLE.exists(), reason="the real NIH table is not present")
def test_real_nih_rows_build_sweep_and_report_on_nih_task_names(tmp_path, one_thread):
    from test_sweep_helpers import local_ray, run_small_sweep
    subset = real_nih_subset()
    root = tmp_path / "nih"
    root.mkdir()
    table = root / "Data_Entry_2017_v2020.csv"
    subset.to_csv(table, index=False)
    write_nih_images(subset, root)
    assert len(list(root.glob("images_*/images/*.png"))) == len(subset)
    store_loc = str(tmp_path / "store")
    assert preprocessing("build", "--dataset", "nih", "--image-root", root, "--csv", table, "--out", store_loc,
                         "--resolutions", 32, "--valid-fraction", 0.3, "--no-ray", "--no-progress") == 0
    assert preprocessing("verify", store_loc) == 0
    store = open_store(store_loc)
    assert store.tasks == list(FINDINGS) and store.manifest["counts"]["stored"] == len(subset)
    rows = pd.concat([store.read(32, s).to_pandas() for s in store.splits])
    assert sorted(rows["image_id"]) == sorted(subset["Image Index"])
    # The labels are the real rows' findings.
    for finding in FINDINGS:
        listed = subset.set_index("Image Index")["Finding Labels"].str.split("|").apply(lambda f, n=finding: n in f)
        got = rows.set_index("image_id")[label_column(finding)].loc[listed.index]
        assert np.array_equal(got.to_numpy(), listed.to_numpy().astype("float32")), finding

    valid = store.read(32, "valid").to_pandas()
    both = [t for t in ("Effusion", "Pneumothorax", "Infiltration", "Atelectasis")
            if valid[label_column(t)].nunique() == 2]
    tasks = both[:3]
    assert len(tasks) >= 2, both

    with local_ray():
        out = io.StringIO()
        res = run_small_sweep(store_loc, str(tmp_path / "sweeps"), "nih", resolutions=(32,), models=("smallcnn",),
                              seeds=(0,), tasks=tuple(tasks), cpus_per_trial=1, progress="lines",
                              results_dir=str(tmp_path / "results"), out=out,
                              config={k: v for k, v in TRIAL.items() if k not in ("model", "resolution")})
    text = out.getvalue()
    assert res.exit_code == 0 and len(res.trial_ids) == 1 and res.ran == res.trial_ids, text
    (tid,) = res.trial_ids
    result = SweepFolder(res.sweep_loc).trial(tid).read_result()
    assert result["tasks"] == [task_key(t) for t in tasks]
    assert result["config"]["tasks"] == tasks

    results = tmp_path / "results"
    trials = pd.read_csv(results / "trials.csv")
    assert sorted(trials["task"]) == sorted(tasks)
    for row in trials.itertuples():
        assert row.best_auroc == result["best"][row.task_key]["auroc"]
    summary = pd.read_csv(results / "summary_resolution.csv")
    assert sorted(summary["task"]) == sorted(tasks)
    report = (results / "report.md").read_text()
    for task in tasks:
        assert task in report, task
    assert "Pleural Effusion" not in report
    assert "report:" in text


# --- 3. a task the dataset does not have --------------------------------------------------------------

@contextlib.contextmanager
def ray_files_contained():
    """Every file a Ray started in this block would write goes to a temporary folder, removed after."""
    from test_sweep_helpers import ray_env, refresh_ray_auth
    mp = pytest.MonkeyPatch()
    base = ray_env(mp)
    try:
        yield
    finally:
        mp.undo()
        refresh_ray_auth()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def nih_store(tmp_path_factory):
    return build_layout_store("nih", tmp_path_factory.mktemp("nih-e2e"))


@pytest.mark.parametrize("entry", ["trainer.train", "orchestrator.sweep"])
def test_a_task_the_dataset_lacks_is_one_line_and_writes_nothing(entry, nih_store, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)   # no settings file of the sweep's is picked up from elsewhere
    if entry == "trainer.train":
        from trainer.train import main
        target = tmp_path / "trial"
        argv = ["--store", nih_store, "--model", "smallcnn", "--resolution", "32", "--weights", "none",
                "--tasks", "Effusion,Pleural Effusion", "--out", str(target)]
    else:
        from orchestrator.sweep import main
        target = tmp_path / "sweeps"
        argv = ["--store", nih_store, "--storage", str(target), "--name", "nih", "--resolutions", "32",
                "--models", "smallcnn", "--weights", "none", "--tasks", "Effusion,Pleural Effusion"]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with ray_files_contained():   # were the check to slip, the sweep would start its embedded Ray
        code = run_cli(main, argv, prog=entry)
    err = capsys.readouterr().err
    assert code != 0, err
    # The phantom store's banner may come first; the error itself is one line.
    lines = [line for line in err.strip().splitlines() if "SYNTHETIC PHANTOM" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"{entry}: error:") and "Pleural Effusion" in lines[0], err
    assert "Traceback" not in err
    assert not target.exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.filterwarnings("ignore:AUROC of .* is undefined")
def test_trainer_cli_without_tasks_trains_on_the_stores_own_tasks(nih_store, tmp_path, capsys, one_thread):
    """``python -m trainer.train --store NIH-STORE`` needs no --tasks: NIH's 14 findings, as the sweep."""
    from trainer.train import main
    out = tmp_path / "trial"
    code = run_cli(main, ["--store", nih_store, "--model", "smallcnn", "--resolution", "32", "--weights", "none",
                          "--epochs-frozen", "1", "--epochs-unfrozen", "0", "--batch-studies", "8",
                          "--no-augment", "--workers", "0", "--device", "cpu", "--quiet", "--out", str(out)],
                   prog="trainer.train")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    from common.trial_folder import TrialFolder
    result = TrialFolder(str(out)).read_result()
    assert result["tasks"] == [task_key(t) for t in FINDINGS]
    assert result["config"]["tasks"] == list(FINDINGS)
    assert "effusion" in result["best"]
    (best_line,) = [line for line in captured.out.splitlines() if line.startswith("best epoch per task:")]
    assert "effusion" in best_line and "pleural_effusion" not in captured.out
