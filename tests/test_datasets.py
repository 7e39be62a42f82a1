"""Dataset adapters: every layout end to end from the phantom (build, verify, read), the labels each
adapter derives, and bad input refused in one line with nothing written."""
from __future__ import annotations

import argparse
import csv
import gzip
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.cli import UserError, run_cli
from common.schema import OBSERVATIONS, TASKS, label_column, raw_column
from preprocessing import build, stats
from preprocessing.datasets import DatasetOptions, get_dataset, list_datasets, load_labels
from preprocessing.datasets.csv_table import columns_from
from preprocessing.datasets.nih import FINDINGS
from preprocessing.manifest import verify_store
from preprocessing.phantom import make_phantom
from preprocessing.phantom_layouts import LAYOUTS, NIH_NAME
from preprocessing.store import open_store

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NIH_TABLE = SHARED_DATA / "nih_data_entry_2017_v2020.csv.gz"


def cli(module, argv):
    def main(args):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        return module.run(parser.parse_args(args))
    return run_cli(main, argv, prog="preprocessing")


@pytest.fixture(scope="module", params=LAYOUTS)
def phantom(request, tmp_path_factory):
    layout = request.param
    root = tmp_path_factory.mktemp(f"phantom-{layout}")
    info = make_phantom(str(root), studies=30, seed=2, min_size=64, max_size=96, layout=layout)
    return layout, root, info


def _options(layout, root):
    return DatasetOptions(columns=columns_from(str(root / "columns.yaml"), {})) if layout == "csv" else None


def test_registry_lists_every_phantom_layout():
    assert list_datasets() == sorted(LAYOUTS)
    with pytest.raises(UserError, match="unknown dataset 'nhi' \\(did you mean nih\\?\\)"):
        get_dataset("nhi")


def test_every_layout_builds_verifies_and_reads(phantom, tmp_path):
    layout, root, info = phantom
    tables = [str(root / t) for t in info["tables"]]
    out = str(tmp_path / "store")
    manifest = build.build_store(str(root), tables, out, resolutions=[32], use_ray=False, progress=False,
                                 dataset=layout, dataset_options=_options(layout, root))
    assert verify_store(out) == []
    assert manifest["dataset"] == "phantom" and manifest["layout"] == layout
    assert manifest["counts"]["rejected"] == 0
    store = open_store(out)
    assert store.layout == layout and store.is_phantom
    expected = FINDINGS if layout == "nih" else TASKS
    assert store.tasks == list(expected) and store.default_tasks == list(expected)
    images = sum(c["images"] for c in info["counts"].values())
    assert manifest["counts"]["stored"] == images
    rows = pd.concat([store.read(32, s).to_pandas() for s in store.splits])
    assert rows["image_id"].is_unique and len(rows) == images
    # A patient's images are all in one split; every study's images share their labels.
    assert (rows.groupby("patient_id")["split"].nunique() == 1).all()
    for t in store.tasks:
        assert (rows.groupby("study_id")[raw_column(t)].nunique(dropna=False) <= 1).all()
    if layout == "nih":
        assert set(store.splits) == {"train", "valid", "test"}   # test = test_list.txt
        assert rows["view"].eq("Frontal").all() and rows["ap_pa"].isin(["AP", "PA"]).all()
        assert not (rows[[raw_column(t) for t in FINDINGS]].isna().any().any())   # no blank, no uncertain
    elif layout == "mimic-cxr-jpg":
        assert set(store.splits) == {"train", "valid"}
        assert rows["study_id"].str.fullmatch(r"p1\d{7}/s5\d{7}").all()
        assert set(rows["view"]) == {"Frontal", "Lateral"}


def test_labels_follow_each_layouts_rules(phantom):
    """The same planted studies, read through each adapter: the labels are the layout's own."""
    layout, root, info = phantom
    tables = [str(root / t) for t in info["tables"]]
    _, labels = load_labels(layout, tables, image_root=str(root), tasks="all", options=_options(layout, root))
    frame = labels.frame
    chexpert = pd.concat([pd.read_csv(root / f, dtype=str, keep_default_na=False) for f in ("train.csv", "valid.csv")]) \
        if layout == "chexpert" else None
    if layout == "nih":
        table = pd.read_csv(root / "Data_Entry_2017_v2020.csv", dtype=str)
        for finding in FINDINGS:
            listed = table["Finding Labels"].str.split("|").apply(lambda f: finding in f)
            got = frame.set_index("image_id").loc[table["Image Index"], raw_column(finding)].to_numpy()
            assert np.array_equal(got, listed.to_numpy().astype("float32")), finding
        assert frame["image_path"].str.fullmatch(r"images_\d{3}/images/\d{8}_\d{3}\.png").all()
        assert frame["image_path"].str[:10].nunique() >= 1
        assert set(labels.tasks) == set(FINDINGS) and set(NIH_NAME.values()) <= set(FINDINGS)
    elif layout == "chexpert":
        assert labels.tasks == OBSERVATIONS
        raw = chexpert.set_index("Path").loc[frame["image_id"], "Edema"].replace("", np.nan).astype(float)
        assert np.array_equal(raw.to_numpy(), frame[raw_column("Edema")].to_numpy(), equal_nan=True)
    elif layout == "mimic-cxr-jpg":
        # Uncertain (-1) labels get the same per-task policy as CheXpert's.
        assert (frame[raw_column("Atelectasis")] == -1).any() or (frame[raw_column("Consolidation")] == -1).any()
        for task, uncertain in (("Atelectasis", 1.0), ("Cardiomegaly", 0.0)):
            sel = frame[raw_column(task)] == -1
            assert (frame.loc[sel, label_column(task)] == uncertain).all()
        sel = frame[raw_column("Consolidation")] == -1
        assert frame.loc[sel, label_column("Consolidation")].isna().all()
    else:
        assert labels.tasks == TASKS and frame["view"].isin(["Frontal", "Lateral"]).all()


def test_nih_without_split_lists_splits_patients_by_hash(phantom):
    layout, root, info = phantom
    if layout != "nih":
        pytest.skip("NIH only")
    table = str(root / "Data_Entry_2017_v2020.csv")
    _, a = load_labels("nih", [table], options=DatasetOptions(valid_fraction=0.3))
    _, b = load_labels("nih", [table], options=DatasetOptions(valid_fraction=0.3))
    assert set(a.frame["split"]) == {"train", "valid"}
    assert a.frame["split"].tolist() == b.frame["split"].tolist()       # deterministic
    assert (a.frame.groupby("patient_id")["split"].nunique() == 1).all()  # patient-level
    # --views PA: AP rows are rejected with the reason, never dropped silently.
    _, pa = load_labels("nih", [table], options=DatasetOptions(views=("PA",)))
    assert set(pa.frame["ap_pa"]) == {"PA"}
    assert len(pa.frame) + len(pa.rejects) == pa.rows_in
    assert {r.reason for r in pa.rejects} == {"view AP not selected (--views PA)"}


def test_csv_flags_override_the_yaml_file(tmp_path):
    spec = tmp_path / "cols.yaml"
    spec.write_text("path: file\nlabels: [A, B]\nsplit: fold\n")
    assert columns_from(str(spec), {"labels": "C", "path": None}) == {"path": "file", "labels": ["C"], "split": "fold"}
    spec.write_text("path: file\nlabel: [A]\n")
    with pytest.raises(UserError, match="unknown key\\(s\\) label"):
        columns_from(str(spec), {})


# --- bad input: one line, non-zero exit, nothing written --------------------------------------------

def _build(root, tables, out, *extra):
    args = ["--image-root", str(root), "--out", str(out), "--resolutions", "16", "--no-ray", "--no-progress"]
    for t in tables:
        args += ["--csv", str(t)]
    return cli(build, args + list(extra))


@pytest.mark.parametrize("case", ["unknown dataset", "missing columns", "unknown task", "unknown finding"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    root = tmp_path / "nih"
    info = make_phantom(str(root), studies=12, seed=4, min_size=64, max_size=80, layout="nih")
    tables = [root / t for t in info["tables"]]
    entry = root / "Data_Entry_2017_v2020.csv"
    extra = ["--dataset", "nih"]
    expect = ""
    if case == "unknown dataset":
        extra, expect = ["--dataset", "chestxray99"], "unknown dataset 'chestxray99'"
    elif case == "missing columns":
        frame = pd.read_csv(entry, dtype=str).drop(columns=["Patient ID", "View Position"])
        frame.to_csv(entry, index=False)
        expect = "missing column(s) 'Patient ID', 'View Position'"
    elif case == "unknown task":
        extra, expect = extra + ["--tasks", "Cardiomegaly,Pleural Effusion"], \
            "'Pleural Effusion' is not a label of dataset nih"
    elif case == "unknown finding":
        frame = pd.read_csv(entry, dtype=str)
        frame.loc[2, "Finding Labels"] = "Cardiomegaly|Pneumomediastinum"
        frame.to_csv(entry, index=False)
        expect = "row 3, column 'Finding Labels': unknown finding 'Pneumomediastinum'"
    out = tmp_path / "store"
    code = _build(root, tables, out, *extra)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and expect in err, err
    assert not out.exists()


def test_csv_path_outside_the_root_is_refused(tmp_path, capsys):
    root = tmp_path / "csv"
    info = make_phantom(str(root), studies=8, seed=5, min_size=64, max_size=80, layout="csv")
    table = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    table.loc[1, "file"] = "../elsewhere/x.jpg"
    table.to_csv(root / "labels.csv", index=False)
    code = _build(root, [root / "labels.csv"], tmp_path / "store", "--dataset", "csv", "--columns",
                  str(root / "columns.yaml"))
    err = capsys.readouterr().err
    assert code == 2 and "labels.csv row 2: image path '../elsewhere/x.jpg' is outside the image root" in err
    assert not (tmp_path / "store").exists() and info["tables"] == ["labels.csv"]


def test_patient_in_two_splits_is_refused(tmp_path, capsys):
    root = tmp_path / "csv"
    make_phantom(str(root), studies=8, seed=5, min_size=64, max_size=80, layout="csv")
    table = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    first = table.iloc[0]
    copy = first["file"].replace(".jpg", "-again.jpg")
    (root / copy).write_bytes((root / first["file"]).read_bytes())
    other = "valid" if first["fold"] == "train" else "train"
    table = pd.concat([table, first.to_frame().T.assign(file=copy, exam=first["exam"] + "b", fold=other)])
    table.to_csv(root / "labels.csv", index=False)
    code = _build(root, [root / "labels.csv"], tmp_path / "store", "--dataset", "csv", "--columns",
                  str(root / "columns.yaml"))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"patient '{first['subject']}' is in more than one split (train, valid)" in err
    assert not (tmp_path / "store").exists()


def test_missing_nih_image_is_a_counted_reject(tmp_path):
    root = tmp_path / "nih"
    info = make_phantom(str(root), studies=10, seed=6, min_size=64, max_size=80, layout="nih")
    victim = sorted((root / "images_001" / "images").iterdir())[0]
    victim.unlink()
    tables = [str(root / t) for t in info["tables"]]
    manifest = build.build_store(str(root), tables, str(tmp_path / "s"), resolutions=[16], use_ray=False,
                                 progress=False, dataset="nih")
    assert manifest["counts"]["rejected"] == 1 and manifest["counts"]["per_split"]["unassigned"]["rejected"] == 1
    with open(tmp_path / "s" / "rejects.csv") as f:
        (reject,) = list(csv.DictReader(f))
    assert reject == {"csv": "Data_Entry_2017_v2020.csv", "row": reject["row"], "path": victim.name,
                      "reason": "missing image file"}


def test_stats_for_nih_prints_per_finding_counts(tmp_path, capsys):
    root = tmp_path / "nih"
    make_phantom(str(root), studies=10, seed=7, min_size=64, max_size=80, layout="nih")
    assert cli(stats, ["--dataset", "nih", "--csv", str(root / "Data_Entry_2017_v2020.csv")]) == 0
    text = capsys.readouterr().out
    assert "SYNTHETIC PHANTOM DATA" in text and "dataset: nih" in text
    for finding in FINDINGS:
        assert finding in text


@pytest.mark.skipif(not NIH_TABLE.exists(), reason="../shared/data not present")
def test_real_nih_table_counts_match_an_independent_pandas_count(capsys):
    import json
    assert cli(stats, ["--dataset", "nih", "--csv", str(NIH_TABLE), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    with gzip.open(NIH_TABLE, "rt") as f:
        table = pd.read_csv(io.StringIO(f.read()))
    assert result["rows_in"] == result["accepted"] == len(table) == 112_120
    tokens = table["Finding Labels"].str.split("|")
    for finding in FINDINGS:
        expected = int(tokens.apply(lambda f: finding in f).sum())
        positives = sum(s["tasks"][finding]["positive"] for s in result["splits"].values())
        negatives = sum(s["tasks"][finding]["negative"] for s in result["splits"].values())
        assert positives == expected, finding
        assert positives + negatives == len(table), finding     # no uncertain, no blank
    assert sum(s["patients"] for s in result["splits"].values()) == table["Patient ID"].nunique()
    # And the text table names every finding with its count.
    assert cli(stats, ["--dataset", "nih", "--csv", str(NIH_TABLE)]) == 0
    text = capsys.readouterr().out
    assert "Pleural_Thickening" in text and "Hernia" in text


def test_one_trial_trains_on_each_layouts_own_task_names(phantom, tmp_path):
    """A store of any layout trains: the trainer reads its tasks by the dataset's own names."""
    torch = pytest.importorskip("torch")
    from common.schema import task_key
    from trainer.config import TrainConfig
    from trainer.train import run_trial
    layout, root, info = phantom
    out = str(tmp_path / "store")
    build.build_store(str(root), [str(root / t) for t in info["tables"]], out, resolutions=[32], use_ray=False,
                      progress=False, dataset=layout, dataset_options=_options(layout, root))
    tasks = ("Cardiomegaly", "Effusion") if layout == "nih" else ("Cardiomegaly", "Pleural Effusion")
    assert set(tasks) <= set(open_store(out).tasks)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig(store=out, model="smallcnn", resolution=32, weights="none", tasks=tasks,
                          epochs_frozen=1, epochs_unfrozen=1, batch_studies=8, augment=False, workers=0)
        result = run_trial(cfg, str(tmp_path / "trial"))
    finally:
        torch.set_num_threads(threads)
    assert result["tasks"] == [task_key(t) for t in tasks]
    assert len(result["history"]) == 2
    for key in result["tasks"]:
        assert f"auroc_{key}" in result["history"][-1]
