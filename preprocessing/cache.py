"""A node-local copy of the store: one resolution copied to local disk once, shared by every trial
on the node.

On a cluster the store lives in S3 (or on a shared filesystem). Without a cache every trial would
read its whole resolution from there, every epoch's worth of trials again; with it the first trial
on a node copies the manifest, ``rejects.csv`` and that resolution's shards, checking each shard's
sha256 against the manifest, and later trials on the node open the local copy::

    local = local_store("s3://bucket/store", 320, "/mnt/cxr-cache")   # copies once per node
    store = open_store(local, resolution=320)                          # reads local disk

Layout: ``CACHE_DIR/<manifest hash[:16]>/`` is an ordinary store folder holding the resolutions
copied so far, plus ``.complete-res<R>.json`` per finished resolution. A rebuilt store has a new
manifest hash and so gets a new folder; stale folders are never mixed with new shards.

Concurrency: trials on one node serialise on an ``fcntl`` lock file per store and resolution; the
first copies, the rest wait and then reuse (other resolutions copy meanwhile). Files are copied into a staging folder and renamed into place once
their sha256 matches; the completion marker is written last, so a copy cut short (a killed trial,
a full disk, a preempted node) is never used: the next caller finishes it. The lock is released by
the kernel when its holder dies, so no stale lock survives a crash. The cache folder must be on a
local filesystem (flock over NFS is not reliable), which is what "node-local" means anyway.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager

from common import storage
from preprocessing.manifest import manifest_hash, read_manifest
from common.schema import MANIFEST_NAME, REJECTS_NAME
from preprocessing.store import StoreError

__all__ = ["local_store", "cache_folder", "CacheError"]

_CHUNK = 8 << 20          # 8 MiB per read: few S3 round trips, bounded memory
_MARKER = ".complete-res{resolution}.json"
_STAGING = ".partial-"


class CacheError(StoreError):
    """The node-local cache cannot be filled (remote shard corrupt, disk full, folder unwritable)."""


def cache_folder(cache_dir: str, manifest: dict) -> str:
    """The folder of one store's content below ``cache_dir`` (keyed on its manifest hash)."""
    return os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), manifest_hash(manifest)[:16])


def local_store(store_location: str, resolution: int, cache_dir: str) -> str:
    """A local store folder holding ``resolution`` of the store at ``store_location``.

    Copies the manifest, rejects.csv and the resolution's shards on the first call on this node
    (sha256-checked against the manifest) and returns at once on later calls. The result opens with
    ``open_store(result, resolution=resolution)`` and has the same manifest hash as the original.
    Raises StoreError/CacheError with one line naming the problem.
    """
    resolution = int(resolution)
    if not cache_dir:
        raise CacheError("local_store: no cache_dir given")
    try:
        manifest = read_manifest(store_location)
    except FileNotFoundError:
        raise StoreError(f"no store at {storage.display(store_location)} (no {MANIFEST_NAME})") from None
    except (ValueError, storage.StorageError) as exc:
        raise StoreError(f"store {storage.display(store_location)}: {exc}") from None
    if resolution not in manifest["resolutions"]:
        raise StoreError(f"store {storage.display(store_location)} has no resolution {resolution} "
                         f"(it has {', '.join(map(str, manifest['resolutions']))})")
    shards = sorted((s for s in manifest["shards"] if s["resolution"] == resolution), key=lambda s: s["path"])

    folder = cache_folder(cache_dir, manifest)
    marker = os.path.join(folder, _MARKER.format(resolution=resolution))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot create the store cache folder {folder}: {exc}") from None
    # One lock per resolution: trials of another resolution on this node copy at the same time.
    with _locked(f"{folder}.res{resolution}.lock"):
        if _complete(folder, marker, shards):
            return folder
        _fill(store_location, folder, manifest, shards, resolution)
        _write_file(marker, json.dumps({"store": storage.display(store_location),
                                        "manifest_hash": manifest_hash(manifest),
                                        "resolution": resolution,
                                        "shards": [{k: s[k] for k in ("path", "bytes", "sha256")} for s in shards]},
                                       indent=2, sort_keys=True).encode())
    return folder


@contextmanager
def _locked(path: str):
    """An exclusive flock on ``path`` (created if needed); released on exit or process death."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)   # closing the descriptor releases the lock


def _complete(folder: str, marker: str, shards: list[dict]) -> bool:
    """True when the marker exists and every shard is in place at its manifest size.

    Sizes are a cheap check against deleted or truncated files; the full sha256 was checked when
    the shard was copied, and open_store(verify=True) re-checks it on the local disk.
    """
    if not os.path.exists(marker):
        return False
    if not os.path.exists(os.path.join(folder, MANIFEST_NAME)):
        return False
    for shard in shards:
        path = os.path.join(folder, shard["path"])
        if not os.path.isfile(path) or os.path.getsize(path) != shard["bytes"]:
            os.remove(marker)   # damaged since it was filled: copy again below
            return False
    return True


def _fill(store_location: str, folder: str, manifest: dict, shards: list[dict], resolution: int) -> None:
    """Copy what is missing of one resolution into ``folder``. Runs under that resolution's lock."""
    staging_prefix = f"{_STAGING}res{resolution}-"
    for name in os.listdir(folder):   # leftovers of a copy of this resolution that died
        if name.startswith(staging_prefix):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    todo = [s for s in shards if not _matches(os.path.join(folder, s["path"]), s)]
    need = sum(s["bytes"] for s in todo)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise CacheError(f"store cache {folder}: resolution needs {need / 1e9:.2f} GB more, "
                         f"only {free / 1e9:.2f} GB free on that disk")

    staging = os.path.join(folder, f"{staging_prefix}{uuid.uuid4().hex[:8]}")
    os.makedirs(staging)
    try:
        # The original's bytes, so the local store has the same manifest hash; checked against the
        # manifest the shards are compared with (a store rebuilt in place meanwhile is refused).
        raw = storage.read_bytes(storage.join(store_location, MANIFEST_NAME))
        if manifest_hash(json.loads(raw.decode("utf-8"))) != manifest_hash(manifest):
            raise CacheError(f"store {storage.display(store_location)}: manifest.json changed while "
                             f"caching (a build running on it?); retry when it is finished")
        _write_file(os.path.join(folder, MANIFEST_NAME), raw, only_if_missing=True)
        rejects = storage.join(store_location, REJECTS_NAME)
        if storage.exists(rejects):
            _write_file(os.path.join(folder, REJECTS_NAME), storage.read_bytes(rejects), only_if_missing=True)
        for shard in todo:
            tmp = os.path.join(staging, shard["path"].replace("/", "__"))
            digest, size = _copy(storage.join(store_location, shard["path"]), tmp)
            if size != shard["bytes"] or digest != shard["sha256"]:
                raise CacheError(f"store shard {storage.display(storage.join(store_location, shard['path']))} "
                                 f"does not match its manifest ({size} bytes, sha256 {digest[:12]}...; manifest "
                                 f"says {shard['bytes']} bytes, {shard['sha256'][:12]}...): not cached; run "
                                 f"python -m preprocessing verify {storage.display(store_location)}")
            final = os.path.join(folder, shard["path"])
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(tmp, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _matches(path: str, shard: dict) -> bool:
    """An already present shard (from an interrupted fill) is kept only if its sha256 matches."""
    if not os.path.isfile(path) or os.path.getsize(path) != shard["bytes"]:
        return False
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest() == shard["sha256"]


def _copy(src: str, dst: str) -> tuple[str, int]:
    """Stream one remote file to a local file; returns (sha256 hex, bytes)."""
    fs, path = storage.resolve(src)
    h, size = hashlib.sha256(), 0
    try:
        with fs.open_input_stream(path) as fin, open(dst, "wb") as fout:
            while True:
                chunk = fin.read(_CHUNK)
                if not chunk:
                    break
                h.update(chunk)
                fout.write(chunk)
                size += len(chunk)
            fout.flush()
            os.fsync(fout.fileno())
    except FileNotFoundError:
        raise CacheError(f"store shard {storage.display(src)} is missing") from None
    except OSError as exc:
        if not storage.exists(src):
            raise CacheError(f"store shard {storage.display(src)} is missing") from None
        raise CacheError(f"cannot copy {storage.display(src)} to {dst}: {exc}") from None
    return h.hexdigest(), size


def _write_file(path: str, data: bytes, only_if_missing: bool = False) -> None:
    """Atomic local write (storage.write_bytes: temporary name + rename)."""
    if only_if_missing and os.path.exists(path):
        return
    storage.write_bytes(path, data)
