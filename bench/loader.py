"""``python -m bench.loader``: images/s per core of our loader next to the naive one (no tests).

Ours: store read + decode + keyed augmentation, batched, as the trainer's loader workers do it.
Naive: what a typical CheXpert script does per sample: decode the full-size source JPEG,
Lanczos-resize, augment with torchvision. Both run on one thread at each resolution. The naive
loader reads the very images the store was built from: their paths are the store's ``image_id``
column under the store's image root (``--image-root`` overrides it, for a store built elsewhere),
so the layout of the image folder (phantom or CheXpert) does not matter.

Results go to stdout as a Markdown table and, with ``--json FILE``, as JSON. Training-step
throughput is ``python -m bench.gpu_check --sections env,configs`` (docs/gpu.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from common.cli import HelpFormatter, UserError, parse_int_list, run_cli

EPILOG = """examples:
  # make a small phantom (realistic 1000-3000 px JPEGs) and its store, compare at 160/320
  python -m bench.loader --workdir /tmp/bench --studies 40 --resolutions 160,320

  # an existing store; the naive loader reads the source images the store was built from
  python -m bench.loader --store demo/store --resolutions 160,320

  # a CheXpert store whose source images now live elsewhere (CheXpert-v1.0/train/... below /data)
  python -m bench.loader --store /data/cxr-store --image-root /data --resolutions 320
"""


# ---- loader -----------------------------------------------------------------------------------

def _prepare_phantom(workdir: str, studies: int, min_size: int, max_size: int,
                     resolutions: list[int]) -> str:
    from preprocessing.build import build_store
    from preprocessing.phantom import make_phantom
    root = os.path.join(workdir, "phantom")
    store = os.path.join(workdir, "store")
    if not os.path.exists(os.path.join(root, "train.csv")):
        make_phantom(root, studies=studies, seed=0, min_size=min_size, max_size=max_size,
                     workers=max(1, (os.cpu_count() or 1)))
    build_store(root, [os.path.join(root, "train.csv"), os.path.join(root, "valid.csv")], store,
                resolutions=resolutions, use_ray=False, progress=False)
    return store


def bench_ours(store_loc: str, resolution: int, limit_images: int, seed: int = 0) -> dict:
    """Store read + decode + augmentation (keyed params, batched grid_sample) on one thread."""
    from preprocessing.store import open_store
    from trainer.augment import AugmentSettings, to_model_input
    from trainer.data import StudyBatches, load_split
    from common.schema import TASKS
    t0 = time.perf_counter()
    store = open_store(store_loc, verify=False)
    data = load_split(store, resolution, "train", TASKS)
    t_read = time.perf_counter() - t0
    batches = StudyBatches(data, 40, seed=seed, augment=AugmentSettings())
    images = 0
    t_decode = t_aug = 0.0
    for b in range(len(batches)):
        t1 = time.perf_counter()
        batch = batches[(1, b)]
        t2 = time.perf_counter()
        x = to_model_input(batch["images"], batch["aug"])
        t3 = time.perf_counter()
        assert x.shape[1] == 3
        images += batch["images"].shape[0]
        t_decode += t2 - t1
        t_aug += t3 - t2
        if images >= limit_images:
            break
    # The read is amortised over the whole split; charge the share of the images measured.
    read_share = t_read * images / data.num_images
    total = read_share + t_decode + t_aug
    return {"loader": "ours", "resolution": resolution, "images": images,
            "images_per_s": images / total, "read_s": read_share, "decode_s": t_decode,
            "augment_s": t_aug,
            # with augmentation on the GPU, the CPU only reads, decodes and draws parameters
            "cpu_images_per_s_gpu_augment": images / (read_share + t_decode)}


def naive_sources(store_loc: str, image_root: str | None, limit_images: int) -> list[str]:
    """The source files of the store's first ``limit_images`` training images: the store's
    ``image_id`` (the CSV ``Path``) under its image root, as the store build read them."""
    from common import storage
    from preprocessing.store import open_store
    store = open_store(store_loc, verify=False)
    root = image_root or store.manifest.get("image_root")
    if not root:
        raise UserError(f"--store {store_loc}: its manifest names no image root; give --image-root")
    ids = store.read(store.resolutions[0], "train", columns=["image_id"]).column("image_id")
    paths = [storage.join(root, i) if storage.is_remote(root) else os.path.join(root, i)
             for i in ids.to_pylist()[:limit_images]]
    missing = next((p for p in paths if not storage.exists(p)), None)
    if missing is not None:
        flag = "--image-root" if image_root else f"the store's image root {root} (--image-root to override)"
        raise UserError(f"{missing}: source image not found under {flag}")
    return paths


def bench_naive(paths: list[str], resolution: int) -> dict:
    """The per-sample loader of a typical CheXpert script: full JPEG decode, resize, augment."""
    import io

    from PIL import Image
    from torchvision import transforms as T

    from common import storage
    transform = T.Compose([
        T.RandomRotation(30),
        T.RandomAffine(degrees=0, scale=(1 / 1.2, 1.0)),     # zoom-out, black padding
        T.RandomPerspective(distortion_scale=0.1, p=0.75),
        T.ColorJitter(brightness=0.2, contrast=0.2),
        T.Grayscale(num_output_channels=3),
        T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    t0 = time.perf_counter()
    for p in paths:
        with Image.open(io.BytesIO(storage.read_bytes(p))) as im:
            im = im.convert("L").resize((resolution, resolution), Image.LANCZOS)
        x = transform(im)
        assert x.shape == (3, resolution, resolution)
    total = time.perf_counter() - t0
    return {"loader": "naive", "resolution": resolution, "images": len(paths),
            "images_per_s": len(paths) / total}


def run_loader(args) -> int:
    torch.set_num_threads(1)
    resolutions = parse_int_list(args.resolutions, "--resolutions")
    if args.store:
        store = args.store
    elif args.image_root:
        raise UserError("--image-root: only used with --store (the store built from those images)")
    else:
        workdir = args.workdir or tempfile.mkdtemp(prefix="loader-bench-")
        store = _prepare_phantom(workdir, args.studies, args.min_size, args.max_size, resolutions)
    paths = naive_sources(store, args.image_root, args.naive_images)
    rows = []
    for res in resolutions:
        ours = bench_ours(store, res, args.images)
        naive = bench_naive(paths, res)
        ours["speedup_vs_naive"] = ours["images_per_s"] / naive["images_per_s"]
        rows += [ours, naive]
        print(f"res {res}: ours {ours['images_per_s']:.0f} img/s/core "
              f"(read {ours['read_s']:.2f}s decode {ours['decode_s']:.2f}s augment "
              f"{ours['augment_s']:.2f}s over {ours['images']} images; without the CPU augmentation "
              f"{ours['cpu_images_per_s_gpu_augment']:.0f} img/s/core); naive "
              f"{naive['images_per_s']:.1f} img/s/core over {naive['images']} images; "
              f"{ours['speedup_vs_naive']:.1f}x", flush=True)
    print("\n| resolution | ours, CPU augmentation (img/s/core) | ours, GPU-side augmentation: CPU "
          "share (img/s/core) | naive (img/s/core) | speedup (CPU aug) |\n|---|---|---|---|---|")
    for res in resolutions:
        o = next(r for r in rows if r["resolution"] == res and r["loader"] == "ours")
        n = next(r for r in rows if r["resolution"] == res and r["loader"] == "naive")
        print(f"| {res} | {o['images_per_s']:.0f} | {o['cpu_images_per_s_gpu_augment']:.0f} | "
              f"{n['images_per_s']:.1f} | "
              f"{o['speedup_vs_naive']:.1f}x |")
    _write_json(args.json, {"bench": "loader", "rows": rows})
    return 0


def _write_json(path, obj) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.split("\n")[0],
                                epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--store", help="an existing store (default: build a phantom and its store in --workdir)")
    p.add_argument("--image-root", help="where the store's source images are now, if not where it "
                                        "was built from (the manifest's image_root)")
    p.add_argument("--workdir", help="where to create the phantom and store when no --store is given")
    p.add_argument("--studies", type=int, default=40, help="phantom studies to create")
    p.add_argument("--min-size", type=int, default=1000, help="phantom source size, min")
    p.add_argument("--max-size", type=int, default=3000, help="phantom source size, max")
    p.add_argument("--resolutions", default="160,320")
    p.add_argument("--images", type=int, default=400, help="images timed for our loader")
    p.add_argument("--naive-images", type=int, default=30, help="images timed for the naive one")
    p.add_argument("--json", help="also write the results here")
    return p


def main(argv=None) -> int:
    return run_loader(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="bench.loader"))
