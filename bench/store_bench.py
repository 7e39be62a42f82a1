"""``python -m bench.store_bench`` (also ``python -m preprocessing bench``): the store builder vs the naive path, store size, read speed.

On generated full-size JPEGs (default 2320 x 2832, quality 95) in a temporary folder, in one run:

- naive: for each resolution separately, open + decode + grayscale + Lanczos + write PNG;
- the store builder in this process (one core), with the reduced JPEG decode and without it;
- optionally the builder on a private local Ray (``--ray-cpus``), images/s divided by its CPUs;
- the store's size per resolution, and read throughput (rows/s on one core, Parquet -> arrays)
  for each image encoding, the store's own and the alternatives re-encoded from the same pixels.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from preprocessing import build
from common.cli import HelpFormatter, UserError, parse_int_list, run_cli
from preprocessing.encoding import ENCODINGS, decode_image, encode_image
from preprocessing.resize import LANCZOS, psnr
from common.schema import DEFAULT_RESOLUTIONS, TASKS

HELP = "Benchmark the store builder against per-resolution resizing, and the store's size and read speed."
EPILOG = """examples:
  python -m bench.store_bench --images 40
  python -m bench.store_bench --images 200 --ray-cpus 8 --write docs/bench-store.md
"""


def synthetic_radiograph(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A chest-radiograph-like 8-bit picture: body, dark lungs, heart, ribs and quantum noise.

    Only for speed and size measurements (JPEG decode cost and compressibility resemble a real
    film); the learnable phantom dataset is ``preprocessing.phantom``.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / width - 0.5, y / height - 0.5
    img = 0.55 + 0.25 * np.exp(-(u / 0.45) ** 4)
    for side in (-1, 1):
        d = ((u - side * (0.17 + 0.02 * rng.random())) / 0.14) ** 2 + ((v + 0.02) / 0.3) ** 2
        img -= 0.35 * np.clip(1 - d, 0, 1) ** 0.5
    hd = ((u + 0.04) / (0.11 + 0.03 * rng.random())) ** 2 + ((v - 0.12) / 0.12) ** 2
    img += 0.25 * np.clip(1 - hd, 0, 1) ** 0.5
    img += 0.06 * np.maximum(0, np.sin((v * (20 + 4 * rng.random()) + 3 * u * u) * np.pi)) ** 8 * (np.abs(u) > 0.03)
    img += 0.015 * rng.standard_normal((height, width)).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_sources(folder: str, n: int, width: int, height: int) -> tuple[str, list[str]]:
    """N JPEGs in CheXpert layout plus train.csv/valid.csv (1 in 8 to valid)."""
    rows = {"train": [], "valid": []}
    for i in range(n):
        split = "valid" if i % 8 == 7 else "train"
        path = f"CheXpert-v1.0/{split}/patient{i:05d}/study1/view1_frontal.jpg"
        full = os.path.join(folder, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        Image.fromarray(synthetic_radiograph(width, height, seed=i)).save(full, format="JPEG", quality=95)
        rows[split].append([path, "Female", "50", "Frontal", "PA"] + ["1.0", "0.0", "-1.0", "", "1.0"])
    csvs = []
    for split, split_rows in rows.items():
        if not split_rows:
            continue
        p = os.path.join(folder, f"{split}.csv")
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *TASKS])
            w.writerows(split_rows)
        csvs.append(p)
    return folder, csvs


def timed(fn, *args, **kwargs) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call.

    CPU seconds make "per core" figures robust on a machine shared with other work."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args, **kwargs)
    return time.perf_counter() - wall, time.process_time() - cpu


def naive_resize(folder: str, paths: list[str], resolutions: list[int], out: str) -> None:
    """The per-resolution path: open, decode, grayscale, Lanczos, write PNG (one file per res)."""
    for r in resolutions:
        for i, p in enumerate(paths):
            with Image.open(os.path.join(folder, p)) as im:
                im.convert("L").resize((r, r), LANCZOS).save(os.path.join(out, f"{r}-{i}.png"))


def read_throughput(table: pa.Table, encoding: str, repeats: int = 3) -> tuple[int, float]:
    """(Parquet bytes, rows/s reading the file and decoding every image) for one table and encoding."""
    buf = io.BytesIO()
    build.write_parquet(table, buf, encoding)
    data = buf.getvalue()
    def read():
        t = pq.read_table(pa.BufferReader(data), columns=["image"])
        for blob in t.column("image").to_pylist():
            decode_image(blob, encoding)

    best = min(timed(read)[1] for _ in range(repeats))
    return len(data), table.num_rows / max(best, 1e-9)


def reencode(table: pa.Table, src: str, dst: str) -> pa.Table:
    blobs = [encode_image(decode_image(b, src), dst) for b in table.column("image").to_pylist()]
    return table.set_column(table.schema.get_field_index("image"), "image", pa.array(blobs, pa.binary()))


def run_bench(n: int, width: int, height: int, resolutions: list[int], ray_cpus: int, keep: str | None) -> tuple[str, dict]:
    work = keep or tempfile.mkdtemp(prefix="cxr-bench-")
    os.makedirs(work, exist_ok=True)
    try:
        src = os.path.join(work, "src")
        print(f"generating {n} JPEGs {width}x{height} q95 in {src} ...", file=sys.stderr)
        _, csvs = make_sources(src, n, width, height)
        paths = []
        for c in csvs:
            with open(c) as f:
                paths += [r["Path"] for r in csv.DictReader(f)]
        src_bytes = sum(os.path.getsize(os.path.join(src, p)) for p in paths)
        results = {}
        naive_out = os.path.join(work, "naive")
        os.makedirs(naive_out)
        print("naive path ...", file=sys.stderr)
        results["naive"] = timed(naive_resize, src, paths, resolutions, naive_out)
        common = dict(resolutions=resolutions, shard_size=max(1, n // 8), progress=False)
        build._load_labels(csvs, None)   # warm-up: imports (pandas, ...) are not part of the timing
        print("store builder, in process ...", file=sys.stderr)
        results["store"] = timed(build.build_store, src, csvs, os.path.join(work, "store"), use_ray=False, **common)
        print("store builder, full decode, in process ...", file=sys.stderr)
        results["store-full"] = timed(build.build_store, src, csvs, os.path.join(work, "store-full"),
                                      use_ray=False, draft_factor=None, **common)
        print("store builder, draft factor 1, in process ...", file=sys.stderr)
        results["store-d1"] = timed(build.build_store, src, csvs, os.path.join(work, "store-d1"),
                                    use_ray=False, draft_factor=1.0, **common)
        if ray_cpus:
            print(f"store builder, local Ray with {ray_cpus} CPUs ...", file=sys.stderr)
            wall, _ = timed(build.build_store, src, csvs, os.path.join(work, "store-ray"), use_ray=True,
                            num_cpus=ray_cpus, **common)
            results["store-ray"] = (wall, wall * ray_cpus)   # CPU of the workers is not ours to count
        from preprocessing.manifest import read_manifest
        manifest = read_manifest(os.path.join(work, "store"))

        from preprocessing.store import open_store
        store, full = open_store(os.path.join(work, "store")), open_store(os.path.join(work, "store-full"))
        d1 = open_store(os.path.join(work, "store-d1"))
        sizes, reads, worst = {}, {}, {"store": {}, "store-d1": {}}
        for r in resolutions:
            table = store.read(r, "train")
            ref = full.read(r, "train").column("image").to_pylist()
            for key, st in (("store", store), ("store-d1", d1)):
                imgs = st.read(r, "train").column("image").to_pylist()
                worst[key][r] = min(psnr(st.decode(a), full.decode(b)) for a, b in zip(imgs, ref))
            sizes[r] = sum(s["bytes"] for s in manifest["shards"] if s["resolution"] == r)
            reads[r] = {}
            for enc in ENCODINGS:
                t_enc = table if enc == store.encoding else reencode(table, store.encoding, enc)
                reads[r][enc] = read_throughput(t_enc, enc)
        return _report(n, width, height, src_bytes, resolutions, ray_cpus, results, manifest, sizes, reads, worst), results
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _report(n, width, height, src_bytes, resolutions, ray_cpus, results, manifest, sizes, reads, worst) -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    naive_ips = n / results["naive"][1]
    lines = [
        f"Machine: {platform.machine()} {cpu}, {os.cpu_count()} CPUs visible (shared with other work while measured); "
        f"Python {platform.python_version()}, Pillow {Image.__version__}, pyarrow {pa.__version__}.",
        f"Input: {n} synthetic radiograph JPEGs {width}x{height}, quality 95, {src_bytes / n / 1e6:.2f} MB each; "
        f"resolutions {','.join(map(str, resolutions))}.",
        "",
        "images/s per core = images / CPU seconds of the process (wall seconds x CPUs for Ray, whose",
        "figure includes starting Ray and its workers).",
        "",
        "| path | cores | wall s | CPU s | images/s per core | vs naive |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    def row(name, key, cores):
        wall, cpu = results[key]
        ips = n / cpu
        lines.append(f"| {name} | {cores} | {wall:.1f} | {cpu:.1f} | {ips:.2f} | {ips / naive_ips:.1f}x |")
    row("naive (per resolution: open, decode, Lanczos, write PNG)", "naive", 1)
    row("store builder, in process (reduced JPEG decode, default)", "store", 1)
    row("store builder, in process, draft factor 1 (`--draft-factor 1`)", "store-d1", 1)
    row("store builder, in process, full decode (`--draft-factor 0`, bit-exact)", "store-full", 1)
    if "store-ray" in results:
        row("store builder on local Ray (incl. Ray start-up)", "store-ray", ray_cpus)
    lines += [""] + [f"Worst per-image PSNR against the full-decode store, {name}: "
                     + ", ".join(f"{r}px {v:.1f} dB" for r, v in worst[key].items()) + " (requirement: >= 50 dB)."
                     for key, name in (("store", "draft factor 2 (default)"), ("store-d1", "draft factor 1"))]
    lines += ["",
              f"Store size ({manifest['encoding']}, all splits) and read throughput (train split, one core, "
              "best of 3, rows per CPU second: Parquet bytes in memory -> numpy arrays):", "",
              "| resolution | store bytes | bytes/image | " + " | ".join(f"{e} rows/s (bytes)" for e in ENCODINGS) + " |",
              "| ---: | ---: | ---: | " + " | ".join("---:" for _ in ENCODINGS) + " |"]
    stored = manifest["counts"]["stored"]
    for r in resolutions:
        cells = " | ".join(f"{reads[r][e][1]:,.0f} ({reads[r][e][0]:,})" for e in ENCODINGS)
        lines.append(f"| {r} | {sizes[r]:,} | {sizes[r] / stored:,.0f} | {cells} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser) -> None:
    parser.add_argument("--images", type=int, default=40, help="number of source JPEGs to generate")
    parser.add_argument("--width", type=int, default=2320, help="source width in pixels")
    parser.add_argument("--height", type=int, default=2832, help="source height in pixels")
    parser.add_argument("--resolutions", default=",".join(map(str, DEFAULT_RESOLUTIONS)))
    parser.add_argument("--ray-cpus", type=int, default=0, help="also time the builder on a local Ray with this many CPUs (0: skip)")
    parser.add_argument("--keep", default=None, metavar="DIR", help="work in DIR and keep it (default: a temporary folder, removed)")
    parser.add_argument("--write", default=None, metavar="MD", help="also write the report to this Markdown file")


def run(args) -> int:
    if args.images < 1:
        raise UserError("--images: need at least 1")
    resolutions = parse_int_list(args.resolutions, "--resolutions")
    report, _ = run_bench(args.images, args.width, args.height, resolutions, args.ray_cpus, args.keep)
    command = "python -m bench.store_bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])
    text = f"Command: `{command}`\n\n{report}"
    print(text)
    if args.write:
        with open(args.write, "w") as f:
            f.write("# Store benchmark (`python -m bench.store_bench`)\n\n" + text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.store_bench", description=HELP, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    add_arguments(parser)
    return parser


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="bench.store_bench"))
