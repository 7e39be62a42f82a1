"""``python -m bench.store_bench``: the store builder vs the naive path, store size, read speed.

On generated full-size phantom films (2000-3000 px JPEGs, quality 95, with burned-in text, laterality
markers and collimation edges: what puts a fast resize's accuracy at risk) in a temporary folder:

- naive: for each resolution separately, open + decode + grayscale + Lanczos + write PNG;
- the store builder in this process (one core): the default path, the bit-exact one and the
  DCT-scaled decode, each with its worst per-image PSNR against the bit-exact store;
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

from preprocessing import build, phantom
from common.cli import HelpFormatter, UserError, parse_int_list, run_cli
from preprocessing.encoding import ENCODINGS, decode_image, encode_image
from preprocessing.resize import LANCZOS, psnr
from common.schema import DEFAULT_RESOLUTIONS, TASKS

HELP = "Benchmark the store builder against per-resolution resizing, and the store's size and read speed."
EPILOG = """examples:
  python -m bench.store_bench --images 40
  python -m bench.store_bench --images 200 --ray-cpus 8 --write bench-store.md
"""


def film_specs(n: int, min_size: int, max_size: int) -> list:
    """N phantom films (docs/data.md) with burned-in text, markers and collimation edges, sizes drawn
    in [min_size, max_size] like a mix of real full-size films, one in three lateral."""
    rng = np.random.default_rng(0)
    specs = []
    for i in range(n):
        height = int(rng.integers(min_size, max_size + 1))
        width = int(np.clip(round(height * rng.uniform(0.80, 1.05)), min_size, max_size))
        specs.append(phantom.ImageSpec(path="x", width=width, height=height, view="Lateral" if i % 3 == 0 else "Frontal",
                                       seed=[9, 1, i, 1, 1], patient_seed=[9, 2, i],
                                       findings={"Edema": 0.7} if i % 2 else {}))
    return specs


def make_sources(folder: str, n: int, min_size: int, max_size: int) -> tuple[str, list[str]]:
    """N film JPEGs (quality 95) in CheXpert layout plus train.csv/valid.csv (1 in 8 to valid)."""
    rows = {"train": [], "valid": []}
    for i, spec in enumerate(film_specs(n, min_size, max_size)):
        split = "valid" if i % 8 == 7 else "train"
        path = f"CheXpert-v1.0/{split}/patient{i:05d}/study1/view1_frontal.jpg"
        full = os.path.join(folder, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(phantom.encode_jpeg(phantom.render_image(spec), 95))
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


#: The builder's variants, timed side by side: (key, label, build_store keywords).
VARIANTS = (
    ("store", "store builder, default (full decode, bicubic pyramid, Lanczos)", {}),
    ("store-exact", "store builder, `--reduce-factor 0` (Lanczos straight from full size, bit-exact)",
     {"reduce_factor": None}),
    ("store-draft2", "store builder, `--draft-factor 2 --reduce-factor 0` (DCT-scaled decode, the former default)",
     {"draft_factor": 2.0, "reduce_factor": None}),
)


#: The machine's 1-minute load average when the bench started (a busy machine skews CPU seconds).
LOAD_BEFORE = [float("nan")]


def run_bench(n: int, min_size: int, max_size: int, resolutions: list[int], ray_cpus: int,
              keep: str | None) -> tuple[str, dict]:
    LOAD_BEFORE[0] = os.getloadavg()[0]
    work = keep or tempfile.mkdtemp(prefix="cxr-bench-")
    os.makedirs(work, exist_ok=True)
    try:
        src = os.path.join(work, "src")
        print(f"generating {n} phantom film JPEGs {min_size}-{max_size} px q95 in {src} ...", file=sys.stderr)
        _, csvs = make_sources(src, n, min_size, max_size)
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
        # Warm-up: imports (pandas; torch, for the bicubic pyramid) are paid once per process, not per image.
        build._load_labels(csvs, None)
        import torch.nn.functional  # noqa: F401 (imported for its cost)
        for key, label, kwargs in VARIANTS:
            print(f"{label}, in process ...", file=sys.stderr)
            results[key] = timed(build.build_store, src, csvs, os.path.join(work, key), use_ray=False,
                                 **common, **kwargs)
        if ray_cpus:
            print(f"store builder, local Ray with {ray_cpus} CPUs ...", file=sys.stderr)
            wall, _ = timed(build.build_store, src, csvs, os.path.join(work, "store-ray"), use_ray=True,
                            num_cpus=ray_cpus, **common)
            results["store-ray"] = (wall, wall * ray_cpus)   # CPU of the workers is not ours to count
        from preprocessing.manifest import read_manifest
        from preprocessing.store import open_store
        manifest = read_manifest(os.path.join(work, "store"))
        stores = {key: open_store(os.path.join(work, key)) for key, _, _ in VARIANTS}
        exact = stores["store-exact"]
        sizes, reads, worst = {}, {}, {"store": {}, "store-draft2": {}}
        for r in resolutions:
            for key in worst:
                values = []
                for split in exact.splits:
                    ref = exact.read(r, split).column("image").to_pylist()
                    imgs = stores[key].read(r, split).column("image").to_pylist()
                    values += [psnr(exact.decode(x), exact.decode(y)) for x, y in zip(imgs, ref)]
                worst[key][r] = min(values)
            sizes[r] = sum(s["bytes"] for s in manifest["shards"] if s["resolution"] == r)
            table = stores["store"].read(r, "train")
            reads[r] = {}
            for enc in ENCODINGS:
                t_enc = table if enc == manifest["encoding"] else reencode(table, manifest["encoding"], enc)
                reads[r][enc] = read_throughput(t_enc, enc)
        return _report(n, min_size, max_size, src_bytes, resolutions, ray_cpus, results, manifest, sizes,
                       reads, worst), results
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _report(n, min_size, max_size, src_bytes, resolutions, ray_cpus, results, manifest, sizes, reads, worst) -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    naive_ips = n / results["naive"][1]
    lines = [
        f"Machine: {platform.machine()} {cpu}, {os.cpu_count()} CPUs visible, 1-minute load average "
        f"{LOAD_BEFORE[0]:.2f} before the run; "
        f"Python {platform.python_version()}, Pillow {Image.__version__}, pyarrow {pa.__version__}.",
        f"Input: {n} phantom film JPEGs (burned-in text, laterality marker, collimation edges) of "
        f"{min_size}-{max_size} px, quality 95, {src_bytes / n / 1e6:.2f} MB each; resolutions "
        f"{','.join(map(str, resolutions))}.",
        "",
        "images/s per core = images / CPU seconds of the process (wall seconds x CPUs for Ray, whose",
        f"figure includes starting Ray and its workers); shards of {max(1, n // 8)} images, so that a",
        "Ray run has work for 8 CPUs. PSNR: worst image of all splits against the bit-exact store (full",
        "decode, Lanczos straight to each resolution).",
        "",
        "| path | cores | wall s | CPU s | images/s per core | vs naive | worst PSNR per resolution |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def row(name, key, cores):
        wall, cpu_s = results[key]
        ips = n / cpu_s
        quality = ", ".join(f"{r}: {v:.1f} dB" for r, v in worst[key].items()) if key in worst else \
            ("exact (the reference)" if key == "store-exact" else "")
        lines.append(f"| {name} | {cores} | {wall:.1f} | {cpu_s:.1f} | {ips:.2f} | {ips / naive_ips:.2f}x | {quality} |")
    row("naive (per resolution: open, decode, Lanczos, write PNG)", "naive", 1)
    for key, label, _ in VARIANTS:
        row(label, key, 1)
    if "store-ray" in results:
        row("store builder on local Ray (incl. Ray start-up)", "store-ray", ray_cpus)
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
    parser.add_argument("--min-size", type=int, default=2000, help="smallest source side in pixels")
    parser.add_argument("--max-size", type=int, default=3000, help="largest source side in pixels")
    parser.add_argument("--resolutions", default=",".join(map(str, DEFAULT_RESOLUTIONS)))
    parser.add_argument("--ray-cpus", type=int, default=0, help="also time the builder on a local Ray with this many CPUs (0: skip)")
    parser.add_argument("--keep", default=None, metavar="DIR", help="work in DIR and keep it (default: a temporary folder, removed)")
    parser.add_argument("--write", default=None, metavar="MD", help="also write the report to this Markdown file")


def run(args) -> int:
    if args.images < 1:
        raise UserError("--images: need at least 1")
    resolutions = parse_int_list(args.resolutions, "--resolutions")
    if not 64 <= args.min_size <= args.max_size:
        raise UserError(f"--min-size/--max-size: need 64 <= min ({args.min_size}) <= max ({args.max_size})")
    report, _ = run_bench(args.images, args.min_size, args.max_size, resolutions, args.ray_cpus, args.keep)
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
