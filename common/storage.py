"""Local paths, shared filesystems and ``s3://`` through one small API on pyarrow's filesystem layer.

Every stage writes through here so that the store, checkpoints and the ledger behave the same on a
laptop and on a cluster. A location is a string: ``/data/store``, ``relative/dir`` or
``s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http`` (the query is kept on every
path joined below it, so test servers and MinIO work unchanged).

Atomicity: local writes go to a temporary name in the same folder and are renamed into place; an
S3 PUT is atomic per object. Readers therefore never see half-written files.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A location cannot be reached, read or written."""


def is_remote(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def _split_query(location: str) -> tuple[str, str]:
    location = str(location)
    if "?" in location and is_remote(location):
        base, query = location.split("?", 1)
        return base, "?" + query
    return location, ""


def join(location: str, *parts: str) -> str:
    """Join path parts below a location, keeping an ``s3://...?query`` intact."""
    base, query = _split_query(location)
    if is_remote(base):
        joined = base.rstrip("/")
        for p in parts:
            joined = joined + "/" + str(p).strip("/")
        return joined + query
    return os.path.join(base, *[str(p) for p in parts])


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it for a location."""
    location = str(location)
    if location.startswith("file://"):
        location = location[len("file://"):]
    if not is_remote(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except Exception as exc:  # pyarrow raises several types for bad URIs
        raise StorageError(f"cannot open storage location {location!r}: {exc}") from exc
    return fs, path


def display(location: str) -> str:
    """A location without its query string, for messages and reports."""
    return _split_query(str(location))[0]


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(location: str) -> None:
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)


def listdir(location: str) -> list[str]:
    """Names (not paths) directly below a location; empty when it does not exist."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)
    try:
        # compression=None: pyarrow would otherwise un-gzip '.gz' files, changing their hash.
        with fs.open_input_stream(path, compression=None) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(display(location)) from exc
        raise StorageError(f"cannot read {display(location)}: {exc}") from exc


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file so that readers see either the old or the new content, never a part."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:   # a full disk must not also leave a partial temporary file
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise
        return
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def remove_temp_files(location: str) -> list[str]:
    """Remove the temporary files that writes killed before their rename (SIGKILL, power loss)
    left in a local folder and below it; the paths removed. Remote writes leave none."""
    fs, path = resolve(location)
    if not isinstance(fs, pafs.LocalFileSystem) or not os.path.isdir(path):
        return []
    removed = []
    for folder, _, names in os.walk(path):
        for name in names:
            if ".tmp-" in name:
                try:
                    os.remove(os.path.join(folder, name))
                    removed.append(os.path.join(folder, name))
                except FileNotFoundError:
                    pass
    return removed


def read_json(location: str) -> Any:
    return json.loads(read_bytes(location).decode("utf-8"))


def write_json(location: str, obj: Any) -> None:
    write_bytes(location, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def delete(location: str) -> None:
    """Delete a file or a folder tree; missing is fine."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def copy_file(src: str, dst: str) -> None:
    write_bytes(dst, read_bytes(src))


def check_writable(location: str) -> None:
    """Fail with a StorageError naming the location unless a file can be written and removed."""
    probe = join(location, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        makedirs(location)
        write_bytes(probe, b"ok")
        delete(probe)
    except Exception as exc:
        raise StorageError(f"storage location {display(location)} is not writable: {exc}") from exc


def open_input(location: str) -> io.IOBase:
    """A seekable readable file (for Parquet footers and torch.load)."""
    fs, path = resolve(location)
    return fs.open_input_file(path)


def scheme(location: str) -> str:
    return urlsplit(str(location)).scheme if is_remote(location) else "file"
