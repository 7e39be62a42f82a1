"""One shard of the store: its plan (``ShardSpec``), how it is built (inside a Ray task or in process)
and how a restart knows it is done (docs/store.md, restart semantics)."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from common import storage
from common.schema import TASKS, label_column, raw_column, shard_dir
from preprocessing.encoding import PARQUET_COMPRESSION, encode_image
from preprocessing.manifest import sha256_bytes
from preprocessing.resize import ImageRejected, resize_image

BUILD_DIR = "_build"          # per-shard done-records (restart bookkeeping)

STRING_COLUMNS = ("image_id", "study_id", "patient_id", "split", "view", "ap_pa")


def row_schema(tasks: Iterable[str] = TASKS) -> pa.Schema:
    """The store's row schema (docs/architecture.md)."""
    fields = [pa.field(c, pa.string()) for c in STRING_COLUMNS]
    for t in tasks:
        fields.append(pa.field(raw_column(t), pa.float32()))
    for t in tasks:
        fields.append(pa.field(label_column(t), pa.float32()))
    fields += [pa.field("image", pa.binary()), pa.field("height", pa.int32()),
               pa.field("width", pa.int32())]
    return pa.schema(fields)


def write_parquet(table: pa.Table, sink, encoding: str) -> None:
    """How every shard is written: no min/max statistics on ``image`` (they would copy whole blobs
    into the footer) and no dictionary for it (every image is distinct: hashing them is wasted
    work), small row groups so a reader can stream a shard."""
    others = [n for n in table.schema.names if n != "image"]
    pq.write_table(table, sink, compression=PARQUET_COMPRESSION[encoding], row_group_size=64,
                   write_statistics=others, use_dictionary=others)


# --- one shard: runs inside a Ray task (or in-process) ---------------------------------------

@dataclass
class ShardSpec:
    out: str
    split: str
    index: int
    key: str                      # sha256 of everything that determines the shard's content
    rows: list[dict]              # metadata of each row (no pixels), in store order
    image_root: str
    resolutions: list[int]
    encoding: str
    draft_factor: float | None
    reduce_factor: float | None
    tasks: list[str]

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"

    def file_path(self, resolution: int) -> str:
        return f"{shard_dir(resolution, self.split)}/{self.name}.parquet"

    @property
    def record_path(self) -> str:
        return f"{BUILD_DIR}/{self.split}/{self.name}.json"


def image_location(image_root: str, image_id: str) -> str:
    if storage.is_remote(image_root):
        return storage.join(image_root, image_id)
    return os.path.join(image_root, image_id)


def build_shard(spec: ShardSpec) -> dict:
    """Decode, resize, encode and write one shard; returns its done-record (small metadata only)."""
    columns: dict[int, dict[str, list]] = {r: {"image": [], "keep": []} for r in spec.resolutions}
    rejects, conversions, degenerate, kept = [], [], [], []
    for i, row in enumerate(spec.rows):
        try:
            try:
                data = storage.read_bytes(image_location(spec.image_root, row.get("image_path", row["image_id"])))
            except (FileNotFoundError, IsADirectoryError):
                raise ImageRejected("missing image file") from None
            except (storage.StorageError, OSError) as exc:
                raise ImageRejected(f"unreadable image file: {exc}") from None
            result = resize_image(data, spec.resolutions, spec.draft_factor, spec.reduce_factor)
        except ImageRejected as exc:
            rejects.append({"csv": row["source_csv"], "row": row["source_row"],
                            "path": row["image_id"], "reason": str(exc)})
            continue
        if result.conversion:
            conversions.append({"path": row["image_id"], "conversion": result.conversion})
        if result.degenerate:
            degenerate.append({"path": row["image_id"], "reason": result.degenerate,
                               "source_size": list(result.source_size)})
        kept.append(i)
        for r in spec.resolutions:
            columns[r]["image"].append(encode_image(result.images[r], spec.encoding))
    schema = row_schema(spec.tasks)
    base = {c: [spec.rows[i][c] for i in kept] for c in schema.names if c not in ("image", "height", "width")}
    files = []
    for r in spec.resolutions:
        table = pa.table({**base, "image": columns[r]["image"], "height": [r] * len(kept),
                          "width": [r] * len(kept)}, schema=schema)
        buf = io.BytesIO()
        write_parquet(table, buf, spec.encoding)
        data = buf.getvalue()
        storage.write_bytes(storage.join(spec.out, spec.file_path(r)), data)
        files.append({"path": spec.file_path(r), "resolution": r, "split": spec.split,
                      "rows": len(kept), "bytes": len(data), "sha256": sha256_bytes(data)})
    record = {"key": spec.key, "split": spec.split, "index": spec.index, "rows": len(spec.rows),
              "stored": len(kept), "files": files, "rejects": rejects, "conversions": conversions,
              "degenerate": degenerate}
    # The done-record goes last: files without a matching record are rebuilt on the next run.
    storage.write_json(storage.join(spec.out, spec.record_path), record)
    return record


def shard_is_done(spec: ShardSpec) -> dict | None:
    """The shard's done-record when it and every file it lists are in place and intact, else None.

    Each file's sha256 is recomputed: a file of the right size with a damaged byte (a bad disk, a
    partial overwrite) would otherwise be reused and leave a store that never verifies.
    """
    try:
        record = storage.read_json(storage.join(spec.out, spec.record_path))
    except (FileNotFoundError, ValueError, storage.StorageError):
        return None
    if record.get("key") != spec.key:
        return None
    if sorted(f["resolution"] for f in record.get("files", [])) != sorted(spec.resolutions):
        return None
    for f in record["files"]:
        try:
            data = storage.read_bytes(storage.join(spec.out, f["path"]))
        except (FileNotFoundError, IsADirectoryError, storage.StorageError, OSError):
            return None
        if len(data) != f["bytes"] or sha256_bytes(data) != f["sha256"]:
            return None
    return record
