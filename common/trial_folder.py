"""The one place that knows a trial folder's layout (local, shared or ``s3://``).

The trainer writes a trial folder, the sweep's ledger reads ``result.json`` to decide what is
finished, and the analysis reads everything back. They all go through :class:`TrialFolder`, so a
file name is spelled once::

  TRIAL/
    config.json                      resolved TrainConfig, store manifest hash, trial id, git commit
    epochs.jsonl                     one flat JSON record per finished epoch
    predictions/epoch-001.parquet    study_id, task, label, probability (validation, every epoch)
    checkpoints/latest.pt            everything needed to continue with the next epoch
    checkpoints/previous.pt          the checkpoint before latest.pt (fallback when latest is damaged)
    checkpoints/best-<task_key>.pt   the weights of the best validation epoch per task so far
    result.json                      written last: its presence means "finished"
    log.txt                          the trial's log
    error.txt                        the traceback of the last failed attempt (sweep trials)

A trial's parameters (resolution, model, seed, ...) come from ``config.json`` only; nothing parses
them back out of the trial id.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from common import storage

CONFIG = "config.json"
EPOCHS = "epochs.jsonl"
RESULT = "result.json"
LOG = "log.txt"
ERROR = "error.txt"
PREDICTIONS_DIR = "predictions"
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest.pt"
PREVIOUS = "previous.pt"


@dataclass(frozen=True)
class TrialFolder:
    """A trial folder at ``location``; every method is a path or one read/write of one file."""
    location: str

    # --- paths ---------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return storage.join(self.location, *parts)

    @property
    def config_path(self) -> str:
        return self.path(CONFIG)

    @property
    def epochs_path(self) -> str:
        return self.path(EPOCHS)

    @property
    def result_path(self) -> str:
        return self.path(RESULT)

    @property
    def log_path(self) -> str:
        return self.path(LOG)

    @property
    def error_path(self) -> str:
        """The traceback of the last failed attempt (written by the sweep's trainable)."""
        return self.path(ERROR)

    @property
    def latest_checkpoint(self) -> str:
        return self.path(CHECKPOINTS_DIR, LATEST)

    @property
    def previous_checkpoint(self) -> str:
        return self.path(CHECKPOINTS_DIR, PREVIOUS)

    def predictions_path(self, epoch: int) -> str:
        return self.path(PREDICTIONS_DIR, f"epoch-{int(epoch):03d}.parquet")

    def best_checkpoint(self, task_key: str) -> str:
        return self.path(CHECKPOINTS_DIR, f"best-{task_key}.pt")

    def display(self) -> str:
        return storage.display(self.location)

    # --- state -----------------------------------------------------------------------------------
    def exists(self) -> bool:
        return storage.exists(self.config_path)

    def is_finished(self) -> bool:
        """``result.json`` is written last, so its presence is the definition of finished."""
        return storage.exists(self.result_path)

    # --- reads (FileNotFoundError when absent; ValueError for unreadable JSON) -------------------
    def read_config(self) -> dict[str, Any]:
        return storage.read_json(self.config_path)

    def read_result(self) -> dict[str, Any]:
        return storage.read_json(self.result_path)

    def read_epochs(self) -> list[dict[str, Any]]:
        """Epoch records in file order; a torn last line (a crash mid-write) is ignored."""
        try:
            text = storage.read_bytes(self.epochs_path).decode("utf-8")
        except FileNotFoundError:
            return []
        records = []
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return records

    def read_epochs_checked(self) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
        """Epoch records and the (1-based line number, reason) of every line that is not one, for
        readers that must list what they skip rather than stop at it."""
        try:
            text = storage.read_bytes(self.epochs_path).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return [], []
        records, bad = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.append((n, f"not JSON ({exc.msg})"))
                continue
            if not isinstance(rec, dict) or "epoch" not in rec:
                bad.append((n, "not an epoch record"))
                continue
            records.append(rec)
        return records, bad

    def read_predictions(self, epoch: int):
        """The validation predictions of one epoch as a pandas DataFrame."""
        import io

        import pyarrow.parquet as pq
        return pq.read_table(io.BytesIO(storage.read_bytes(self.predictions_path(epoch)))).to_pandas()

    # --- writes (atomic: a reader sees the old or the new file) -----------------------------------
    def write_config(self, doc: dict[str, Any]) -> None:
        storage.write_json(self.config_path, doc)

    def write_result(self, doc: dict[str, Any]) -> None:
        storage.write_json(self.result_path, doc)

    def write_epochs(self, records: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        storage.write_bytes(self.epochs_path, text.encode("utf-8"))
