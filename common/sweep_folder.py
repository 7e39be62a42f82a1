"""The one place that knows a sweep folder's layout and the shape of ``sweep.json``::

  STORAGE/NAME/
    sweep.json                  SweepFile: the grid, store, base config, command line, git commit
    driver.lock                 the running driver (one driver per sweep)
    ledger/<trial_id>.json      state per trial (orchestrator.ledger)
    trials/<trial_id>/          one TrialFolder per trial
    tune/                       Ray Tune's own experiment folder (not trusted for resume)
    results/                    the analysis' tables, figures and report (default output)

The sweep writes ``sweep.json``; the analysis reads it back into the same :class:`SweepFile`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from common import storage
from common.trial_folder import TrialFolder

SWEEP_FILE = "sweep.json"
LEDGER_DIR = "ledger"
TRIALS_DIR = "trials"
TUNE_DIR = "tune"
RESULTS_DIR = "results"
LOCK_FILE = "driver.lock"
FORMAT_VERSION = 2


@dataclass
class SweepFile:
    """What ``sweep.json`` holds. Unknown keys of older or newer writers are kept in ``extra``."""
    name: str = ""
    store_location: str = ""
    store: str = ""                                  # the store location as shown to people
    manifest_hash: str = ""
    grid: dict[str, Any] = field(default_factory=dict)          # axes: resolutions, models, seeds, ...
    base_config: dict[str, Any] = field(default_factory=dict)   # TrainConfig minus the grid axes
    trial_ids: list[str] = field(default_factory=list)          # this run's grid, in order
    trials: dict[str, dict] = field(default_factory=dict)       # trial id -> grid point
    all_trials: dict[str, dict] = field(default_factory=dict)   # every trial any run registered
    command: str = ""                                # the command line as typed
    argv: list[str] = field(default_factory=list)
    git_commit: str = ""                             # the code that ran ('' outside a git checkout)
    versions: dict[str, str] = field(default_factory=dict)      # python, torch, ray, ...
    created: str = ""
    updated: str = ""
    runs: list[dict] = field(default_factory=list)   # one entry per driver run
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        extra = out.pop("extra")
        return {**extra, **out}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SweepFile":
        if not isinstance(data, dict):
            raise ValueError("sweep.json is not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})


@dataclass(frozen=True)
class SweepFolder:
    """The folder ``STORAGE/NAME`` of one sweep."""
    location: str

    def path(self, *parts: str) -> str:
        return storage.join(self.location, *parts)

    @property
    def sweep_file(self) -> str:
        return self.path(SWEEP_FILE)

    @property
    def ledger_dir(self) -> str:
        return self.path(LEDGER_DIR)

    @property
    def trials_dir(self) -> str:
        return self.path(TRIALS_DIR)

    @property
    def tune_dir(self) -> str:
        return self.path(TUNE_DIR)

    @property
    def results_dir(self) -> str:
        return self.path(RESULTS_DIR)

    @property
    def lock_file(self) -> str:
        return self.path(LOCK_FILE)

    def ledger_entry(self, trial_id: str) -> str:
        return self.path(LEDGER_DIR, f"{trial_id}.json")

    def trial(self, trial_id: str) -> TrialFolder:
        return TrialFolder(self.path(TRIALS_DIR, trial_id))

    def trial_ids_on_storage(self) -> list[str]:
        """Trial folders present (temporary files of interrupted writes left out)."""
        return sorted(n for n in storage.listdir(self.trials_dir) if ".tmp-" not in n)

    def ledger_ids_on_storage(self) -> list[str]:
        """Trial ids that have a ledger entry (temporary files of interrupted writes left out)."""
        return sorted(n[:-len(".json")] for n in storage.listdir(self.ledger_dir)
                      if n.endswith(".json") and ".tmp-" not in n)

    def display(self) -> str:
        return storage.display(self.location)

    def read_sweep_file(self) -> SweepFile:
        """FileNotFoundError when absent; ValueError when unreadable."""
        return SweepFile.from_dict(storage.read_json(self.sweep_file))

    def write_sweep_file(self, doc: SweepFile) -> None:
        storage.write_json(self.sweep_file, doc.to_dict())
