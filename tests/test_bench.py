"""The benchmark entry points in bench/: their --help, and the loader benchmark on a store whose
source images are laid out as CheXpert ships them (label CSVs in a subfolder of the image root)."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from common.cli import UserError


@pytest.mark.parametrize("module", ["bench.loader", "bench.sweep_overhead", "bench.gpu_check"])
def test_every_bench_entry_point_has_help_with_examples(module, capsys):
    import importlib
    mod = importlib.import_module(module)
    entry = getattr(mod, "cli", None) or mod.main
    with pytest.raises(SystemExit) as exc:
        entry(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m {module}" in out and "examples:" in out


@pytest.fixture(scope="module")
def chexpert_layout_store(tmp_path_factory):
    """A phantom whose CSVs sit in ROOT/CheXpert-v1.0/ (no ROOT/train.csv), and its store."""
    from preprocessing.build import build_store
    from preprocessing.phantom import make_phantom
    work = tmp_path_factory.mktemp("loader-bench")
    root = work / "images"
    make_phantom(str(root), studies=8, seed=0, min_size=64, max_size=96)
    csv_dir = root / "CheXpert-v1.0"
    csv_dir.mkdir()
    for name in ("train.csv", "valid.csv"):
        shutil.move(str(root / name), str(csv_dir / name))
    assert not (root / "train.csv").exists()
    store = work / "store"
    build_store(str(root), [str(csv_dir / "train.csv"), str(csv_dir / "valid.csv")], str(store),
                resolutions=[32], use_ray=False, progress=False)
    return root, store


def test_loader_bench_reads_the_stores_own_sources_in_the_chexpert_layout(chexpert_layout_store, tmp_path):
    from bench import loader
    root, store = chexpert_layout_store
    out = tmp_path / "loader.json"
    assert loader.main(["--store", str(store), "--resolutions", "32", "--images", "8",
                        "--naive-images", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    naive = [r for r in rows if r["loader"] == "naive"]
    ours = [r for r in rows if r["loader"] == "ours"]
    assert naive[0]["images"] == 3 and naive[0]["images_per_s"] > 0
    assert ours[0]["images"] >= 8 and ours[0]["speedup_vs_naive"] > 0
    # the naive loader opened the store's own first images, under the manifest's image root
    paths = loader.naive_sources(str(store), None, 3)
    assert all(p.startswith(str(root)) and os.path.exists(p) for p in paths)


def test_loader_bench_image_root_override_and_a_clear_error(chexpert_layout_store, tmp_path):
    from bench import loader
    root, store = chexpert_layout_store
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    paths = loader.naive_sources(str(store), str(moved), 2)
    assert all(p.startswith(str(moved)) for p in paths)
    with pytest.raises(UserError, match="source image not found under --image-root"):
        loader.naive_sources(str(store), str(tmp_path / "nowhere"), 2)
    with pytest.raises(UserError, match="--image-root: only used with --store"):
        loader.main(["--image-root", str(root)])
