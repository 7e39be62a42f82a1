"""Every setting of one sweep (the grid, where things live, resources, failures, progress,
trackers) in one typed dataclass that checks itself when it is made.

The command line is built from these fields (``common.config_args``), so each flag, its default and
its help are written here only. What each *trial* trains with is a ``trainer.config.TrainConfig``;
the sweep fills in the grid axes (model, resolution, seed, task mode, task) and the store.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from common import storage
from common.cli import UserError
from common.schema import DEFAULT_RESOLUTIONS
from common.sweep_folder import SweepFolder

#: The thesis grid (docs/trainer.md): 'efficientnet' is matched to each resolution (B0 at 160 ...
#: B5 at 480) by TrainConfig.
DEFAULT_MODELS = ("resnet50", "resnet152", "densenet121", "densenet161", "efficientnet")
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
TASK_MODES = ("multi", "single")
TRACKERS = ("tensorboard", "mlflow", "wandb")
PROGRESS_STYLES = ("auto", "table", "lines")
#: The file the command line reads its settings from (the working folder or a parent).
CONFIG_FILE = "cxr-sweep.toml"
#: Environment variables ``CXR_SWEEP_<FLAG_NAME>`` set any flag (between the file and the flags).
ENV_PREFIX = "CXR_SWEEP_"
#: The TrainConfig fields the sweep sets itself from the grid and the store (no training flags).
GRID_FIELDS = ("model", "resolution", "seed", "task_mode", "task", "store", "tasks")


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0-4' -> (0..4); '0,1,2'; '0-2,7'. Only the syntax is checked: TrainConfig checks the range."""
    import argparse
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            if sep and lo.strip():
                a, b = int(lo), int(hi)
                if b < a:
                    raise argparse.ArgumentTypeError(f"range {part!r} is empty")
                seeds.extend(range(a, b + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not an integer or a range like 0-4") from None
    return tuple(dict.fromkeys(seeds))


def absolute(location: str) -> str:
    """A local path made absolute (Ray workers do not share the driver's working folder)."""
    if not location or storage.is_remote(location):
        return location
    if location.startswith("file://"):
        location = location[len("file://"):]
    return os.path.abspath(os.path.expanduser(location))


def check_name(name: str) -> str:
    name = str(name).strip()
    if name in (".", "..") or any(c in name for c in "/\\?#: ") or name.startswith("."):
        raise UserError(f"--name: {name!r} is not a valid sweep name (letters, digits, '-', '_')")
    return name


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class SweepConfig:
    # --- the grid -------------------------------------------------------------------------------
    resolutions: tuple[int, ...] = field(default=DEFAULT_RESOLUTIONS, metadata=_help(
        "square input sizes in px, comma-separated; each must be in the store"))
    models: tuple[str, ...] = field(default=DEFAULT_MODELS, metadata=_help(
        "trainer.models names, comma-separated; 'efficientnet' = the variant matched to each "
        "resolution; timm:<name> for a timm model"))
    seeds: tuple[int, ...] = field(default=DEFAULT_SEEDS, metadata=_help(
        "seeds: 0-4, 0,1,2 or 0-2,7", parse=parse_seeds, metavar="SEEDS", default_help="0-4"))
    task_mode: str = field(default="multi", metadata=_help(
        "multi: one model per grid point for all tasks; single: one model per task (x tasks)",
        choices=TASK_MODES))
    tasks: tuple[str, ...] = field(default=(), metadata=_help(
        "tasks, comma-separated", default_help="every task of the store"))

    # --- where ----------------------------------------------------------------------------------
    store: str = field(default="", metadata=_help(
        "store location (path or s3://...) built by python -m preprocessing build",
        required="to run; a dry run without it plans for CheXpert's size"))
    storage: str = field(default="", metadata=_help(
        "where sweeps live (path or s3://...); this sweep is STORAGE/NAME", required="to run"))
    name: str = field(default="", metadata=_help(
        "sweep name (a folder below --storage)", required="to run"))
    address: str = field(default="", metadata=_help(
        "Ray cluster to join (HOST:PORT, or auto on a head node)",
        default_help="RAY_ADDRESS, else a private local Ray started for this run"))
    results_dir: str = field(default="", metadata=_help(
        "folder of the aggregated report", default_help="STORAGE/NAME/results"))

    # --- resources and failures -------------------------------------------------------------------
    cpus_per_trial: float = field(default=1.0, metadata=_help("CPUs reserved per trial"))
    gpus_per_trial: str = field(default="", metadata=_help(
        "GPUs per trial: auto packs 2-4 small trials on one GPU where memory and the GPU's busy "
        "share allow (no memory isolation) and gives the rest one GPU each; 1 = one GPU each; "
        "0 = CPUs only. On a Ray without GPUs trials run on CPUs, except with --address and "
        "this flag given: then they wait for the autoscaler's GPU workers",
        metavar="N|auto", default_help="auto"))
    gpu_memory_gb: float | None = field(default=None, metadata=_help(
        "GPU memory for auto packing",
        default_help="the Ray cluster's GPU type, else this machine's GPU, else 80"))
    gpu_measurements: tuple[str, ...] = field(default=(), metadata=_help(
        "bench/gpu_check.py JSON files whose measured rates, memory and busy share replace the "
        "estimates (later files win); 'none' for estimates only",
        metavar="FILES", default_help="every committed bench/results/*.json"))
    max_failures: int = field(default=2, metadata=_help(
        "in-run retries of a crashed trial (each continues from its checkpoint)"))
    max_concurrent: int = field(default=0, metadata=_help(
        "cap on trials running at once (0 = as many as the resources allow)"))
    take_over: bool = field(default=False, metadata=_help(
        "run although the sweep's lock names another driver (only when that driver is gone: "
        "a crashed driver's lock lapses by itself within a minute)"))
    reuse_actors: bool = field(default=True, metadata=_help(
        "a finished trial's worker process (and its GPU) runs the next trial; saves seconds per "
        "trial"))
    num_cpus: int | None = field(default=None, metadata=_help(
        "CPUs of the embedded local Ray", default_help="all"))
    num_gpus: int | None = field(default=None, metadata=_help(
        "GPUs of the embedded local Ray", default_help="all"))

    # --- mode, progress and trackers ---------------------------------------------------------------
    dry_run: bool = field(default=False, metadata=_help(
        "print the grid, the packing, finished trials and a GPU-hour estimate; start nothing"))
    verify_store: bool = field(default=True, metadata=_help(
        "check the store's shard checksums at the sweep's resolutions before starting"))
    aggregate: bool = field(default=True, metadata=_help(
        "build the report (analysis.aggregate) when every trial finished"))
    progress: str = field(default="auto", metadata=_help(
        "table: a table redrawn in place; lines: one line per event (for logs); auto: table on "
        "a terminal, else lines", choices=PROGRESS_STYLES))
    progress_interval: float = field(default=30.0, metadata=_help(
        "seconds between progress summaries in lines mode (events print as they happen)"))
    log: tuple[str, ...] = field(default=("tensorboard",), metadata=_help(
        "trackers fed every epoch's metrics, comma-separated: tensorboard, mlflow, wandb; "
        "'none' for none"))
    mlflow_tracking_uri: str = field(default="", metadata=_help(
        "MLflow tracking URI for --log mlflow",
        default_help="MLFLOW_TRACKING_URI, else SQLite in STORAGE/NAME/mlflow.db (local "
                     "storage) or ./mlflow.db"))
    wandb_project: str = field(default="cxr-sweep", metadata=_help(
        "W&B project for --log wandb (WANDB_MODE=offline works without an account)"))

    def __post_init__(self) -> None:
        for name in ("resolutions", "models", "seeds", "tasks", "gpu_measurements", "log"):
            setattr(self, name, tuple(getattr(self, name)))
        self.models = tuple(m.strip() for m in self.models if str(m).strip())
        self.tasks = tuple(t.strip() for t in self.tasks if str(t).strip())
        self.name = check_name(self.name) if self.name else ""
        self.store = absolute(self.store)
        self.storage = absolute(self.storage)
        self.results_dir = absolute(self.results_dir)
        if self.task_mode not in TASK_MODES:
            raise UserError(f"--task-mode: {self.task_mode!r} is not one of {', '.join(TASK_MODES)}")
        for r in self.resolutions:
            if isinstance(r, bool) or not isinstance(r, int):
                raise UserError(f"--resolutions: {r!r} is not an integer")
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, int):
                raise UserError(f"--seeds: {s!r} is not an integer")
        if not self.cpus_per_trial > 0:
            raise UserError(f"--cpus-per-trial: {self.cpus_per_trial:g} is not positive")
        self.gpus_per_trial = str(self.gpus_per_trial).strip().lower()
        self.gpu_share()   # validates
        if self.gpu_memory_gb is not None and not self.gpu_memory_gb > 0:
            raise UserError(f"--gpu-memory-gb: {self.gpu_memory_gb:g} is not positive")
        for name in ("max_failures", "max_concurrent"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')}: {getattr(self, name)} is negative")
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UserError(f"--{name.replace('_', '-')}: {value} is negative")
        if not self.progress_interval > 0:
            raise UserError(f"--progress-interval: {self.progress_interval:g} is not positive")
        if self.progress not in PROGRESS_STYLES:
            raise UserError(f"--progress: {self.progress!r} is not one of {', '.join(PROGRESS_STYLES)}")
        self.log = tuple(t.strip().lower() for t in self.log if t.strip() and t.strip() != "none")
        for t in self.log:
            if t not in TRACKERS:
                raise UserError(f"--log: {t!r} is not one of {', '.join(TRACKERS)} (or none)")

    # --- derived values -------------------------------------------------------------------------
    def gpu_share(self) -> float | str:
        """'auto' or the GPU share every trial asks for."""
        text = self.gpus_per_trial or "auto"
        if text == "auto":
            return "auto"
        try:
            gpus = float(text)
        except ValueError:
            raise UserError(f"--gpus-per-trial: {text!r} is not a number or 'auto'") from None
        if gpus < 0 or (gpus > 1 and gpus != int(gpus)):
            raise UserError(f"--gpus-per-trial: {gpus:g} must be 0, a fraction below 1 "
                            f"(e.g. 0.5), a whole number or 'auto'")
        return gpus

    @property
    def gpus_explicit(self) -> bool:
        """Whether the user asked for GPUs (keeps GPU requests on a cluster without GPUs yet)."""
        return bool(self.gpus_per_trial)

    @property
    def folder(self) -> SweepFolder:
        return SweepFolder(storage.join(self.storage, self.name))

    @property
    def results_location(self) -> str:
        return self.results_dir or self.folder.results_dir

    def measurement_files(self) -> list[str]:
        """The gpu_check JSONs to read: the ones given, else every committed one."""
        if tuple(m.lower() for m in self.gpu_measurements) == ("none",):
            return []
        if self.gpu_measurements:
            return list(self.gpu_measurements)
        from orchestrator.estimate import committed_measurements
        return committed_measurements()

    def require_run_settings(self) -> None:
        """A real run needs a store, a storage location and a name: one line saying how to set each."""
        if not self.store:
            raise UserError("no store: build one with python -m preprocessing build ... --out STORE "
                            "and pass --store STORE (or set store in cxr-sweep.toml, or "
                            "CXR_SWEEP_STORE); --dry-run plans without one")
        for key in ("storage", "name"):
            if not getattr(self, key):
                raise UserError(f"--{key} is required to run (or set {key} in {CONFIG_FILE}, or "
                                f"{ENV_PREFIX}{key.upper()}; python -m orchestrator.sweep init "
                                f"writes a starter {CONFIG_FILE})")

    def replace(self, **changes) -> "SweepConfig":
        return dataclasses.replace(self, **changes)
