"""The phantom: exact CheXpert layout, determinism, label rates, and the coarse/fine resolution answer."""
import csv
import json
import os
import re
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from preprocessing import phantom as ph
from preprocessing import phantom_visibility as vis
from common.cli import UserError
from preprocessing.labels import read_labels
from common.schema import META_COLUMNS, OBSERVATIONS, TASKS

SMALL = dict(min_size=600, max_size=660)  # smallest sizes that still hold the finest band


def files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "ph"
    info = ph.make_phantom(str(out), studies=12, seed=3, **SMALL)
    return str(out), info


def test_layout_and_csvs(tiny):
    out, info = tiny
    with open(os.path.join(out, "train.csv")) as f:
        train = list(csv.reader(f))
    with open(os.path.join(out, "valid.csv")) as f:
        valid = list(csv.reader(f))
    assert train[0] == valid[0] == [*META_COLUMNS, *OBSERVATIONS]
    pattern = re.compile(r"^CheXpert-phantom/(train|valid)/patient\d{5}/study\d+/view[123]_(frontal|lateral)\.jpg$")
    for split, rows in (("train", train[1:]), ("valid", valid[1:])):
        for r in rows:
            m = pattern.match(r[0])
            assert m and m.group(1) == split, r[0]
            assert r[3] == m.group(2).capitalize() and r[4] in (("AP", "PA") if r[3] == "Frontal" else ("",))
            with Image.open(os.path.join(out, r[0])) as im:
                assert im.format == "JPEG" and im.mode == "L"
                assert 600 <= im.width <= 660 and 600 <= im.height <= 660
                assert b"SYNTHETIC" in im.info["comment"]
    # Patients do not cross splits (like CheXpert), and every image on disk is in a CSV.
    patients = {s: {r[0].split("/")[2] for r in rows[1:]} for s, rows in (("train", train), ("valid", valid))}
    assert patients["train"] and patients["valid"] and not patients["train"] & patients["valid"]
    on_disk = {p for p in files(out) if p.endswith(".jpg")}
    assert on_disk == {r[0] for r in train[1:] + valid[1:]}
    marker = json.load(open(os.path.join(out, "phantom.json")))
    assert marker["synthetic"] is True and marker == json.loads(json.dumps(info))
    assert marker["settings"]["seed"] == 3 and set(marker["tasks"]) == set(TASKS)
    assert marker["counts"]["train"]["images"] == len(train) - 1 and marker["warnings"] == []


def test_reads_cleanly_with_multi_view_studies(tiny):
    out, _ = tiny
    ls = read_labels([os.path.join(out, "train.csv"), os.path.join(out, "valid.csv")])
    assert not ls.rejects and not ls.conflicts and set(ls.frame.split) == {"train", "valid"}
    per_study = ls.frame.groupby("study_id").size()
    assert per_study.max() >= 2 and per_study.min() == 1
    assert set(ls.frame[ls.frame.study_id.isin(per_study[per_study > 1].index)].view) == {"Frontal", "Lateral"}
    assert ls.frame.groupby("study_id").image_id.first().str.contains("view1_frontal").all()


def test_deterministic_bytes_for_a_seed(tmp_path, tiny):
    out, _ = tiny
    ph.make_phantom(str(tmp_path / "again"), studies=12, seed=3, **SMALL)
    assert files(tmp_path / "again") == files(out)
    ph.make_phantom(str(tmp_path / "other"), studies=12, seed=4, **SMALL)
    other = files(tmp_path / "other")
    assert other["train.csv"] != files(out)["train.csv"]
    shared = set(other) & set(files(out))
    assert any(other[p] != files(out)[p] for p in shared if p.endswith(".jpg"))


def test_parallel_workers_write_the_same_bytes(tmp_path):
    ph.make_phantom(str(tmp_path / "one"), studies=4, seed=5, **SMALL)
    ph.make_phantom(str(tmp_path / "two"), studies=4, seed=5, workers=2, **SMALL)
    assert files(tmp_path / "one") == files(tmp_path / "two")


def test_label_rates_follow_the_design():
    rows, specs = ph.plan_phantom(studies=4000, seed=0)
    header = [*META_COLUMNS, *OBSERVATIONS]
    for split in ("train", "valid"):
        first = {}
        for r in rows[split]:
            first.setdefault(r[0].rsplit("/", 1)[0], r)  # one row per study
        studies = list(first.values())
        assert len(studies) == {"train": 3200, "valid": 800}[split]
        for task, design in ph.TASK_DESIGN.items():
            values = [r[header.index(task)] for r in studies]
            share = {v: values.count(v) / len(values) for v in ("1.0", "-1.0", "", "0.0")}
            if split == "valid":  # like CheXpert's validation set: 0/1 only
                assert share["-1.0"] == share[""] == 0 and abs(share["1.0"] - design["valid_positive"]) < 0.04
            else:
                pos, unc, blank = design["train_rates"]
                assert abs(share["1.0"] - pos) < 0.03 and abs(share["-1.0"] - unc) < 0.02
                assert abs(share[""] - blank) < 0.03
    per_study = {}
    for s in specs:
        per_study[s.path.rsplit("/", 1)[0]] = per_study.get(s.path.rsplit("/", 1)[0], 0) + 1
    counts = np.bincount(list(per_study.values()))[1:] / len(per_study)
    assert np.allclose(counts, ph.VIEWS_PER_STUDY, atol=0.03)
    # The pixels follow the labels: positives always carry the finding, negatives never.
    for s, r in zip(specs, rows["train"] + rows["valid"]):
        for task in TASKS:
            value = r[header.index(task)]
            if value in ("1.0", "0.0"):
                assert (task in s.findings) == (value == "1.0")


def test_sizes_are_non_square_by_default_and_in_range():
    _, specs = ph.plan_phantom(studies=60, seed=1)
    assert all(1000 <= s.width <= 3000 and 1000 <= s.height <= 3000 for s in specs)
    assert all(s.width != s.height for s in specs)
    _, specs = ph.plan_phantom(studies=10, seed=1, square=True, min_size=700, max_size=800)
    assert all(s.width == s.height and 700 <= s.width <= 800 for s in specs)


def test_bad_arguments_and_overwrite(tmp_path):
    with pytest.raises(UserError, match="--studies"):
        ph.make_phantom(str(tmp_path / "a"), studies=1)
    with pytest.raises(UserError, match="--min-size/--max-size"):
        ph.make_phantom(str(tmp_path / "a"), studies=4, min_size=900, max_size=800)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        ph.make_phantom(str(tmp_path / "busy"), studies=4, **SMALL)
    with pytest.raises(UserError, match="not a phantom"):
        ph.make_phantom(str(tmp_path / "busy"), studies=4, overwrite=True, **SMALL)
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep me"
    ph.make_phantom(str(tmp_path / "ph"), studies=6, seed=1, **SMALL)
    with pytest.raises(UserError, match="--overwrite"):
        ph.make_phantom(str(tmp_path / "ph"), studies=4, seed=2, **SMALL)
    ph.make_phantom(str(tmp_path / "ph"), studies=2, seed=2, overwrite=True, **SMALL)
    fresh = {p for p in files(tmp_path / "ph") if p.endswith(".jpg")}
    with open(tmp_path / "ph" / "train.csv") as f:
        assert fresh == {r["Path"] for r in csv.DictReader(f)} | {
            r["Path"] for r in csv.DictReader(open(tmp_path / "ph" / "valid.csv"))}


def test_small_images_warn_that_the_answer_does_not_hold(tmp_path):
    info = ph.make_phantom(str(tmp_path / "small"), studies=2, seed=0, min_size=128, max_size=160)
    assert info["warnings"] and "resolution answer" in info["warnings"][0]
    assert json.load(open(tmp_path / "small" / "phantom.json"))["warnings"] == info["warnings"]


# --- the resolution answer: fine findings vanish at 160 px and survive at 480 px; coarse ones survive ------
def _pair(task, i, view="Frontal"):
    # Without film marks: these measure the finding against anatomy and noise; the marks are the
    # same with and without a finding (test_film_marks_do_not_depend_on_the_labels).
    spec = ph.ImageSpec(path="x", width=640, height=700, view=view, seed=[11, 1, i], patient_seed=[11, 2, i],
                        findings={task: 0.7}, marks=False)
    return ph.render_image(spec), ph.render_image(replace(spec, findings={}))


def _store_resize(pixels, resolution):
    """Exactly the store's step: 8-bit grayscale, Pillow Lanczos to a square."""
    return np.asarray(Image.fromarray(pixels, "L").resize((resolution, resolution), Image.LANCZOS), np.float64)


def _highpass_power(img):
    """Mean squared Laplacian over the lung bases (rows 45-85 %): fine-texture energy."""
    lap = 4 * img[1:-1, 1:-1] - img[:-2, 1:-1] - img[2:, 1:-1] - img[1:-1, :-2] - img[1:-1, 2:]
    h = lap.shape[0]
    return float(np.mean(lap[int(0.45 * h):int(0.85 * h)] ** 2))


@pytest.mark.parametrize("task", ["Edema", "Atelectasis"])
def test_fine_finding_energy_separates_at_480_not_160(task):
    for i in range(3):
        pos, neg = _pair(task, i)
        low = _highpass_power(_store_resize(pos, 160)) / _highpass_power(_store_resize(neg, 160))
        high = _highpass_power(_store_resize(pos, 480)) / _highpass_power(_store_resize(neg, 480))
        assert abs(low - 1) < 0.005, (task, i, low)  # indistinguishable at 160 px
        assert high > 1.08, (task, i, high)  # clearly more fine-texture energy at 480 px
        # And the finding does not leak through brightness: the mean moves by < 0.05 grey levels.
        assert abs(_store_resize(pos, 160).mean() - _store_resize(neg, 160).mean()) < 0.05


@pytest.mark.parametrize("task", ["Edema", "Atelectasis", "Consolidation", "Cardiomegaly", "Pleural Effusion"])
def test_how_much_of_each_finding_survives(task):
    pos, neg = _pair(task, 0)
    diff = pos.astype(np.float32) - neg.astype(np.float32)
    full = np.sqrt(np.mean(diff ** 2))
    kept = {r: np.sqrt(np.mean(vis.lanczos_square(diff, r) ** 2)) / full for r in (160, 240, 320, 480)}
    scale = ph.TASK_DESIGN[task]["scale"]
    if scale == "coarse":
        assert kept[160] > 0.97
        assert np.abs(vis.lanczos_square(diff, 160)).max() > 20  # tens of grey levels at 160 px
    elif scale == "medium":
        assert 0.2 < kept[160] < 0.85 and kept[320] > 0.9
    else:
        assert kept[160] < 0.03 and kept[480] > 0.6 and kept[160] < kept[320] < kept[480]


def test_coarse_finding_separates_at_160_between_patients():
    """Heart size across different patients: at 160 px every enlarged heart leaves fewer dark (lung)
    pixels in the band beside it than every normal heart does."""
    def dark_lung_share(i, enlarged):
        spec = ph.ImageSpec(path="x", width=640, height=700, view="Frontal", seed=[12, 1, i],
                            patient_seed=[12, 2, i], findings={"Cardiomegaly": 0.7} if enlarged else {},
                            marks=False)
        img = _store_resize(ph.render_image(spec), 160)
        threshold = (np.percentile(img, 10) + np.percentile(img, 90)) / 2  # exposure-independent
        band = img[int(0.50 * 160):int(0.68 * 160), int(0.30 * 160):int(0.75 * 160)]
        return float((band < threshold).mean())
    enlarged = [dark_lung_share(i, True) for i in range(4)]
    normal = [dark_lung_share(i + 10, False) for i in range(4)]
    assert max(enlarged) < min(normal), (enlarged, normal)


def test_render_is_pure():
    spec = ph.ImageSpec(path="x", width=610, height=650, view="Lateral", seed=[1, 1, 1, 1, 2],
                        patient_seed=[1, 2, 1], findings={t: 0.8 for t in TASKS})
    a, b = ph.render_image(spec), ph.render_image(spec)
    assert a.shape == (650, 610) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert 20 < a.mean() < 200 and a.std() > 10


def test_film_marks_do_not_depend_on_the_labels():
    """Text, marker and collimation are drawn: identical with and without every finding, and the
    findings' pixels elsewhere are untouched by them."""
    spec = ph.ImageSpec(path="x", width=900, height=1000, view="Frontal", seed=[4, 1, 2, 1, 1],
                        patient_seed=[4, 2, 2], findings={t: 0.8 for t in TASKS})
    bare = replace(spec, findings={})
    marked_pos, marked_neg = ph.render_image(spec), ph.render_image(bare)
    plain_pos, plain_neg = ph.render_image(replace(spec, marks=False)), ph.render_image(replace(bare, marks=False))
    marks = (marked_neg != plain_neg) | (marked_pos != plain_pos)
    assert 0.002 < marks.mean() < 0.4                      # something is drawn, most of the film is not
    assert (marked_pos[marks] == marked_neg[marks]).all()  # the marks carry no label
    assert np.array_equal(marked_pos[~marks], plain_pos[~marks])
    assert (marked_neg == 255).sum() > 200                 # saturated strokes (text, marker)
