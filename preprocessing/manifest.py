"""The store's manifest: what it holds, where it came from, and how to check that it is intact.

``manifest.json`` is written LAST by ``build``: a store without one is incomplete. ``manifest_hash``
identifies the store's content (trials key on it); ``verify_store`` re-reads shards and compares
them with the manifest.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from common import storage
from common.schema import MANIFEST_NAME, REJECTS_NAME

FORMAT_VERSION = 1
#: Keys every manifest has (docs/architecture.md).
REQUIRED_KEYS = ("format_version", "tool_version", "created", "dataset", "sources", "image_root",
                 "policy", "tasks", "resolutions", "encoding", "splits", "shards", "counts",
                 "study_label_conflicts")


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      default=str).encode("utf-8")


def manifest_hash(manifest: dict) -> str:
    """sha256 of the canonical JSON of the manifest without ``created`` (same content, same hash)."""
    return hashlib.sha256(canonical_json({k: v for k, v in manifest.items() if k != "created"})).hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(location: str) -> dict:
    """The manifest of a store; FileNotFoundError when there is none, ValueError when unreadable."""
    data = storage.read_bytes(storage.join(location, MANIFEST_NAME))
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{MANIFEST_NAME} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{MANIFEST_NAME} is not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{MANIFEST_NAME} lacks keys: {', '.join(missing)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{MANIFEST_NAME} has format_version {manifest['format_version']!r}; "
                         f"this tool reads {FORMAT_VERSION}")
    return manifest


def check_shard(location: str, shard: dict) -> str | None:
    """None when the shard file matches its manifest entry, else a one-line problem naming it."""
    name = shard["path"]
    try:
        data = storage.read_bytes(storage.join(location, name))
    except FileNotFoundError:
        return f"{name}: missing"
    except storage.StorageError as exc:
        return f"{name}: unreadable ({exc})"
    if len(data) != shard["bytes"]:
        return f"{name}: {len(data)} bytes, manifest says {shard['bytes']}"
    digest = sha256_bytes(data)
    if digest != shard["sha256"]:
        return f"{name}: sha256 {digest[:12]}... differs from the manifest's {shard['sha256'][:12]}..."
    try:
        rows = pq.read_metadata(pa.BufferReader(data)).num_rows
    except Exception as exc:  # a matching checksum makes this unlikely, but say so if it happens
        return f"{name}: not a readable Parquet file ({exc})"
    if rows != shard["rows"]:
        return f"{name}: {rows} rows, manifest says {shard['rows']}"
    return None


def verify_store(location: str, resolution: int | None = None) -> list[str]:
    """Every problem found in a store, one line each; empty when it is intact.

    Checks the manifest, then every shard listed (existence, size, sha256, row count) and that the
    shards of each resolution and split add up to the stored counts. ``resolution`` limits the
    shard checks to one resolution (what a trial reads), which keeps the check cheap.
    """
    try:
        manifest = read_manifest(location)
    except FileNotFoundError:
        return [f"{storage.display(location)}: no {MANIFEST_NAME} (not a store, or its build did not finish)"]
    except (ValueError, storage.StorageError) as exc:
        return [f"{storage.display(location)}: {exc}"]
    problems = []
    resolutions = manifest["resolutions"] if resolution is None else [int(resolution)]
    if resolution is not None and int(resolution) not in manifest["resolutions"]:
        return [f"resolution {resolution} is not in the store (it has {manifest['resolutions']})"]
    per_split = manifest["counts"].get("per_split", {})
    for res in resolutions:
        for split in manifest["splits"]:
            shards = [s for s in manifest["shards"] if s["resolution"] == res and s["split"] == split]
            for shard in shards:
                problem = check_shard(location, shard)
                if problem:
                    problems.append(problem)
            stored = per_split.get(split, {}).get("stored")
            if stored is not None and sum(s["rows"] for s in shards) != stored:
                problems.append(f"res{res}/{split}: shards hold {sum(s['rows'] for s in shards)} rows, "
                                f"manifest counts {stored} stored")
    counts = manifest["counts"]
    if counts["rows_in"] != counts["stored"] + counts["rejected"]:
        problems.append(f"counts: rows_in {counts['rows_in']} != stored {counts['stored']} + "
                        f"rejected {counts['rejected']}")
    try:
        text = storage.read_bytes(storage.join(location, REJECTS_NAME)).decode("utf-8")
        n_rejects = sum(1 for _ in csv.DictReader(io.StringIO(text)))
        if n_rejects != counts["rejected"]:
            problems.append(f"{REJECTS_NAME}: {n_rejects} rows, manifest counts {counts['rejected']} rejected")
    except FileNotFoundError:
        problems.append(f"{REJECTS_NAME}: missing")
    return problems
