"""Reading the store: what the trainer uses (docs/architecture.md, docs/store.md).

    store = open_store("demo/store", resolution=320)      # verifies the res320 shards first
    table = store.read(320, "train", columns=["study_id", "image", "label_edema"])
    pixels = decode_image(table["image"][0].as_py(), store.encoding)   # (320, 320) uint8
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from common import storage
from common.cli import UserError
from common.schema import TASKS
from preprocessing.encoding import decode_image  # noqa: F401  (part of this module's API)
from preprocessing.manifest import manifest_hash, read_manifest, verify_store

__all__ = ["Store", "StoreError", "open_store", "decode_image"]


class StoreError(UserError):
    """The store is missing, incomplete or corrupt, or lacks what was asked for (one clear line)."""


@dataclass
class Store:
    location: str
    manifest: dict

    @property
    def manifest_hash(self) -> str:
        return manifest_hash(self.manifest)

    @property
    def resolutions(self) -> list[int]:
        return list(self.manifest["resolutions"])

    @property
    def tasks(self) -> list[str]:
        """Every label the store holds (``raw_<key>`` / ``label_<key>`` columns), by the dataset's names."""
        return list(self.manifest["tasks"])

    @property
    def default_tasks(self) -> list[str]:
        """What a trial trains on unless told: the dataset's default tasks among those stored.

        Stores built before adapters existed are CheXpert's: the five protocol tasks."""
        if "default_tasks" in self.manifest:
            return list(self.manifest["default_tasks"])
        return [t for t in TASKS if t in self.tasks] or self.tasks

    @property
    def layout(self) -> str:
        """The label-table layout it was built from (preprocessing.datasets); 'chexpert' for old stores."""
        return self.manifest.get("layout", "chexpert")

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def encoding(self) -> str:
        return self.manifest["encoding"]

    @property
    def is_phantom(self) -> bool:
        return self.manifest["dataset"] == "phantom"

    def shards(self, resolution: int, split: str) -> list[dict]:
        """Manifest entries of one Parquet dataset, in row order; StoreError when absent."""
        if int(resolution) not in self.manifest["resolutions"]:
            raise StoreError(f"store {storage.display(self.location)} has no resolution {resolution} "
                             f"(it has {', '.join(map(str, self.resolutions))})")
        if split not in self.manifest["splits"]:
            raise StoreError(f"store {storage.display(self.location)} has no split {split!r} "
                             f"(it has {', '.join(self.splits)})")
        return sorted((s for s in self.manifest["shards"]
                       if s["resolution"] == int(resolution) and s["split"] == split),
                      key=lambda s: s["path"])

    def read(self, resolution: int, split: str, columns: list[str] | None = None) -> pa.Table:
        """One resolution and split as a table (all shards, in store order)."""
        tables = []
        for shard in self.shards(resolution, split):
            loc = storage.join(self.location, shard["path"])
            try:
                with storage.open_input(loc) as f:
                    tables.append(pq.read_table(f, columns=columns))
            except FileNotFoundError:
                raise StoreError(f"store shard {storage.display(loc)} is missing "
                                 f"(run: python -m preprocessing verify {storage.display(self.location)})") from None
            except (OSError, pa.ArrowException) as exc:
                raise StoreError(f"cannot read store shard {storage.display(loc)}: {exc}") from None
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    def decode(self, blob: bytes):
        """One ``image`` cell -> (R, R) uint8 array."""
        return decode_image(blob, self.encoding)


def open_store(location: str, verify: bool = True, resolution: int | None = None) -> Store:
    """Open a finished store; with ``verify`` check its shards against the manifest first.

    ``resolution`` limits the check to that resolution's shards (what one trial reads), so it is
    cheap enough for every trial start. Raises StoreError with one line naming the problem.
    """
    try:
        manifest = read_manifest(location)
    except FileNotFoundError:
        raise StoreError(f"no store at {storage.display(location)} (no manifest.json; build it with "
                         f"python -m preprocessing build, or let an interrupted build finish)") from None
    except (ValueError, storage.StorageError) as exc:
        raise StoreError(f"store {storage.display(location)}: {exc}") from None
    if resolution is not None and int(resolution) not in manifest["resolutions"]:
        raise StoreError(f"store {storage.display(location)} has no resolution {resolution} "
                         f"(it has {', '.join(map(str, manifest['resolutions']))})")
    if verify:
        problems = verify_store(location, resolution=resolution)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise StoreError(f"store {storage.display(location)} does not verify: {problems[0]}{more}")
    return Store(location=location, manifest=manifest)
