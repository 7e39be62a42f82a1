"""DeLong at the edges, end to end: the reason for a missing or degenerate interval or test travels
from the predictions to trials.csv and the test tables."""
from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis import aggregate as agg
from analysis import comparisons
from analysis.records import load_sweep
from common import storage
from common.sweep_folder import SweepFolder

try:  # tests/ as a plain folder (pytest's default rootdir import) or as a package
    from test_aggregate import fabricate_sweep
except ImportError:
    from tests.test_aggregate import fabricate_sweep


def rewrite_predictions(sweep_loc: str, trial_id: str, epoch: int, task: str, labels=None,
                        probability=None) -> None:
    folder = SweepFolder(sweep_loc).trial(trial_id)
    frame = folder.read_predictions(epoch)
    rows = frame["task"] == task
    if labels is not None:
        frame.loc[rows, "label"] = labels(frame.loc[rows, "label"].to_numpy())
    if probability is not None:
        frame.loc[rows, "probability"] = probability(frame.loc[rows, "label"].to_numpy())
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buf)
    storage.write_bytes(folder.predictions_path(epoch), buf.getvalue())


def one_positive(labels: np.ndarray) -> np.ndarray:
    out = np.where(np.isnan(labels), np.nan, 0.0).astype(np.float32)
    out[np.flatnonzero(~np.isnan(labels))[0]] = 1.0
    return out


def test_single_positive_and_perfect_separation_reach_the_tables(tmp_path):
    fake = fabricate_sweep(tmp_path, resolutions=(64, 96), models=("resnet18",), seeds=(0,), epochs=1)
    low, high = (t.trial_id for t in fake.trials)
    for tid in (low, high):   # Edema: one positive study in the validation set of both runs
        rewrite_predictions(fake.location, tid, 1, "edema", labels=one_positive)
    # Atelectasis at 96 px: every positive scored above every negative (AUROC 1.0).
    rewrite_predictions(fake.location, high, 1, "atelectasis",
                        probability=lambda y: np.where(y == 1, 0.9, 0.1).astype(np.float32))
    summary = agg.aggregate_sweep(fake.location, str(tmp_path / "out"), report=False)
    assert summary.counts["finished"] == 2
    trials = pd.read_csv(tmp_path / "out" / "trials.csv", keep_default_na=False, na_values=[""])
    edema = trials[trials["task_key"] == "edema"]
    assert edema["ci_low"].isna().all() and edema["ci_high"].isna().all()
    assert edema["ci_note"].str.startswith("1 positive case only").all()
    assert (edema["n_pos"] == 1).all()
    perfect = trials[(trials["task_key"] == "atelectasis") & (trials["resolution"] == 96)].iloc[0]
    assert (perfect["auroc_from_predictions"], perfect["ci_low"], perfect["ci_high"]) == (1.0, 1.0, 1.0)
    assert perfect["ci_note"].startswith("degenerate")
    ordinary = trials[(trials["task_key"] == "cardiomegaly")]
    assert ordinary["ci_note"].isna().all() and (ordinary["ci_low"] < ordinary["ci_high"]).all()

    tests = pd.read_csv(tmp_path / "out" / "tests_resolution.csv")
    row = tests[tests["task"] == "Edema"].iloc[0]
    assert math.isnan(row["p_value"]) and math.isnan(row["p_holm"]) and not row["significant"]
    assert "undefined" in row["note"]
    assert tests[tests["task"] == "Cardiomegaly"]["p_value"].notna().all()
    summary_tests = pd.read_csv(tmp_path / "out" / "tests_resolution_summary.csv")
    assert summary_tests.set_index("task").at["Edema", "tested"] == 0
    assert summary_tests.set_index("task").at["Cardiomegaly", "tested"] == 1


def test_a_pair_without_predictions_is_listed_not_dropped(tmp_path):
    fake = fabricate_sweep(tmp_path, resolutions=(64, 96), models=("resnet18",), seeds=(0,), epochs=1)
    storage.delete(SweepFolder(fake.location).trial(fake.trials[0].trial_id).predictions_path(1))
    data = load_sweep(fake.location)
    tests = comparisons.resolution_tests(data)
    assert len(tests) == 5 and tests["p_value"].isna().all()
    assert set(tests["note"]) == {"predictions missing: no test"}


def test_best_runs_show_the_best_model_by_mean_not_a_lucky_seed():
    """Grad-CAM's checkpoint is the best model's best seed: the model the answer names, not the
    single highest run of a model that is worse on average."""
    import pandas as pd
    from analysis.tables import best_runs
    rows = [  # (model, seed, AUROC): resnet18 has the single best run, densenet121 the best mean
        ("resnet18", 0, 0.95), ("resnet18", 1, 0.70),
        ("densenet121", 0, 0.88), ("densenet121", 1, 0.90),
    ]
    trials = pd.DataFrame([{"task_mode": "multi", "task_key": "edema", "task": "Edema", "resolution": 320,
                            "model": m, "seed": s, "best_auroc": a, "trial_id": f"{m}-{s}"}
                           for m, s, a in rows])
    (best,) = best_runs(trials).to_dict("records")
    assert (best["model"], best["seed"]) == ("densenet121", 1)
