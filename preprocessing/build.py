"""``python -m preprocessing build``: CheXpert-format CSVs + images -> the sharded Parquet store.

Each shard (a fixed slice of the sorted input rows of one split) is one Ray task: it decodes each
source image once, makes every resolution from that decode, and writes one Parquet file per
resolution, each atomically (temporary name + rename, or one S3 PUT), then a done-record with the
files' sizes and checksums. A rerun after a crash plans the same shards, skips those whose
done-record and files match, and builds the rest. ``manifest.json`` is written last.
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import os
import posixpath
import sys
from typing import Callable, Iterable

import numpy as np

import preprocessing
from common import storage
from common.cli import UserError, parse_int_list
from common.schema import DEFAULT_RESOLUTIONS, MANIFEST_NAME, REJECTS_NAME, SPLITS, shard_dir
from preprocessing.datasets import DatasetOptions, add_dataset_arguments, load_labels, options_from_args
from preprocessing.encoding import DEFAULT_ENCODING, ENCODINGS
from preprocessing.manifest import FORMAT_VERSION, manifest_hash
from preprocessing.resize import (DEFAULT_DRAFT_FACTOR, DEFAULT_REDUCE_FACTOR, MAX_ASPECT_RATIO,
                                  MAX_UPSCALE, PYRAMID_VERSION)
from preprocessing.runner import run_in_process, run_on_ray
# write_parquet and row_schema are part of this module's API (the store bench and tests use them).
from preprocessing.shard import (BUILD_DIR, ShardSpec, build_shard, image_location, row_schema,  # noqa: F401
                                 shard_is_done, write_parquet)

HELP = "Build the Parquet store: every resolution from one decode per image, as Ray tasks."
EPILOG = """examples:
  python -m preprocessing build --image-root demo/phantom --csv demo/phantom/train.csv \\
      --csv demo/phantom/valid.csv --out demo/store
  python -m preprocessing build --dataset nih --image-root /data/nih --csv /data/nih/Data_Entry_2017_v2020.csv \\
      --csv /data/nih/train_val_list.txt --csv /data/nih/test_list.txt --views PA --out /data/nih-store
  python -m preprocessing build --dataset mimic-cxr-jpg --image-root /data/mimic-cxr-jpg/2.0.0 \\
      --csv mimic-cxr-2.0.0-chexpert.csv.gz --csv mimic-cxr-2.0.0-metadata.csv.gz \\
      --csv mimic-cxr-2.0.0-split.csv.gz --tasks all --out /data/mimic-store
  python -m preprocessing build --dataset csv --columns columns.yaml --image-root /data/mine \\
      --csv labels.csv --out /data/mine-store
  python -m preprocessing build --image-root /data/chexpert --csv /data/chexpert/train.csv \\
      --csv /data/chexpert/valid.csv --out s3://bucket/stores/chexpert --address auto --strict
  python -m preprocessing build ... --resolutions 160,320 --policy Atelectasis=zeros --no-ray

A rerun with the same arguments after a crash finishes only the missing shards.
Rejected rows (missing/undecodable images, bad paths, label-stage rejects) go to STORE/rejects.csv.
"""

DEFAULT_SHARD_SIZE = 256
PHANTOM_MARKER = "phantom.json"

# --- planning -----------------------------------------------------------------------------

def _json_value(v):
    if v is None:
        return None
    if isinstance(v, (float, np.floating)):
        return None if np.isnan(v) else float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    return v


def _escapes_root(image_root: str, image_id: str) -> bool:
    if not image_id or image_id.startswith(("/", "\\")) or os.path.isabs(image_id) or ":" in image_id.split("/")[0]:
        return True
    if storage.is_remote(image_root):
        norm = posixpath.normpath(image_id)
        return norm == ".." or norm.startswith("../")
    root = os.path.realpath(image_root)
    full = os.path.realpath(os.path.join(root, image_id))
    return not (full == root or full.startswith(root.rstrip(os.sep) + os.sep))


def split_of(path: str, csv_name: str) -> str:
    """The split rule of docs/architecture.md: a train/valid component of Path, else the CSV stem."""
    for part in str(path).replace("\\", "/").split("/"):
        if part in SPLITS:
            return part
    return os.path.splitext(os.path.basename(csv_name))[0]


def plan_shards(rows: list[dict], out: str, image_root: str, resolutions: list[int], encoding: str,
                draft_factor: float | None, tasks: list[str], shard_size: int,
                reduce_factor: float | None = None) -> list[ShardSpec]:
    """Deterministic shards: rows sorted by (split, image_id), cut every ``shard_size`` rows."""
    rows = sorted(rows, key=lambda r: (r["split"], r["image_id"]))
    specs = []
    for split in sorted({r["split"] for r in rows}):
        split_rows = [r for r in rows if r["split"] == split]
        for index, start in enumerate(range(0, len(split_rows), shard_size)):
            chunk = split_rows[start:start + shard_size]
            key = hashlib.sha256(json.dumps(
                {"format_version": FORMAT_VERSION, "rows": chunk, "resolutions": resolutions,
                 "encoding": encoding, "draft_factor": draft_factor, "reduce_factor": reduce_factor,
                 "pyramid_version": PYRAMID_VERSION if reduce_factor is not None else None,
                 "tasks": tasks,
                 "degenerate_limits": [MAX_UPSCALE, MAX_ASPECT_RATIO],
                 "image_root": os.path.abspath(image_root) if not storage.is_remote(image_root) else image_root},
                sort_keys=True, default=str).encode()).hexdigest()
            specs.append(ShardSpec(out=out, split=split, index=index, key=key, rows=chunk,
                                   image_root=image_root, resolutions=resolutions, encoding=encoding,
                                   draft_factor=draft_factor, reduce_factor=reduce_factor, tasks=tasks))
    return specs


# --- the whole build ----------------------------------------------------------------------

def _load_labels(csvs, policy, dataset: str = "chexpert", image_root: str | None = None, tasks=None,
                 options: DatasetOptions | None = None):
    """The dataset's adapter and its rows (preprocessing.datasets: every check before anything is written)."""
    return load_labels(dataset, list(csvs), image_root=image_root, tasks=tasks, policy=policy, options=options)


def _reject_dict(r) -> dict:
    return {"csv": str(r.csv), "row": int(r.row), "path": str(r.path), "reason": str(r.reason)}


def _write_rejects(out: str, rejects: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["csv", "row", "path", "reason"], lineterminator="\n")
    writer.writeheader()
    for r in sorted(rejects, key=lambda r: (r["csv"], r["row"], r["path"])):
        writer.writerow(r)
    storage.write_bytes(storage.join(out, REJECTS_NAME), buf.getvalue().encode("utf-8"))


def _remove_stale(out: str, specs: list[ShardSpec], resolutions: list[int]) -> None:
    """Delete shard files and done-records of an earlier plan (another shard size, fewer rows)."""
    wanted = {s.file_path(r) for s in specs for r in resolutions} | {s.record_path for s in specs}
    splits = sorted({s.split for s in specs} | set(SPLITS))
    for split in splits:
        folders = [shard_dir(r, split) for r in resolutions] + [f"{BUILD_DIR}/{split}"]
        for folder in folders:
            for name in storage.listdir(storage.join(out, folder)):
                rel = f"{folder}/{name}"
                if name.startswith("shard-") and rel not in wanted:
                    storage.delete(storage.join(out, rel))


def _by_kind(degenerate: list[dict]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for d in degenerate:
        kinds[d["reason"]] = kinds.get(d["reason"], 0) + 1
    return dict(sorted(kinds.items()))


def _dataset_info(image_root: str, layout: str) -> tuple[str, dict | None]:
    """("phantom", its settings) for generated data (whatever its layout), else (layout, None)."""
    marker = image_location(image_root, PHANTOM_MARKER)
    if storage.exists(marker):
        try:
            return "phantom", storage.read_json(marker)
        except ValueError:
            return "phantom", {"error": f"{PHANTOM_MARKER} is not valid JSON"}
    return layout, None


def build_store(image_root: str, csvs: Iterable[str], out: str,
                resolutions: Iterable[int] = DEFAULT_RESOLUTIONS, policy: dict | str | None = None,
                shard_size: int = DEFAULT_SHARD_SIZE, address: str | None = None,
                num_cpus: int | None = None, strict: bool = False, progress: bool = True,
                use_ray: bool = True, encoding: str = DEFAULT_ENCODING,
                draft_factor: float | None = DEFAULT_DRAFT_FACTOR,
                reduce_factor: float | None = DEFAULT_REDUCE_FACTOR,
                on_shard: Callable[[dict], None] | None = None, dataset: str = "chexpert",
                tasks=None, dataset_options: DatasetOptions | None = None) -> dict:
    """Build (or finish) the store at ``out`` and return its manifest.

    ``dataset`` names the label-table layout (preprocessing.datasets); ``tasks`` the labels to store
    (None: the dataset's default tasks; 'all'; or names). Bad input (an unknown dataset or task, a
    table missing columns, an image path outside the root, a patient in two splits) raises
    UserError before anything is written.

    ``use_ray=False`` builds the shards one after another in this process (tests, debugging).
    ``reduce_factor`` is the bicubic pre-reduction of preprocessing.resize (>= 50 dB PSNR of the
    reference); ``reduce_factor=None`` with ``draft_factor=None`` (the default) is bit-exact to it.
    ``strict=True`` raises UserError when any row is rejected (no manifest is written then).
    """
    csvs = [str(c) for c in csvs]
    resolutions = sorted({int(r) for r in resolutions})
    if not csvs:
        raise UserError("build: give at least one --csv")
    if not resolutions or min(resolutions) <= 0:
        raise UserError(f"--resolutions: need positive integers, got {resolutions}")
    if encoding not in ENCODINGS:
        raise UserError(f"--encoding: {encoding!r} is not one of {', '.join(ENCODINGS)}")
    if draft_factor is not None and draft_factor < 1:
        raise UserError(f"--draft-factor: {draft_factor} is below 1 (0 turns the reduced decode off)")
    if reduce_factor is not None and reduce_factor < 1.5:
        raise UserError(f"--reduce-factor: {reduce_factor} is below 1.5 (0 resizes straight from full size)")
    if int(shard_size) <= 0:
        raise UserError(f"--shard-size: {shard_size} is not positive")
    if not storage.is_remote(image_root) and not os.path.isdir(image_root):
        raise UserError(f"--image-root: {image_root} is not a folder")
    for c in csvs:
        if not storage.exists(c):
            raise UserError(f"--csv: {c} does not exist")

    options = dataset_options or DatasetOptions()
    adapter, labelset = _load_labels(csvs, policy, dataset, image_root, tasks, options)
    tasks = list(labelset.tasks)
    rejects = [_reject_dict(r) for r in labelset.rejects]
    frame = labelset.frame
    if labelset.rows_in == 0:
        raise UserError(f"no data rows in {', '.join(csvs)}")
    if labelset.rows_in != len(frame) + len(rejects):
        raise RuntimeError(f"label stage lost rows: rows_in {labelset.rows_in} != "
                           f"{len(frame)} accepted + {len(rejects)} rejected")

    columns = [c for c in row_schema(tasks).names if c not in ("image", "height", "width")]
    rows = []
    for rec in frame[columns + ["image_path", "source_csv", "source_row"]].to_dict("records"):
        rec = {k: _json_value(v) for k, v in rec.items()}
        rec["source_csv"] = str(rec["source_csv"])
        rec["source_row"] = int(rec["source_row"])
        if rec["image_path"] == rec["image_id"]:
            del rec["image_path"]    # the common case; keeps shard keys as they were before adapters
        if _escapes_root(image_root, rec.get("image_path", rec["image_id"])):
            # Symlinks included: a store must never read files outside the root it was given.
            raise UserError(f"{rec['source_csv']} row {rec['source_row']}: image path "
                            f"{rec.get('image_path', rec['image_id'])!r} is outside --image-root "
                            f"{image_root}; nothing written")
        rows.append(rec)
    try:
        storage.makedirs(out)
        storage.check_writable(out)
    except storage.StorageError as exc:
        raise UserError(str(exc)) from None
    if storage.exists(storage.join(out, MANIFEST_NAME)):
        storage.delete(storage.join(out, MANIFEST_NAME))   # the store is incomplete until rewritten
    if strict and rejects:
        _write_rejects(out, rejects)
        first = sorted(rejects, key=lambda r: (r["csv"], r["row"]))[0]
        raise UserError(f"--strict: {len(rejects)} row(s) rejected before decoding "
                        f"(see {storage.display(storage.join(out, REJECTS_NAME))}); first: "
                        f"{first['csv']} row {first['row']} ({first['path']}): {first['reason']}")

    specs = plan_shards(rows, out, image_root, resolutions, encoding, draft_factor, tasks, int(shard_size),
                        reduce_factor)
    _remove_stale(out, specs, resolutions)
    records, todo = {}, []
    for spec in specs:
        record = shard_is_done(spec)
        if record is None:
            todo.append(spec)
        else:
            records[(spec.split, spec.index)] = record

    from tqdm import tqdm
    bar = tqdm(total=len(specs), initial=len(records), unit="shard", desc="build",
               disable=not progress, file=sys.stderr)
    try:
        if todo:
            # build_shard is looked up here (not bound at import) so a test can replace it.
            runner = run_on_ray(todo, build_shard, address, num_cpus) if use_ray else \
                run_in_process(todo, build_shard)
            for record in runner:
                records[(record["split"], record["index"])] = record
                bar.update(1)
                if on_shard is not None:
                    on_shard(record)
    finally:
        bar.close()

    # Assemble the manifest from the done-records, in plan order.
    ordered = [records[(s.split, s.index)] for s in specs]
    shards, converted, per_split, degenerate = [], {}, {}, []
    # Label-stage rejects have no split of their own: CheXpert's rule finds it in the Path, other
    # layouts count them under "unassigned" (shard-stage rejects belong to their shard's split).
    label_split = [split_of(r["path"], r["csv"]) if adapter.name == "chexpert" else "unassigned" for r in rejects]
    for split in sorted({s.split for s in specs} | set(label_split)):
        per_split[split] = {"rows_in": 0, "stored": 0, "rejected": 0, "converted": 0}
    for split in label_split:
        per_split[split]["rejected"] += 1
    for record in ordered:
        rejects.extend(record["rejects"])
        split = record["split"]
        per_split[split]["stored"] += record["stored"]
        per_split[split]["rejected"] += len(record["rejects"])
        per_split[split]["converted"] += len(record["conversions"])
        for c in record["conversions"]:
            converted[c["conversion"]] = converted.get(c["conversion"], 0) + 1
        degenerate.extend(record.get("degenerate", []))
        shards.extend(record["files"])
    for c in per_split.values():
        c["rows_in"] = c["stored"] + c["rejected"]
    shards.sort(key=lambda s: (s["resolution"], s["split"], s["path"]))
    stored = sum(c["stored"] for c in per_split.values())
    counts = {"rows_in": labelset.rows_in, "stored": stored, "rejected": len(rejects),
              "converted": sum(converted.values()), "converted_by_kind": converted,
              "degenerate": len(degenerate), "degenerate_by_kind": _by_kind(degenerate),
              "per_split": per_split}
    if counts["rows_in"] != stored + len(rejects):
        raise RuntimeError(f"rows in {counts['rows_in']} != stored {stored} + rejected {len(rejects)}")
    _write_rejects(out, rejects)

    if strict and rejects:
        first = sorted(rejects, key=lambda r: (r["csv"], r["row"]))[0]
        raise UserError(f"--strict: {len(rejects)} row(s) rejected (see {storage.display(storage.join(out, REJECTS_NAME))}); "
                        f"first: {first['csv']} row {first['row']} ({first['path']}): {first['reason']}")
    if stored == 0:
        raise UserError(f"no image could be stored: all {len(rejects)} rows rejected "
                        f"(see {storage.display(storage.join(out, REJECTS_NAME))})")

    dataset_name, phantom = _dataset_info(image_root, adapter.name)
    manifest = {
        "format_version": FORMAT_VERSION,
        "tool_version": preprocessing.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": dataset_name,
        "layout": adapter.name,
        "sources": dict(labelset.sources),
        "image_root": storage.display(image_root) if storage.is_remote(image_root) else os.path.abspath(image_root),
        "policy": dict(labelset.policy),
        "tasks": tasks,
        "default_tasks": [t for t in adapter.default_tasks(options) if t in tasks] or tasks,
        "dataset_options": options.as_dict(),
        "resolutions": resolutions,
        "encoding": encoding,
        "resize": {"mode": "L", "filter": "lanczos", "square": "squash (whole image, no crop)",
                   "jpeg_draft_factor": draft_factor, "bicubic_reduce_factor": reduce_factor,
                   "pyramid_version": PYRAMID_VERSION if reduce_factor is not None else None},
        "splits": sorted({s.split for s in specs}),
        "shard_size": int(shard_size),
        "shards": shards,
        "counts": counts,
        "study_label_conflicts": list(labelset.conflicts),
        # Stored, but worth a look: tiny sources upscaled, strip-shaped sources squashed.
        "degenerate_images": sorted(degenerate, key=lambda d: d["path"]),
    }
    if phantom is not None:
        manifest["phantom"] = phantom
    storage.write_json(storage.join(out, MANIFEST_NAME), manifest)   # last: marks the store complete
    return manifest


# --- command line -------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--image-root", required=True, help="folder the image paths are relative to")
    parser.add_argument("--csv", "--table", action="append", required=True, metavar="CSV",
                        help="a label table of the dataset (repeat: CheXpert train.csv and valid.csv; NIH "
                             "Data_Entry_2017.csv [train_val_list.txt test_list.txt]; MIMIC's three tables)")
    parser.add_argument("--out", required=True, help="store location: a path or s3://bucket/prefix[?endpoint_override=...]")
    parser.add_argument("--resolutions", default=",".join(map(str, DEFAULT_RESOLUTIONS)),
                        help="square output sizes, comma separated")
    parser.add_argument("--policy", default=None,
                        help="uncertainty policy overrides, e.g. 'Atelectasis=zeros,Edema=ignore' (defaults: the thesis protocol, docs/data.md)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="source images per shard (one Ray task)")
    parser.add_argument("--encoding", default=DEFAULT_ENCODING, choices=ENCODINGS, help="lossless image encoding")
    parser.add_argument("--reduce-factor", type=float, default=DEFAULT_REDUCE_FACTOR,
                        help="shrink (bicubic) to this factor x each resolution before the Lanczos step: "
                             ">= 4x faster, >= 50 dB PSNR of a straight Lanczos (docs/store.md); 0 = bit-exact")
    parser.add_argument("--draft-factor", type=float, default=0,
                        help="decode JPEGs at a reduced DCT scale keeping >= this factor x the largest "
                             "resolution; off by default (0): little faster, and below 50 dB on films with text")
    parser.add_argument("--address", default=None, help="join this Ray cluster ('auto' or host:port) instead of a private local one")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the private local Ray (None: all of this machine)")
    parser.add_argument("--no-ray", action="store_true", help="build the shards in this process, one after another")
    parser.add_argument("--strict", action="store_true", help="fail (exit 2, no manifest) if any row is rejected")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dataset_arguments(parser)


def run(args) -> int:
    resolutions = parse_int_list(args.resolutions, "--resolutions")
    built_now = []
    manifest = build_store(args.image_root, args.csv, args.out, resolutions=resolutions, policy=args.policy,
                           shard_size=args.shard_size, address=args.address, num_cpus=args.num_cpus,
                           strict=args.strict, progress=not args.no_progress, use_ray=not args.no_ray,
                           encoding=args.encoding, draft_factor=args.draft_factor or None,
                           reduce_factor=args.reduce_factor or None,
                           on_shard=built_now.append, dataset=args.dataset, tasks=args.tasks,
                           dataset_options=options_from_args(args))
    counts = manifest["counts"]
    built = len(built_now)
    print(f"store {storage.display(args.out)} ({manifest['dataset']}"
          f"{', SYNTHETIC phantom data' if manifest['dataset'] == 'phantom' else ''}): "
          f"resolutions {','.join(map(str, manifest['resolutions']))}, encoding {manifest['encoding']}")
    print(f"layout {manifest['layout']}; tasks {', '.join(manifest['tasks'])} "
          f"(default {', '.join(manifest['default_tasks'])})")
    print(f"rows in {counts['rows_in']} = stored {counts['stored']} + rejected {counts['rejected']}"
          f" (converted {counts['converted']}); shards built {built}, reused "
          f"{len(manifest['shards']) // len(manifest['resolutions']) - built}")
    for split, c in counts["per_split"].items():
        print(f"  {split}: rows in {c['rows_in']}, stored {c['stored']}, rejected {c['rejected']}, converted {c['converted']}")
    if counts["rejected"]:
        print(f"rejected rows: {storage.display(storage.join(args.out, REJECTS_NAME))}")
    if counts.get("degenerate"):
        print(f"warning: {counts['degenerate']} degenerate image(s) stored (listed in the manifest under "
              f"degenerate_images): " + "; ".join(f"{n} x {k}" for k, n in counts["degenerate_by_kind"].items()))
    if manifest["study_label_conflicts"]:
        print(f"study label conflicts: {len(manifest['study_label_conflicts'])} (listed in the manifest)")
    print(f"manifest hash {manifest_hash(manifest)}")
    return 0
