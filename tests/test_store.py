"""The Parquet store: build -> verify -> read, bad input, restart after a crash, Ray path.

Tiny sources (~200-260 px JPEGs written here) and resolutions 16/32 keep it fast.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from common import storage
from preprocessing import build
from common.cli import UserError, run_cli
from preprocessing.manifest import manifest_hash, verify_store
from preprocessing.resize import reference_resize
from common.schema import TASKS, label_column, raw_column
from preprocessing.store import StoreError, decode_image, open_store

HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *TASKS]
RES = [16, 32]


# --- helpers: a tiny CheXpert-layout dataset ------------------------------------------------------

def noise_image(seed: int, size=(220, 260)) -> np.ndarray:
    """A smooth-plus-noise grayscale picture (width, height) = size."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(x / (7 + seed % 5)) * np.cos(y / 11)
    return np.clip(base + rng.normal(0, 12, (h, w)), 0, 255).astype(np.uint8)


def save_jpeg(path, pixels, mode="L", quality=95):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(pixels)
    if mode != "L":
        img = img.convert(mode)
    img.save(path, format="JPEG", quality=quality)


def image_path(split, patient, study=1, view=1, kind="frontal", ext="jpg"):
    return f"CheXpert-v1.0/{split}/patient{patient:05d}/study{study}/view{view}_{kind}.{ext}"


def csv_row(path, labels=("1.0", "", "-1.0", "0.0", "1.0"), view="Frontal", ap_pa="PA"):
    return [path, "Female", "60", view, ap_pa, *labels]


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(rows)
    return str(path)


def make_dataset(root, n_train=5, n_valid=2):
    """Good rows only: n_train single-view studies + one two-view study in train, n_valid in valid."""
    rows = {"train": [], "valid": []}
    for split, n in (("train", n_train), ("valid", n_valid)):
        for i in range(n):
            p = image_path(split, 100 * (split == "valid") + i)
            save_jpeg(os.path.join(root, p), noise_image(len(rows[split]) + 10 * (split == "valid")))
            rows[split].append(csv_row(p))
    lateral = image_path("train", 0, view=2, kind="lateral")
    save_jpeg(os.path.join(root, lateral), noise_image(99, (200, 240)))
    rows["train"].append(csv_row(lateral, view="Lateral", ap_pa=""))
    return rows


def write_dataset(root, rows):
    return [write_csv(os.path.join(root, f"{s}.csv"), rows[s]) for s in ("train", "valid")]


def cli(module: str, argv: list[str]) -> int:
    """Run one subcommand the way ``python -m preprocessing`` does (one-line errors, exit codes)."""
    mod = importlib.import_module(f"preprocessing.{module}")

    def main(args):
        parser = argparse.ArgumentParser()
        mod.add_arguments(parser)
        return mod.run(parser.parse_args(args))

    return run_cli(main, argv, prog="preprocessing")


def all_files(folder):
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, folder)] = os.stat(p)
    return out


# --- round trip ---------------------------------------------------------------------------------

def test_round_trip_equals_reference_lanczos(tmp_path):
    root = tmp_path / "src"
    rows = make_dataset(root)
    csvs = write_dataset(root, rows)
    out = str(tmp_path / "store")
    manifest = build.build_store(str(root), csvs, out, resolutions=RES, shard_size=3, use_ray=False,
                                 draft_factor=None, reduce_factor=None, progress=False)
    assert manifest["counts"]["rows_in"] == 8 and manifest["counts"]["stored"] == 8
    assert manifest["counts"]["rejected"] == 0 and manifest["dataset"] == "chexpert"
    assert manifest["encoding"] == "raw-uint8"
    assert set(manifest["sources"]) == {"train.csv", "valid.csv"}
    store = open_store(out)
    assert store.resolutions == RES and store.tasks == list(TASKS) and not store.is_phantom
    assert store.manifest_hash == manifest_hash(manifest)
    for res in RES:
        for split, split_rows in rows.items():
            table = store.read(res, split)
            assert table.schema == build.row_schema(TASKS)
            assert sorted(table["image_id"].to_pylist()) == sorted(r[0] for r in split_rows)
            for rec in table.to_pylist():
                with open(os.path.join(root, rec["image_id"]), "rb") as f:
                    ref = reference_resize(f.read(), res)
                img = decode_image(rec["image"], store.encoding)
                assert img.shape == (res, res) == (rec["height"], rec["width"])
                np.testing.assert_array_equal(img, ref)
                assert rec["split"] == split and rec["study_id"] == "/".join(rec["image_id"].split("/")[2:4])
                assert rec[raw_column("Consolidation")] == -1.0 and rec[label_column("Consolidation")] is None
                assert rec[raw_column("Cardiomegaly")] is None and rec[label_column("Cardiomegaly")] is None
                assert rec[label_column("Atelectasis")] == 1.0
    lateral = store.read(16, "train", columns=["image_id", "view", "ap_pa"]).to_pylist()
    assert {"image_id": image_path("train", 0, view=2, kind="lateral"), "view": "Lateral", "ap_pa": None} in lateral
    assert verify_store(out) == []
    # Same inputs, same content: the hash ignores only the creation time.
    again = build.build_store(str(root), csvs, str(tmp_path / "store2"), resolutions=RES, shard_size=3,
                              use_ray=False, draft_factor=None, reduce_factor=None, progress=False)
    assert manifest_hash({**again, "image_root": manifest["image_root"]}) == manifest_hash(manifest)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]


def test_store_errors_are_one_line(tmp_path):
    with pytest.raises(StoreError, match="no store at"):
        open_store(str(tmp_path / "nothing"))
    root = tmp_path / "src"
    csvs = write_dataset(root, make_dataset(root, 2, 1))
    out = str(tmp_path / "store")
    build.build_store(str(root), csvs, out, resolutions=RES, use_ray=False, progress=False)
    store = open_store(out, resolution=16)
    with pytest.raises(StoreError, match="no resolution 64"):
        store.read(64, "train")
    with pytest.raises(StoreError, match="no split 'test'"):
        store.read(16, "test")
    with pytest.raises(StoreError, match="no resolution 64"):
        open_store(out, resolution=64)


def test_phantom_marker_sets_dataset(tmp_path):
    root = tmp_path / "src"
    csvs = write_dataset(root, make_dataset(root, 2, 1))
    (root / "phantom.json").write_text(json.dumps({"seed": 3, "studies": 3}))
    manifest = build.build_store(str(root), csvs, str(tmp_path / "store"), resolutions=[16],
                                 use_ray=False, progress=False)
    assert manifest["dataset"] == "phantom" and manifest["phantom"] == {"seed": 3, "studies": 3}
    assert open_store(str(tmp_path / "store")).is_phantom


# --- bad input ----------------------------------------------------------------------------------

def test_bad_inputs_are_rejected_or_converted_and_counted(tmp_path):
    root = tmp_path / "src"
    rows = make_dataset(root, n_train=3, n_valid=1)
    train = rows["train"]
    missing = image_path("train", 10)
    train.append(csv_row(missing))
    truncated = image_path("train", 11)
    save_jpeg(root / truncated, noise_image(11))
    data = (root / truncated).read_bytes()
    (root / truncated).write_bytes(data[: len(data) // 2])
    garbage = image_path("train", 12)
    os.makedirs(os.path.dirname(root / garbage))
    (root / garbage).write_bytes(b"this is not an image at all")
    rgb = image_path("train", 13)
    save_jpeg(root / rgb, noise_image(13), mode="RGB")
    sixteen = image_path("train", 14, ext="png")
    os.makedirs(os.path.dirname(root / sixteen))
    deep = (noise_image(14).astype(np.uint16) * 40 + 1000)
    Image.fromarray(deep).save(root / sixteen)   # mode I;16
    train += [csv_row(truncated), csv_row(garbage), csv_row(rgb), csv_row(sixteen),
              csv_row("CheXpert-v1.0/train/patient00016/view1_frontal.jpg"),   # no study folder
              csv_row(image_path("train", 1))]                       # duplicate Path
    # A two-view study whose images disagree on Edema: kept, unified, reported.
    first, second = image_path("train", 20, view=1), image_path("train", 20, view=2, kind="lateral")
    save_jpeg(root / first, noise_image(20))
    save_jpeg(root / second, noise_image(21))
    train += [csv_row(first, labels=("1.0", "", "", "0.0", "")),
              csv_row(second, labels=("1.0", "", "", "1.0", ""), view="Lateral", ap_pa="")]
    csvs = write_dataset(root, rows)
    out = str(tmp_path / "store")
    manifest = build.build_store(str(root), csvs, out, resolutions=RES, shard_size=4, use_ray=False,
                                 progress=False)
    counts = manifest["counts"]
    assert counts["rows_in"] == len(rows["train"]) + len(rows["valid"]) == 14
    assert counts["rows_in"] == counts["stored"] + counts["rejected"]
    assert counts["rejected"] == 5 and counts["stored"] == 9
    assert counts["converted"] == 2
    assert counts["converted_by_kind"] == {"RGB->L": 1, "I;16->L (min-max scaled)": 1}
    assert counts["per_split"]["train"]["rows_in"] == 13 and counts["per_split"]["valid"]["rows_in"] == 1
    with open(os.path.join(out, "rejects.csv")) as f:
        rejects = {r["path"]: r for r in csv.DictReader(f)}
    assert set(next(iter(rejects.values()))) == {"csv", "row", "path", "reason"}
    assert rejects[missing]["reason"] == "missing image file" and rejects[missing]["csv"] == "train.csv"
    assert rejects[missing]["row"] == "5"
    assert rejects[truncated]["reason"].startswith("truncated image")
    assert rejects[garbage]["reason"].startswith("undecodable image")
    assert rejects["CheXpert-v1.0/train/patient00016/view1_frontal.jpg"]["reason"] == \
        "Path does not end in patientX/studyY/FILE"
    assert rejects[image_path("train", 1)]["reason"].startswith("duplicate Path")
    assert [c["study_id"] for c in manifest["study_label_conflicts"]] == ["patient00020/study1"]
    store = open_store(out)
    table = store.read(32, "train").to_pylist()
    by_id = {r["image_id"]: r for r in table}
    assert by_id[first][raw_column("Edema")] == by_id[second][raw_column("Edema")] == 1.0
    assert rgb in by_id and sixteen in by_id
    img16 = decode_image(by_id[sixteen]["image"], store.encoding)
    assert img16.dtype == np.uint8 and img16.max() > 200 and img16.min() < 60   # scaled, not clipped
    gray = np.asarray(Image.open(root / rgb).convert("L").resize((32, 32), Image.Resampling.LANCZOS))
    assert np.abs(decode_image(by_id[rgb]["image"], store.encoding).astype(int) - gray).max() <= 2
    assert verify_store(out) == []


@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink"])
def test_image_path_outside_the_root_is_refused_before_anything_is_written(tmp_path, capsys, where):
    root = tmp_path / "src"
    rows = make_dataset(root, 2, 1)
    outside = tmp_path / "outside" / "patient00016" / "study1" / "view1_frontal.jpg"
    save_jpeg(outside, noise_image(15))
    if where == "symlink":
        path = image_path("train", 15)
        os.makedirs(os.path.dirname(root / path))
        os.symlink(outside, root / path)
    else:
        path = "CheXpert-v1.0/train/../../outside/patient00016/study1/view1_frontal.jpg" if where == "dotdot" \
            else str(outside)
    rows["train"].append(csv_row(path))
    csvs = write_dataset(root, rows)
    out = tmp_path / "store"
    code = cli("build", ["--image-root", str(root), "--csv", csvs[0], "--csv", csvs[1], "--out", str(out),
                         "--resolutions", "16", "--no-ray", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "train.csv row 4" in err and "outside" in err and "nothing written" in err
    assert not out.exists()


def test_empty_csv_is_one_line_error(tmp_path, capsys):
    root = tmp_path / "src"
    os.makedirs(root)
    empty = write_csv(root / "train.csv", [])
    code = cli("build", ["--image-root", str(root), "--csv", empty, "--out", str(tmp_path / "s"),
                         "--resolutions", "16", "--no-ray", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "empty" in err and "train.csv" in err
    assert not os.path.exists(tmp_path / "s" / "manifest.json")


def test_strict_turns_rejects_into_failure(tmp_path, capsys):
    root = tmp_path / "src"
    rows = make_dataset(root, 2, 1)
    rows["train"].append(csv_row(image_path("train", 50)))      # file missing: found only when decoding
    csvs = write_dataset(root, rows)
    args = ["--image-root", str(root), "--out", str(tmp_path / "s"), "--resolutions", "16", "--no-ray",
            "--no-progress", "--csv", csvs[0], "--csv", csvs[1]]
    assert cli("build", args + ["--strict"]) == 2
    err = capsys.readouterr().err
    assert "--strict: 1 row(s) rejected" in err and "missing image file" in err
    assert not os.path.exists(tmp_path / "s" / "manifest.json")
    assert os.path.exists(tmp_path / "s" / "rejects.csv")
    assert cli("build", args) == 0                                 # without --strict: stored + counted
    out = capsys.readouterr().out
    assert "rows in 5 = stored 4 + rejected 1" in out
    # A label-stage reject fails before any image is decoded.
    rows["train"].append(csv_row("CheXpert-v1.0/train/patient00051/view1_frontal.jpg"))
    write_dataset(root, rows)
    assert cli("build", args + ["--strict", "--out", str(tmp_path / "s2")]) == 2
    assert "before decoding" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "s2" / "res16")


# --- verify ---------------------------------------------------------------------------------------

def test_verify_catches_a_flipped_byte(tmp_path, capsys):
    root = tmp_path / "src"
    csvs = write_dataset(root, make_dataset(root, 4, 1))
    out = str(tmp_path / "store")
    build.build_store(str(root), csvs, out, resolutions=RES, shard_size=2, use_ray=False, progress=False)
    assert cli("verify", [out]) == 0
    assert "OK" in capsys.readouterr().out
    victim = os.path.join(out, "res32", "train", "shard-00001.parquet")
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(victim, "wb").write(bytes(data))
    assert cli("verify", [out]) == 1
    err = capsys.readouterr().err
    assert "res32/train/shard-00001.parquet: sha256" in err
    assert cli("verify", [out, "--resolution", "16"]) == 0          # other resolutions stay usable
    with pytest.raises(StoreError, match="shard-00001.parquet"):
        open_store(out)
    open_store(out, resolution=16)
    os.remove(victim)
    assert cli("verify", [out]) == 1
    assert "res32/train/shard-00001.parquet: missing" in capsys.readouterr().err


# --- restart --------------------------------------------------------------------------------------

def test_restart_after_crash_builds_only_missing_shards(tmp_path, monkeypatch):
    root = tmp_path / "src"
    csvs = write_dataset(root, make_dataset(root, 7, 2))     # train: 8 rows -> 4 shards, valid: 1 shard
    out = str(tmp_path / "store")
    real = build.build_shard
    calls = []

    def crashing(spec):
        if len(calls) == 2:
            # Die in the middle of a shard: one resolution written, the other and the record not.
            storage.write_bytes(storage.join(spec.out, spec.file_path(16)), b"half a shard")
            raise KeyboardInterrupt("simulated crash")
        calls.append(spec.name)
        return real(spec)

    monkeypatch.setattr(build, "build_shard", crashing)
    with pytest.raises(KeyboardInterrupt):
        build.build_store(str(root), csvs, out, resolutions=RES, shard_size=2, use_ray=False, progress=False)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    with pytest.raises(StoreError, match="no store"):
        open_store(out)
    before = all_files(out)
    assert not [p for p in before if ".tmp-" in p]
    done = [p for p in before if p.endswith(".parquet") and ("shard-00000" in p or "shard-00001" in p)
            and "/train/" in p]
    assert len(done) == 4

    monkeypatch.setattr(build, "build_shard", real)
    built = []
    manifest = build.build_store(str(root), csvs, out, resolutions=RES, shard_size=2, use_ray=False,
                                 progress=False, on_shard=built.append)
    assert sorted((r["split"], r["index"]) for r in built) == [("train", 2), ("train", 3), ("valid", 0)]
    after = all_files(out)
    for p in done:   # finished shards were not rewritten
        assert (after[p].st_ino, after[p].st_mtime_ns) == (before[p].st_ino, before[p].st_mtime_ns)
    assert not [p for p in after if ".tmp-" in p]
    assert verify_store(out) == [] and manifest["counts"]["stored"] == 10
    # A third run has nothing left to do.
    built.clear()
    build.build_store(str(root), csvs, out, resolutions=RES, shard_size=2, use_ray=False, progress=False,
                      on_shard=built.append)
    assert built == []


def test_changed_shard_plan_removes_stale_shards(tmp_path):
    root = tmp_path / "src"
    csvs = write_dataset(root, make_dataset(root, 5, 1))
    out = str(tmp_path / "store")
    build.build_store(str(root), csvs, out, resolutions=[16], shard_size=2, use_ray=False, progress=False)
    assert len(os.listdir(os.path.join(out, "res16", "train"))) == 3
    manifest = build.build_store(str(root), csvs, out, resolutions=[16], shard_size=10, use_ray=False,
                                 progress=False)
    assert os.listdir(os.path.join(out, "res16", "train")) == ["shard-00000.parquet"]
    assert verify_store(out) == [] and manifest["counts"]["stored"] == 7


# --- the Ray path (one test: starting Ray costs seconds) --------------------------------------------

def test_ray_build_matches_in_process_build(tmp_path, monkeypatch):
    for var in ("RAY_TMPDIR", "TMPDIR"):
        monkeypatch.setenv(var, str(tmp_path / "raytmp"))
    os.makedirs(tmp_path / "raytmp")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "raytmp" / "token"))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    root = tmp_path / "src"
    csvs = write_dataset(root, make_dataset(root, 3, 1))
    local = build.build_store(str(root), csvs, str(tmp_path / "a"), resolutions=RES, shard_size=2,
                              use_ray=False, progress=False)
    import ray
    assert not ray.is_initialized()
    on_ray = build.build_store(str(root), csvs, str(tmp_path / "b"), resolutions=RES, shard_size=2,
                               use_ray=True, num_cpus=1, progress=False)
    assert not ray.is_initialized()      # the private Ray instance was shut down
    assert [(s["path"], s["sha256"]) for s in on_ray["shards"]] == [(s["path"], s["sha256"]) for s in local["shards"]]
    assert verify_store(str(tmp_path / "b")) == []


def test_command_line_build_and_verify(tmp_path):
    """``python -m preprocessing build`` / ``verify`` as a user runs them."""
    import subprocess
    import sys
    root = tmp_path / "src"
    csvs = write_dataset(root, make_dataset(root, 2, 1))
    out = tmp_path / "store"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "preprocessing", *a], capture_output=True,
                                    text=True, cwd=repo, env=env, timeout=300)
    done = run("build", "--image-root", str(root), "--csv", csvs[0], "--csv", csvs[1], "--out", str(out),
               "--resolutions", "16", "--no-ray")
    assert done.returncode == 0, done.stderr
    assert "rows in 4 = stored 4 + rejected 0" in done.stdout and "manifest hash" in done.stdout
    assert "build:" in done.stderr                       # the progress bar
    assert run("verify", str(out)).returncode == 0
    bad = run("build", "--image-root", str(tmp_path / "nope"), "--csv", csvs[0], "--out", str(out))
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--image-root" in bad.stderr
    assert run("verify", str(tmp_path / "nothing")).returncode == 1


def test_manifest_hash_ignores_created_and_a_bad_manifest_is_refused(tmp_path, capsys):
    root = tmp_path / "src"
    csvs = write_dataset(root, make_dataset(root, 2, 1))
    out = str(tmp_path / "store")
    manifest = build.build_store(str(root), csvs, out, resolutions=[16], use_ray=False, progress=False)
    assert manifest_hash({**manifest, "created": "another time"}) == manifest_hash(manifest)
    assert manifest_hash({**manifest, "policy": {**manifest["policy"], "Edema": "zeros"}}) != manifest_hash(manifest)
    path = os.path.join(out, "manifest.json")
    text = open(path).read()
    open(path, "w").write(text.replace('"stored": 3', '"stored": 4', 1))
    problems = verify_store(out)
    assert problems == ["res16/train: shards hold 3 rows, manifest counts 4 stored"]
    open(path, "w").write(text[:-20])
    with pytest.raises(StoreError, match="not valid JSON"):
        open_store(out)
    assert cli("verify", [out]) == 1
    assert "not valid JSON" in capsys.readouterr().err


def test_restart_rebuilds_a_shard_corrupted_at_the_same_size(tmp_path):
    root = tmp_path / "src"
    csvs = write_dataset(root, make_dataset(root, 3, 1))
    out = str(tmp_path / "store")
    build.build_store(str(root), csvs, out, resolutions=RES, shard_size=2, use_ray=False, progress=False)
    victim = os.path.join(out, "res32", "train", "shard-00001.parquet")
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0x01                         # same size, one bit off
    open(victim, "wb").write(bytes(data))
    built = []
    build.build_store(str(root), csvs, out, resolutions=RES, shard_size=2, use_ray=False, progress=False,
                      on_shard=built.append)
    assert [(r["split"], r["index"]) for r in built] == [("train", 1)]
    assert verify_store(out) == []


def test_degenerate_images_are_stored_counted_and_warned(tmp_path, capsys):
    root = tmp_path / "src"
    rows = make_dataset(root, 2, 1)
    tiny, strip = image_path("train", 30), image_path("train", 31)
    save_jpeg(root / tiny, noise_image(30, (6, 6)))          # 32 px from 6 px: > 4x upscaled
    save_jpeg(root / strip, noise_image(31, (10, 300)))      # 1:30
    rows["train"] += [csv_row(tiny), csv_row(strip)]
    csvs = write_dataset(root, rows)
    out = str(tmp_path / "store")
    code = cli("build", ["--image-root", str(root), "--csv", csvs[0], "--csv", csvs[1], "--out", out,
                         "--resolutions", "16,32", "--no-ray", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "warning: 2 degenerate image(s) stored" in printed
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["counts"]["degenerate"] == 2 and manifest["counts"]["stored"] == 6
    assert manifest["counts"]["degenerate_by_kind"] == {
        "extreme aspect ratio (more than 3:1)": 1,
        "upscaled more than 4x (short side below 1/4 of the largest resolution)": 1}
    assert [(d["path"], d["source_size"]) for d in manifest["degenerate_images"]] == [(tiny, [6, 6]), (strip, [10, 300])]
    assert verify_store(out) == []


def test_reject_reasons_are_stable_text(tmp_path):
    """The same bad input gives byte-identical rejects.csv in two builds (no memory addresses)."""
    root = tmp_path / "src"
    rows = make_dataset(root, 2, 1)
    garbage = image_path("train", 12)
    os.makedirs(os.path.dirname(root / garbage))
    (root / garbage).write_bytes(b"this is not an image at all")
    rows["train"].append(csv_row(garbage))
    csvs = write_dataset(root, rows)
    texts = []
    for name in ("a", "b"):
        build.build_store(str(root), csvs, str(tmp_path / name), resolutions=[16], use_ray=False, progress=False)
        texts.append(open(tmp_path / name / "rejects.csv").read())
    assert texts[0] == texts[1] and "0x" not in texts[0]
    assert "undecodable image: not a recognised image format" in texts[0]
