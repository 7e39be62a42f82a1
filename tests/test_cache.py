"""The node-local store cache (preprocessing.cache.local_store): copied once, checked, never half used.

Tiny stores (a handful of 64 px JPEGs, resolutions 16/32, two rows per shard) built in-process.
"""
from __future__ import annotations

import csv
import multiprocessing
import os

import numpy as np
import pytest
from PIL import Image

from common import storage
from preprocessing import build, cache
from preprocessing.cache import CacheError, local_store
from common.schema import TASKS
from preprocessing.store import StoreError, open_store

HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *TASKS]


def make_store(root, out, n_train=5, n_valid=2, resolutions=(16, 32)):
    """A CheXpert-layout folder of small noise JPEGs built into a store at ``out``; its manifest."""
    rows = {"train": [], "valid": []}
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("valid", n_valid)):
        for i in range(n):
            rel = f"CheXpert-v1.0/{split}/patient{100 * (split == 'valid') + i:05d}/study1/view1_frontal.jpg"
            os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (64, 72), dtype=np.uint8)).save(os.path.join(root, rel))
            pos, neg = ("1.0", "0.0") if i % 2 else ("0.0", "1.0")     # both classes in every split
            rows[split].append([rel, "Female", "60", "Frontal", "PA", pos, neg, pos, neg, pos])
    csvs = []
    for split, split_rows in rows.items():
        path = os.path.join(root, f"{split}.csv")
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(HEADER)
            w.writerows(split_rows)
        csvs.append(path)
    return build.build_store(str(root), csvs, out, resolutions=list(resolutions), shard_size=2,
                             use_ray=False, progress=False)


def count_copies(monkeypatch):
    calls = []
    real = cache._copy

    def counting(src, dst):
        calls.append(src)
        return real(src, dst)
    monkeypatch.setattr(cache, "_copy", counting)
    return calls


@pytest.fixture
def store(tmp_path):
    out = str(tmp_path / "remote" / "store")
    manifest = make_store(tmp_path / "src", out)
    return out, manifest


def test_copies_one_resolution_once_and_reads_the_same(tmp_path, store, monkeypatch):
    out, manifest = store
    calls = count_copies(monkeypatch)
    local = local_store(out, 32, str(tmp_path / "cache"))
    res32 = [s for s in manifest["shards"] if s["resolution"] == 32]
    assert len(calls) == len(res32) == 4          # 3 train + 1 valid shard of <= 2 rows
    assert local.startswith(str(tmp_path / "cache"))
    assert not os.path.exists(os.path.join(local, "res16"))          # only what the trials need
    assert not [n for n in os.listdir(local) if n.startswith(".partial-")]

    cached = open_store(local, resolution=32)                           # verifies sha256 locally
    original = open_store(out, resolution=32)
    assert cached.manifest_hash == original.manifest_hash
    for split in ("train", "valid"):
        assert cached.read(32, split).equals(original.read(32, split))

    assert local_store(out, 32, str(tmp_path / "cache")) == local      # second trial on the node
    assert len(calls) == 4                                             # nothing copied again

    local_store(out, 16, str(tmp_path / "cache"))                      # another resolution: same folder
    assert len(calls) == 4 + len([s for s in manifest["shards"] if s["resolution"] == 16])
    assert open_store(local, resolution=16).read(16, "train").equals(original.read(16, "train"))


def test_corrupt_remote_shard_is_refused_and_never_cached(tmp_path, store):
    out, manifest = store
    shard = next(s for s in manifest["shards"] if s["resolution"] == 32 and s["split"] == "train")
    path = os.path.join(out, shard["path"])
    data = bytearray(open(path, "rb").read())
    data[10] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(CacheError, match=shard["path"]):
        local_store(out, 32, str(tmp_path / "cache"))
    folder = cache.cache_folder(str(tmp_path / "cache"), manifest)
    assert not os.path.exists(os.path.join(folder, ".complete-res32.json"))
    assert not os.path.exists(os.path.join(folder, shard["path"]))
    assert not [n for n in os.listdir(folder) if n.startswith(".partial-")]


def test_interrupted_copy_is_finished_by_the_next_caller(tmp_path, store, monkeypatch):
    out, manifest = store
    real = cache._copy
    calls = []

    def dies_on_third(src, dst):
        calls.append(src)
        if len(calls) == 3:
            raise KeyboardInterrupt("node preempted")
        return real(src, dst)
    monkeypatch.setattr(cache, "_copy", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        local_store(out, 32, str(tmp_path / "cache"))
    folder = cache.cache_folder(str(tmp_path / "cache"), manifest)
    assert not os.path.exists(os.path.join(folder, ".complete-res32.json"))   # partial: not usable

    calls.clear()
    monkeypatch.setattr(cache, "_copy", lambda s, d: (calls.append(s), real(s, d))[1])
    local = local_store(out, 32, str(tmp_path / "cache"))
    assert len(calls) == 4 - 2                          # the two shards already in place were kept
    assert open_store(local, resolution=32).manifest_hash == open_store(out).manifest_hash


def test_damaged_cache_is_copied_again(tmp_path, store, monkeypatch):
    out, manifest = store
    local = local_store(out, 32, str(tmp_path / "cache"))
    shard = next(s for s in manifest["shards"] if s["resolution"] == 32)
    with open(os.path.join(local, shard["path"]), "r+b") as f:
        f.truncate(5)
    calls = count_copies(monkeypatch)
    assert local_store(out, 32, str(tmp_path / "cache")) == local
    assert calls == [storage.join(out, shard["path"])]
    open_store(local, resolution=32)


def test_rebuilt_store_gets_its_own_folder_and_bad_input_is_one_line(tmp_path, store):
    out, _ = store
    first = local_store(out, 32, str(tmp_path / "cache"))
    make_store(tmp_path / "src2", out, n_train=3)                     # different content, same place
    second = local_store(out, 32, str(tmp_path / "cache"))
    assert second != first and open_store(second, resolution=32).manifest_hash == open_store(out).manifest_hash
    with pytest.raises(StoreError, match="no resolution 48"):
        local_store(out, 48, str(tmp_path / "cache"))
    with pytest.raises(StoreError, match="no store at"):
        local_store(str(tmp_path / "nowhere"), 32, str(tmp_path / "cache"))


def _trial(args):
    out, cache_dir, log, resolution = (*args, 32) if len(args) == 3 else args
    real = cache._copy

    def logged(src, dst):
        with open(log, "a") as f:          # O_APPEND: one line per copy, from any process
            f.write(src + "\n")
        import time
        time.sleep(0.05)                   # widen the window in which a second trial could race
        return real(src, dst)
    cache._copy = logged
    local = local_store(out, resolution, cache_dir)
    return local, open_store(local, resolution=resolution).read(resolution, "train").num_rows


def test_concurrent_trials_on_one_node_copy_once(tmp_path, store):
    out, manifest = store
    log = str(tmp_path / "copies.log")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        results = pool.map(_trial, [(out, str(tmp_path / "cache"), log)] * 4)
    assert len({r[0] for r in results}) == 1
    assert {r[1] for r in results} == {manifest["counts"]["per_split"]["train"]["stored"]}
    lines = open(log).read().split()
    assert len(lines) == len(set(lines)) == 4          # every shard copied exactly once


def test_concurrent_trials_of_two_resolutions_share_the_folder(tmp_path, store):
    out, manifest = store
    log = str(tmp_path / "copies.log")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        results = pool.map(_trial, [(out, str(tmp_path / "cache"), log, r) for r in (16, 32, 16, 32)])
    assert len({r[0] for r in results}) == 1
    lines = open(log).read().split()
    assert len(lines) == len(set(lines)) == len(manifest["shards"])   # both resolutions, each once
    assert not [n for n in os.listdir(results[0][0]) if n.startswith(".partial-")]


# --- s3:// on a local S3-compatible server ---------------------------------------------------

def test_s3_store_is_cached_locally(tmp_path, s3_endpoint, monkeypatch):
    endpoint, client = s3_endpoint
    out = f"s3://cxr/store?endpoint_override={endpoint}&scheme=http"
    manifest = make_store(tmp_path / "src", out)
    calls = count_copies(monkeypatch)
    local = local_store(out, 16, str(tmp_path / "cache"))
    assert not storage.is_remote(local) and len(calls) == 4
    assert open_store(local, resolution=16).read(16, "valid").equals(open_store(out).read(16, "valid"))
    assert local_store(out, 16, str(tmp_path / "cache")) == local and len(calls) == 4

    shard = next(s for s in manifest["shards"] if s["resolution"] == 32)
    client.put_object(Bucket="cxr", Key=f"store/{shard['path']}", Body=b"not parquet")
    with pytest.raises(CacheError, match=shard["path"]):
        local_store(out, 32, str(tmp_path / "cache"))
