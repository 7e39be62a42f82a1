"""The label stage: header/value validation, policy per task, study grouping, conflicts, rejects."""
import csv
import gzip
import hashlib
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.cli import UserError
from preprocessing.labels import LabelError, LabelSet, Reject, parse_policy, read_labels
from common.schema import DEFAULT_POLICY, META_COLUMNS, OBSERVATIONS, TASKS

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HEADER = [*META_COLUMNS, *OBSERVATIONS]
ROOT = "CheXpert-v1.0-small"


def row(path, atel="", card="", cons="", edema="", eff="", view="Frontal", ap_pa="AP"):
    """A full CheXpert row; the five task values by name, other observations blank."""
    values = dict.fromkeys(OBSERVATIONS, "")
    values.update({"Atelectasis": atel, "Cardiomegaly": card, "Consolidation": cons, "Edema": edema,
                   "Pleural Effusion": eff})
    return [path, "Female", "60", view, ap_pa if view == "Frontal" else "", *values.values()]


def write_csv(path, rows, header=HEADER):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def img(split, patient, study, view=1, kind="frontal"):
    return f"{ROOT}/{split}/patient{patient:05d}/study{study}/view{view}_{kind}.jpg"


def label(ls: LabelSet, image_id: str, task: str, prefix="label"):
    key = task.lower().replace(" ", "_")
    value = ls.frame.set_index("image_id").loc[image_id, f"{prefix}_{key}"]
    return None if math.isnan(value) else float(value)


# --- policy -----------------------------------------------------------------------------------------
def test_default_policy_per_task(tmp_path):
    rows = [row(img("train", 1, 1), "-1.0", "-1.0", "-1.0", "-1.0", "-1.0"),
            row(img("train", 2, 1), "1.0", "1.0", "1.0", "1.0", "1.0"),
            row(img("train", 3, 1), "0.0", "0.0", "0.0", "0.0", "0.0"),
            row(img("train", 4, 1), "", "", "", "", "")]
    ls = read_labels(write_csv(tmp_path / "train.csv", rows))
    # the thesis protocol: U-Ones Atelectasis/Edema/Effusion, U-Zeros Cardiomegaly, U-Ignore Consolidation.
    uncertain = img("train", 1, 1)
    assert [label(ls, uncertain, t) for t in TASKS] == [1.0, 0.0, None, 1.0, 1.0]
    assert [label(ls, img("train", 2, 1), t) for t in TASKS] == [1.0] * 5
    assert [label(ls, img("train", 3, 1), t) for t in TASKS] == [0.0] * 5
    assert [label(ls, img("train", 4, 1), t) for t in TASKS] == [None] * 5  # blank: always excluded
    assert [label(ls, uncertain, t, "raw") for t in TASKS] == [-1.0] * 5
    assert ls.policy == DEFAULT_POLICY and ls.tasks == TASKS and ls.rows_in == 4


def test_policy_override_changes_only_named_tasks(tmp_path):
    rows = [row(img("train", 1, 1), "-1.0", "-1.0", "-1.0", "-1.0", "-1.0")]
    ls = read_labels(write_csv(tmp_path / "train.csv", rows),
                     policy="Atelectasis=zeros,cardiomegaly=ignore,pleural_effusion=ignore")
    assert [label(ls, img("train", 1, 1), t) for t in TASKS] == [0.0, None, None, 1.0, None]
    ls = read_labels(str(tmp_path / "train.csv"), policy={"Consolidation": "ones"})
    assert [label(ls, img("train", 1, 1), t) for t in TASKS] == [1.0, 0.0, 1.0, 1.0, 1.0]


def test_parse_policy():
    assert parse_policy("") == DEFAULT_POLICY
    assert parse_policy("Atelectasis=zeros, Edema=IGNORE") == {**DEFAULT_POLICY, "Atelectasis": "zeros",
                                                              "Edema": "ignore"}
    assert parse_policy("all=ignore,Edema=ones") == {**dict.fromkeys(TASKS, "ignore"), "Edema": "ones"}
    with pytest.raises(UserError, match="unknown task 'Lung'"):
        parse_policy("Lung=ones")
    with pytest.raises(UserError, match="'maybe' for 'Edema' is not one of ones, zeros, ignore"):
        parse_policy("Edema=maybe")
    with pytest.raises(UserError, match="not TASK=POLICY"):
        parse_policy("Edema")


def test_policy_counts_on_hand_built_rows(tmp_path):
    # Edema raw over 6 studies: 1, 1, -1, 0, blank, -1  -> ones: 4 pos 1 neg; zeros: 2/3; ignore: 2/1
    values = ["1.0", "1.0", "-1.0", "0.0", "", "-1.0"]
    path = write_csv(tmp_path / "train.csv", [row(img("train", i + 1, 1), edema=v) for i, v in enumerate(values)])
    for policy, (pos, neg) in {"ones": (4, 1), "zeros": (2, 3), "ignore": (2, 1)}.items():
        f = read_labels(path, policy=f"Edema={policy}").frame
        assert (int((f.label_edema == 1).sum()), int((f.label_edema == 0).sum())) == (pos, neg), policy
        assert int(f.label_edema.isna().sum()) == 6 - pos - neg


# --- studies, views, splits ----------------------------------------------------------------------------
def test_study_grouping_and_multi_view(tmp_path):
    rows = [row(img("train", 7, 1, 1, "frontal"), edema="1.0"),
            row(img("train", 7, 1, 2, "lateral"), edema="1.0", view="Lateral"),
            row(img("train", 7, 2, 1, "frontal"), edema="0.0", ap_pa="PA"),
            row(img("train", 8, 1, 1, "frontal"))]
    train = write_csv(tmp_path / "train.csv", rows)
    valid = write_csv(tmp_path / "valid.csv", [row(img("valid", 9, 1), "1.0", "0.0", "0.0", "0.0", "0.0")])
    ls = read_labels([train, valid])
    f = ls.frame
    assert list(f.columns[:8]) == ["image_id", "study_id", "patient_id", "split", "view", "ap_pa",
                                   "source_csv", "source_row"]
    assert list(f.study_id) == ["patient00007/study1"] * 2 + ["patient00007/study2", "patient00008/study1",
                                                              "patient00009/study1"]
    assert list(f.patient_id) == ["patient00007"] * 3 + ["patient00008", "patient00009"]
    assert list(f.split) == ["train"] * 4 + ["valid"]
    assert list(f.view) == ["Frontal", "Lateral", "Frontal", "Frontal", "Frontal"]
    assert [None if pd.isna(v) else v for v in f.ap_pa] == ["AP", None, "PA", "AP", "AP"]
    assert list(f.source_csv) == ["train.csv"] * 4 + ["valid.csv"] and list(f.source_row) == [1, 2, 3, 4, 1]
    assert f.groupby("study_id").size().to_dict() == {"patient00007/study1": 2, "patient00007/study2": 1,
                                                      "patient00008/study1": 1, "patient00009/study1": 1}
    assert ls.rows_in == 5 and not ls.rejects and not ls.conflicts
    assert ls.sources == {"train.csv": hashlib.sha256(Path(train).read_bytes()).hexdigest(),
                          "valid.csv": hashlib.sha256(Path(valid).read_bytes()).hexdigest()}


def test_split_falls_back_to_csv_stem(tmp_path):
    path = write_csv(tmp_path / "holdout.csv", [row("images/patient00001/study1/view1_frontal.jpg", edema="1.0")])
    ls = read_labels(path)
    assert list(ls.frame.split) == ["holdout"] and list(ls.frame.study_id) == ["patient00001/study1"]


def test_conflicting_study_labels_are_unified_and_reported(tmp_path):
    rows = [row(img("train", 1, 1, 1), edema="1.0", eff="0.0", card="-1.0"),
            row(img("train", 1, 1, 2, "lateral"), edema="0.0", eff="0.0", card="", view="Lateral"),
            row(img("train", 1, 1, 3, "frontal"), edema="-1.0", eff="0.0", card=""),
            row(img("train", 2, 1, 1), cons="", atel="0.0"),
            row(img("train", 2, 1, 2, "lateral"), cons="-1.0", atel="0.0", view="Lateral"),
            row(img("train", 3, 1, 1), edema="1.0"),
            row(img("train", 3, 1, 2, "lateral"), edema="1.0", view="Lateral")]
    ls = read_labels(write_csv(tmp_path / "train.csv", rows))
    f = ls.frame
    # Rule: 1.0 > -1.0 > 0.0 > blank, then the policy; every image of the study ends the same.
    s1 = f[f.study_id == "patient00001/study1"]
    assert set(s1.raw_edema) == {1.0} and set(s1.label_edema) == {1.0}
    assert set(s1.raw_cardiomegaly) == {-1.0} and set(s1.label_cardiomegaly) == {0.0}  # U-Zeros
    assert set(s1.raw_pleural_effusion) == {0.0}
    s2 = f[f.study_id == "patient00002/study1"]
    assert set(s2.raw_consolidation) == {-1.0} and s2.label_consolidation.isna().all()  # U-Ignore
    assert [c["study_id"] for c in ls.conflicts] == ["patient00001/study1", "patient00002/study1"]
    c1 = ls.conflicts[0]
    assert c1["split"] == "train" and c1["images"] == list(s1.image_id)
    assert c1["tasks"] == {"Cardiomegaly": {"values": [-1.0, None, None], "resolved": -1.0},
                           "Edema": {"values": [1.0, 0.0, -1.0], "resolved": 1.0}}
    assert ls.conflicts[1]["tasks"] == {"Consolidation": {"values": [None, -1.0], "resolved": -1.0}}
    assert len(f) == 7 and not ls.rejects


# --- bad input ----------------------------------------------------------------------------------------------
def test_missing_columns_are_named(tmp_path):
    header = [c for c in HEADER if c not in ("AP/PA", "Edema")]
    path = write_csv(tmp_path / "train.csv", [[img("train", 1, 1)] + [""] * (len(header) - 1)], header=header)
    with pytest.raises(LabelError, match=r"train.csv: header is missing column\(s\) 'AP/PA', 'Edema'"):
        read_labels(path)


def test_other_observation_columns_are_optional(tmp_path):
    header = [*META_COLUMNS, *TASKS]
    path = write_csv(tmp_path / "train.csv", [[img("train", 1, 1), "Male", "50", "Frontal", "PA",
                                               "1.0", "0.0", "", "-1.0", "1"]], header=header)
    ls = read_labels(path)
    assert [label(ls, img("train", 1, 1), t, "raw") for t in TASKS] == [1.0, 0.0, None, -1.0, 1.0]


@pytest.mark.parametrize("bad", ["2.0", "yes", "nan", "1.0.0", "-"])
def test_bad_value_names_file_row_and_column(tmp_path, bad):
    rows = [row(img("train", 1, 1), edema="1.0"), row(img("train", 2, 1), edema="0.0"),
            row(img("train", 3, 1), edema=bad)]
    path = write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(LabelError) as e:
        read_labels(path)
    assert str(e.value) == (f"train.csv: row 3 (line 4), column 'Edema': value {bad!r} "
                            "is not 1.0, 0.0, -1.0 or blank")


def test_bad_paths_and_duplicates_are_rejected_with_reasons(tmp_path):
    good = img("train", 1, 1)
    rows = [row(good, edema="1.0"),
            row(f"{ROOT}/train/../../outside/patient00002/study1/view1_frontal.jpg"),
            row("/etc/patient00003/study1/view1_frontal.jpg"),
            row("C:/data/patient00004/study1/view1_frontal.jpg"),
            row("s3://bucket/patient00005/study1/view1_frontal.jpg"),
            row(good, edema="0.0"),
            row(""),
            row(f"{ROOT}/train/view1_frontal.jpg"),
            row(img("train", 6, 1), edema="0.0")]
    train = write_csv(tmp_path / "train.csv", rows)
    valid = write_csv(tmp_path / "valid.csv", [row(good, edema="1.0")])
    ls = read_labels([train, valid])
    assert ls.rows_in == 10 and len(ls.frame) == 2 and len(ls.rejects) == 8
    assert list(ls.frame.image_id) == [good, img("train", 6, 1)]
    assert label(ls, good, "Edema") == 1.0  # the first occurrence is kept
    by_row = {(r.csv, r.row): r for r in ls.rejects}
    assert all(isinstance(r, Reject) for r in ls.rejects)
    assert by_row[("train.csv", 2)].reason == "Path contains '..' (escapes the image root)"
    for n in (3, 4, 5):
        assert by_row[("train.csv", n)].reason == "Path is absolute (escapes the image root)"
    assert by_row[("train.csv", 6)].reason == "duplicate Path (first seen in train.csv row 1)"
    assert by_row[("train.csv", 6)].path == good
    assert by_row[("train.csv", 7)].reason == "empty Path"
    assert by_row[("train.csv", 8)].reason == "Path does not end in patientX/studyY/FILE"
    assert by_row[("valid.csv", 1)].reason == "duplicate Path (first seen in train.csv row 1)"


def test_empty_csvs_fail(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(LabelError, match=r"empty.csv: empty CSV \(no header row\)"):
        read_labels(str(tmp_path / "empty.csv"))
    header_only = write_csv(tmp_path / "train.csv", [])
    with pytest.raises(LabelError, match=r"train.csv: empty CSV \(a header but no data rows\)"):
        read_labels(header_only)


def test_missing_file_and_label_error_is_a_user_error(tmp_path):
    with pytest.raises(LabelError, match="nope.csv: file not found"):
        read_labels(str(tmp_path / "nope.csv"))
    assert issubclass(LabelError, UserError)


def test_gzip_csv_reads_like_the_plain_one(tmp_path):
    rows = [row(img("train", 1, 1), "1.0", "-1.0", "", "0.0", "1.0"), row(img("train", 2, 1), edema="-1.0")]
    plain = write_csv(tmp_path / "train.csv", rows)
    gz = tmp_path / "train.csv.gz"
    gz.write_bytes(gzip.compress(Path(plain).read_bytes()))
    a, b = read_labels(plain), read_labels(str(gz))
    assert a.frame.drop(columns="source_csv").equals(b.frame.drop(columns="source_csv"))
    assert b.sources == {"train.csv.gz": hashlib.sha256(gz.read_bytes()).hexdigest()}


# --- the real CheXpert label files (skipped when ../shared/data is absent) ------------------------------------
@pytest.mark.skipif(not (SHARED_DATA / "chexpert_train.csv.gz").exists(), reason="../shared/data not present")
def test_real_chexpert_csvs():
    start = time.perf_counter()
    ls = read_labels([str(SHARED_DATA / "chexpert_train.csv.gz"), str(SHARED_DATA / "chexpert_valid.csv")])
    print(f"read 223,648 rows in {time.perf_counter() - start:.2f} s")  # reported, never asserted
    f = ls.frame
    assert ls.rows_in == 223_414 + 234 and len(f) == ls.rows_in and not ls.rejects
    assert f.split.value_counts().to_dict() == {"train": 223_414, "valid": 234}
    studies = f.drop_duplicates(["split", "study_id"])
    assert studies.split.value_counts().to_dict() == {"train": 187_641, "valid": 200}
    assert f[f.split == "train"].patient_id.nunique() == 64_540
    valid = studies[studies.split == "valid"]
    assert all(set(np.unique(valid[f"raw_{k}"])) <= {0.0, 1.0}
               for k in ("atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion"))


def test_ragged_row_is_a_one_line_error(tmp_path):
    path = tmp_path / "train.csv"
    write_csv(path, [row(img("train", 1, 1)), row(img("train", 2, 1)) + ["extra"]])
    with pytest.raises(LabelError, match=r"train.csv: not a readable CSV: .*Expected 19 columns, got 20") as e:
        read_labels(str(path))
    assert "\n" not in str(e.value)


def test_windows_line_endings_and_bom(tmp_path):
    path = tmp_path / "train.csv"
    lines = [",".join(HEADER), ",".join(row(img("train", 1, 1), edema="-1.0"))]
    path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    ls = read_labels(str(path))
    assert list(ls.frame.image_id) == [img("train", 1, 1)] and label(ls, img("train", 1, 1), "Edema", "raw") == -1.0
