"""`python -m preprocessing stats`: exact counts on hand-built CSVs, the CLI, and the phantom banner."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from preprocessing import phantom as ph
from preprocessing.labels import read_labels
from common.schema import META_COLUMNS, OBSERVATIONS
from preprocessing.stats import BANNER, compute_stats, format_table

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def row(path, atel="", card="", cons="", edema="", eff="", view="Frontal", ap_pa="AP"):
    values = dict.fromkeys(OBSERVATIONS, "")
    values.update({"Atelectasis": atel, "Cardiomegaly": card, "Consolidation": cons, "Edema": edema,
                   "Pleural Effusion": eff})
    return [path, "Female", "60", view, ap_pa if view == "Frontal" else "", *values.values()]


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*META_COLUMNS, *OBSERVATIONS])
        w.writerows(rows)
    return str(path)


def img(split, patient, study, view=1, kind="frontal"):
    return f"CheXpert-v1.0-small/{split}/patient{patient:05d}/study{study}/view{view}_{kind}.jpg"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "preprocessing", "stats", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def csvs(tmp_path):
    train = [  # 4 studies, 6 images; one conflict (patient 3: Edema 1.0 vs blank); one duplicate row
        row(img("train", 1, 1, 1), atel="1.0", card="-1.0", cons="-1.0", edema="0.0", eff="1.0"),
        row(img("train", 1, 1, 2, "lateral"), atel="1.0", card="-1.0", cons="-1.0", edema="0.0", eff="1.0",
            view="Lateral"),
        row(img("train", 2, 1, 1), atel="-1.0", card="1.0", cons="0.0", edema="-1.0", eff="", ap_pa="PA"),
        row(img("train", 3, 1, 1), atel="0.0", card="0.0", cons="1.0", edema="1.0", eff="0.0"),
        row(img("train", 3, 1, 2, "lateral"), atel="0.0", card="0.0", cons="1.0", edema="", eff="0.0",
            view="Lateral"),
        row(img("train", 4, 1, 1), atel="", card="", cons="", edema="", eff=""),
        row(img("train", 4, 1, 1), atel="1.0"),
    ]
    valid = [row(img("valid", 9, 1), "1.0", "0.0", "0.0", "1.0", "0.0"),
             row(img("valid", 10, 1), "0.0", "1.0", "0.0", "0.0", "0.0")]
    return write_csv(tmp_path / "train.csv", train), write_csv(tmp_path / "valid.csv", valid)


def test_exact_counts_on_hand_built_csvs(csvs):
    stats = compute_stats(read_labels(list(csvs)))
    assert (stats["rows_in"], stats["accepted"], stats["rejected"]) == (9, 8, 1)
    assert stats["reject_reasons"] == {"duplicate Path": 1} and stats["study_label_conflicts"] == 1
    train, valid = stats["splits"]["train"], stats["splits"]["valid"]
    assert (train["images"], train["studies"], train["patients"]) == (6, 4, 4)
    assert train["views"] == {"Frontal": 4, "Lateral": 2}
    assert train["ap_pa"] == {"(blank)": 2, "AP": 3, "PA": 1}
    assert train["images_per_study"] == {"1": 2, "2": 2} and train["conflicts"] == 1
    t = train["tasks"]
    # Studies (raw): p1 (1, -1, -1, 0, 1), p2 (-1, 1, 0, -1, blank), p3 (0, 0, 1, 1*, 0), p4 all blank.
    # Atelectasis ones: p1 1, p2 -1->1, p3 0 -> 3 usable, 2 pos (66.7%), 1 neg.
    assert {k: t["Atelectasis"][k] for k in ("usable_studies", "positive", "negative", "positive_pct",
                                             "negative_pct")} == {"usable_studies": 3, "positive": 2,
                                                                  "negative": 1, "positive_pct": 66.7,
                                                                  "negative_pct": 33.3}
    assert t["Atelectasis"]["raw"] == {"positive": 1, "uncertain": 1, "negative": 1, "blank": 1}
    # Cardiomegaly zeros: p1 -1->0, p2 1, p3 0 -> 3 usable, 1 pos.
    assert (t["Cardiomegaly"]["usable_studies"], t["Cardiomegaly"]["positive"]) == (3, 1)
    # Consolidation ignore: p1 -1 excluded, p2 0, p3 1 -> 2 usable, 1 pos 50 %.
    assert (t["Consolidation"]["usable_studies"], t["Consolidation"]["positive"],
            t["Consolidation"]["positive_pct"]) == (2, 1, 50.0)
    # Edema ones: p1 0, p2 -1->1, p3 conflict 1/blank -> 1 -> 3 usable, 2 pos.
    assert (t["Edema"]["usable_studies"], t["Edema"]["positive"], t["Edema"]["negative"]) == (3, 2, 1)
    # Pleural Effusion ones: p1 1, p2 blank (excluded), p3 0 -> 2 usable, 1 pos.
    assert (t["Pleural Effusion"]["usable_studies"], t["Pleural Effusion"]["positive"]) == (2, 1)
    assert t["Pleural Effusion"]["raw"]["blank"] == 2
    assert (valid["studies"], valid["tasks"]["Edema"]["positive"], valid["tasks"]["Edema"]["usable_studies"]) == (2, 1, 2)
    table = format_table(stats)
    assert "Atelectasis" in table and "2 (66.7%)" in table and BANNER not in table


def test_cli_json_and_table(csvs):
    result = cli("--csv", csvs[0], "--csv", csvs[1], "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["synthetic"] is False and doc["splits"]["train"]["tasks"]["Edema"]["positive"] == 2
    assert doc["policy"]["Consolidation"] == "ignore"
    result = cli("--csv", csvs[0], "--policy", "Consolidation=ones")
    assert result.returncode == 0 and "Consolidation" in result.stdout and "SYNTHETIC" not in result.stdout
    line = next(l for l in result.stdout.splitlines() if l.startswith("train  Consolidation"))
    assert line.split()[2:5] == ["ones", "3", "2"]  # -1 now counts as positive: 3 usable, 2 positive


def test_cli_errors_are_one_line_exit_2(tmp_path, csvs):
    result = cli("--csv", str(tmp_path / "missing.csv"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"preprocessing: error: {tmp_path / 'missing.csv'}: file not found"]
    bad = write_csv(tmp_path / "bad.csv", [row(img("train", 1, 1), edema="maybe")])
    result = cli("--csv", bad)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "bad.csv: row 1 (line 2), column 'Edema'" in result.stderr
    result = cli("--csv", csvs[0], "--policy", "Edema=sometimes")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_phantom_csvs_carry_the_banner(tmp_path):
    out = tmp_path / "ph"
    ph.make_phantom(str(out), studies=3, seed=0, min_size=600, max_size=620)
    result = cli("--csv", str(out / "train.csv"), "--csv", str(out / "valid.csv"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1] == BANNER and result.stdout.rstrip().endswith(BANNER)
    doc = json.loads(cli("--csv", str(out / "train.csv"), "--json").stdout)
    assert doc["synthetic"] is True and doc["phantom"]["settings"]["seed"] == 0 and doc["banner"] == BANNER


def test_help_has_examples():
    result = subprocess.run([sys.executable, "-m", "preprocessing", "stats", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "examples:" in result.stdout and "--json" in result.stdout


@pytest.mark.skipif(not (SHARED_DATA / "chexpert_train.csv.gz").exists(), reason="../shared/data not present")
def test_real_chexpert_distribution():
    stats = compute_stats(read_labels([str(SHARED_DATA / "chexpert_train.csv.gz"),
                                       str(SHARED_DATA / "chexpert_valid.csv")]))
    valid = stats["splits"]["valid"]
    assert (valid["images"], valid["studies"]) == (234, 200)
    assert all(t["usable_studies"] == 200 and t["raw"]["uncertain"] == 0 for t in valid["tasks"].values())
    train = stats["splits"]["train"]
    assert (train["images"], train["studies"], train["patients"]) == (223_414, 187_641, 64_540)
    assert train["views"] == {"Frontal": 191_027, "Lateral": 32_387}
