"""``python -m orchestrator.sweep``: Ray Tune runs every (resolution, model, seed[, task]) trial,
one GPU each (small ones packed 2-4 per GPU), resumable from the trial ledger on storage.

Flow: validate everything (grid, store, storage, cluster) -> write ``STORAGE/SWEEP/sweep.json`` ->
register new trials in the ledger -> run what is not finished on Ray Tune (embedded local Ray by
default, or ``--address``) -> print the results table (and run the aggregator when present).
See docs/sweep.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import math
import os
import shlex
import sys
import typing
import uuid
from dataclasses import dataclass, field
from typing import IO, Any, Sequence

from common import storage
from common.cli import HelpFormatter, UserError, parse_int_list, run_cli
from common.schema import DEFAULT_RESOLUTIONS, TASKS
from orchestrator import grid as grid_mod
from orchestrator import ledger, packing
from orchestrator.grid import DEFAULT_MODELS, DEFAULT_SEEDS, TrialParams
from orchestrator.local_ray import check_reachable, cluster_address
from trainer.config import TrainConfig

SWEEP_FILE = "sweep.json"
TUNE_DIR = "tune"

EPILOG = """examples:
  # the thesis grid (5 resolutions x 5 models x 5 seeds = 125 trials), local GPUs
  python -m orchestrator.sweep --resolutions 160,240,320,400,480 --store s3://bucket/store \\
      --storage s3://bucket/sweeps --name thesis

  # what would run, and an estimate of GPU hours; starts nothing
  python -m orchestrator.sweep --resolutions 160,240,320,400,480 --store s3://bucket/store \\
      --storage s3://bucket/sweeps --name thesis --dry-run

  # on a cluster started by `ray up cluster.yaml` (from the head node); with --gpus-per-trial
  # given, trials wait for the autoscaler to add GPU workers instead of running on the CPU head
  python -m orchestrator.sweep --address auto --store s3://bucket/store --storage s3://bucket/sweeps \\
      --name thesis --gpus-per-trial auto --gpu-memory-gb 24

  # the packing plan (GPU share per model and resolution) from measured figures; starts nothing
  python -m orchestrator.sweep ... --dry-run --gpu-measurements bench/results/gpu_check.json

  # a small CPU demo on the phantom store: 2 models, 1 seed, short epochs
  python -m orchestrator.sweep --resolutions 160,240 --models resnet18,densenet121 --seeds 0 \\
      --store demo/store --storage demo/sweeps --name demo --weights none --epochs-frozen 1 \\
      --epochs 1 --max-train-studies 40 --cpus-per-trial 1

  # re-run the same command (or add --resume) after a crash: only unfinished trials run,
  # continuing from their newest checkpoint; finished trials are never run again
"""

#: TrainConfig fields the sweep sets itself (grid axes and dedicated flags).
_GRID_FIELDS = {"model", "resolution", "seed", "task_mode", "task", "store"}
_DEDICATED = {"tasks", "weights", "weights_dir", "epochs_frozen", "epochs_unfrozen",
              "max_train_studies", "max_valid_studies", "workers"}


@dataclass
class SweepResult:
    """What ``run_sweep`` did (tests and the CLI read this)."""
    sweep_loc: str
    trial_ids: list[str]
    ran: list[str] = field(default_factory=list)
    skipped_finished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    dry_run: bool = False
    exit_code: int = 0
    run_id: str = ""


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


# --- validation (everything that can fail does so before any trial starts) ----------------------
def absolute(location: str | None) -> str | None:
    """A local path made absolute (workers do not share the driver's cwd); URIs unchanged."""
    if not location or storage.is_remote(location):
        return location
    if str(location).startswith("file://"):
        location = str(location)[len("file://"):]
    return os.path.abspath(os.path.expanduser(str(location)))


def check_name(name: str) -> str:
    name = str(name).strip()
    if not name or name in (".", "..") or any(c in name for c in "/\\?#:") or name.startswith("."):
        raise UserError(f"--name: {name!r} is not a valid sweep name (letters, digits, '-', '_')")
    return name


def open_and_check_store(store_loc: str, resolutions: Sequence[int], verify: bool,
                         needed_tasks: Sequence[str]):
    """The store, checked for every requested resolution (and verified unless told not to)."""
    from preprocessing.manifest import verify_store
    from preprocessing.store import StoreError, open_store
    if not store_loc:
        raise UserError("--store: no store location given")
    store = open_store(store_loc, verify=False)
    missing = [r for r in resolutions if int(r) not in store.resolutions]
    if missing:
        raise StoreError(f"store {storage.display(store_loc)} lacks resolution(s) "
                         f"{', '.join(map(str, missing))} (it has {', '.join(map(str, store.resolutions))});"
                         f" build them with python -m preprocessing build --resolutions ...")
    absent = [t for t in needed_tasks if t not in store.tasks]
    if absent:
        raise StoreError(f"store {storage.display(store_loc)} has no labels for {', '.join(absent)}")
    if verify:
        for r in resolutions:
            problems = verify_store(store_loc, resolution=int(r))
            if problems:
                more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
                raise StoreError(f"store {storage.display(store_loc)} does not verify at {r} px: "
                                 f"{problems[0]}{more}")
    return store


def check_storage(sweep_loc: str) -> None:
    try:
        storage.check_writable(sweep_loc)
    except storage.StorageError as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    except Exception as exc:  # bad URIs raise several pyarrow types
        raise UserError(f"storage location {storage.display(sweep_loc)} is not usable: "
                        f"{str(exc).splitlines()[0]}") from None


# --- the grid and its trial ids ------------------------------------------------------------------
@dataclass
class Trial:
    trial_id: str
    params: TrialParams
    config: TrainConfig


def plan_trials(points: list[TrialParams], base: TrainConfig, manifest_hash: str) -> list[Trial]:
    out = []
    for p in points:
        cfg = grid_mod.trial_config(p, base)
        out.append(Trial(trial_id=cfg.trial_id(manifest_hash), params=p, config=cfg))
    return out


def write_sweep_file(sweep_loc: str, *, name: str, store_loc: str, manifest_hash: str,
                     trials: list[Trial], base: TrainConfig, axes: dict, command: str,
                     run_id: str) -> dict:
    """sweep.json: the current grid plus every trial any invocation of this sweep registered."""
    loc = storage.join(sweep_loc, SWEEP_FILE)
    try:
        old = storage.read_json(loc)
    except FileNotFoundError:
        old = {}
    all_trials = dict(old.get("all_trials", {}))
    for t in trials:
        all_trials[t.trial_id] = t.params.as_dict()
    doc = {
        "format_version": 1, "name": name, "store": storage.display(store_loc),
        "store_location": store_loc, "manifest_hash": manifest_hash,
        "grid": axes, "base_config": {k: v for k, v in base.to_dict().items() if k not in _GRID_FIELDS},
        "trial_ids": [t.trial_id for t in trials],
        "trials": {t.trial_id: t.params.as_dict() for t in trials},
        "all_trials": all_trials,
        "command": command, "created": old.get("created", now_iso()), "updated": now_iso(),
        "runs": (old.get("runs", []) + [{"run_id": run_id, "started": now_iso(), "command": command,
                                          "trials": len(trials)}])[-100:],
    }
    storage.write_json(loc, doc)
    return doc


# --- output ---------------------------------------------------------------------------------------
def results_table(entries: dict[str, dict], trial_ids: list[str]) -> str:
    """Mean best AUROC (mean over tasks, then over seeds) per model (rows) and resolution (columns)."""
    cells: dict[tuple[str, int], list[float]] = {}
    states: dict[str, int] = {}
    for tid in trial_ids:
        e = entries.get(tid) or {}
        states[e.get("state", "pending")] = states.get(e.get("state", "pending"), 0) + 1
        p = e.get("params") or {}
        r = (e.get("result") or {}).get("best_auroc_mean")
        if e.get("state") == "finished" and isinstance(r, (int, float)) and not math.isnan(r):
            cells.setdefault((p.get("model", "?"), int(p.get("resolution", 0))), []).append(r)
    if not cells:
        return "no finished trials yet"
    models = sorted({m for m, _ in cells}, key=lambda m: (m.startswith("efficientnet"), m))
    resolutions = sorted({r for _, r in cells})
    eff = [m for m in models if m.startswith("efficientnet")]
    rows = [m for m in models if not m.startswith("efficientnet")] + (["efficientnet"] if eff else [])

    def cell(model: str, res: int) -> str:
        vals = (cells.get((model, res)) if model != "efficientnet"
                else [v for m in eff for v in cells.get((m, res), [])])
        if not vals:
            return "-"
        return f"{sum(vals) / len(vals):.4f} (n={len(vals)})"

    width = max(len(r) for r in rows) + 2
    lines = ["mean best validation AUROC (mean over tasks and seeds)",
             "model".ljust(width) + "".join(f"{str(r) + ' px':>16}" for r in resolutions)]
    for m in rows:
        lines.append(m.ljust(width) + "".join(f"{cell(m, r):>16}" for r in resolutions))
    return "\n".join(lines)


def run_aggregator(sweep_loc: str, out_dir: str, out: IO[str], fallback_table: str) -> None:
    """Build the report with analysis.aggregate and print its table (ours if it is absent)."""
    try:
        from analysis import aggregate as agg
        fn = agg.aggregate
    except (ImportError, AttributeError):
        print(fallback_table, file=out)
        print("aggregator (analysis.aggregate) is not available: no report written", file=out)
        return
    try:
        summary = fn(sweep_loc, out_dir)
    except UserError as exc:
        print(fallback_table, file=out)
        print(f"aggregation failed: {exc}", file=out)
        return
    table = getattr(summary, "table", None) or (summary if isinstance(summary, str) else "")
    if table:
        print(table, file=out)
    print(f"report: {getattr(summary, 'out_dir', None) or out_dir}", file=out, flush=True)


def dry_run_report(trials: list[Trial], plan: ledger.Plan, store, base: TrainConfig,
                   gpus_per_trial: float | dict[str, float],
                   measured: dict[tuple[str, int], tuple[float, str]] | None = None) -> str:
    """``gpus_per_trial``: one GPU share for all trials, or trial id -> share (``auto``).
    ``measured``: packing.measured_rates of --gpu-measurements, used instead of the table."""
    from orchestrator import estimate as est
    counts = store.manifest.get("counts", {}).get("per_split", {})
    train_images = int(counts.get("train", {}).get("stored", 0))
    valid_images = int(counts.get("valid", {}).get("stored", 0))
    train_n, valid_n = est.epoch_images(train_images, valid_images, base.max_train_studies,
                                        base.max_valid_studies)
    to_run = set(plan.to_run)
    share = (gpus_per_trial if isinstance(gpus_per_trial, dict)
             else {t.trial_id: float(gpus_per_trial) for t in trials})
    left = [t for t in trials if t.trial_id in to_run]
    rates = {k: v[0] for k, v in (measured or {}).items()}
    e_all = est.estimate([(t.params.model, t.params.resolution) for t in trials], base.total_epochs,
                         train_n, valid_n, [share[t.trial_id] for t in trials], rates)
    e_left = est.estimate([(t.params.model, t.params.resolution) for t in left], base.total_epochs,
                          train_n, valid_n, [share[t.trial_id] for t in left], rates)
    lines = [f"{len(trials)} trials: {len(plan.finished)} finished, {len(plan.to_run)} to run "
             f"({len(plan.resumed)} of them resume from storage)",
             f"per trial: {base.total_epochs} epochs x {train_n:,} train + {valid_n:,} valid images"
             f" (store: {train_images:,} / {valid_images:,})", "",
             "group                         trials  est. img/s (H100)  GPU share  est. GPU-h  img/s from"]
    for (model, res), g in sorted(e_all.per_group.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        frac = packing.format_fraction(g["gpu_share"]) if g["gpu_share"] > 0 else "0 (CPU)"
        source = (measured or {}).get((model, res), (0, "table (docs/sweep.md)"))[1]
        lines.append(f"{model + ' @ ' + str(res) + ' px':<30}{g['trials']:>6}  {g['images_per_s']:>17,.0f}"
                     f"  {frac:>9}  {g['gpu_hours']:>10.2f}  {source}")
    n_measured = sum(1 for g in e_all.per_group.values() if g["source"] == "measured")
    basis = (f"{n_measured} of {len(e_all.per_group)} groups at their measured img/s "
             f"(--gpu-measurements), the rest from the throughput table in docs/sweep.md"
             if n_measured else "from the throughput table in docs/sweep.md")
    lines += ["", f"estimated GPU-hours: {e_all.gpu_hours:.1f} for the whole grid, "
              f"{e_left.gpu_hours:.1f} still to run "
              f"(an ESTIMATE: {basis}; full GPU speed, no start-up)", "",
              "trials:"]
    fin = set(plan.finished)
    for t in trials:
        lines.append(f"  {'finished' if t.trial_id in fin else 'to run  '}  {t.trial_id}")
    return "\n".join(lines)


# --- the run --------------------------------------------------------------------------------------
#: ``--gpus-per-trial`` when not given: per-trial shares from orchestrator/packing.py.
DEFAULT_GPUS_PER_TRIAL = "auto"
#: GPU memory assumed for packing when neither the flag, the Ray cluster nor torch tells.
FALLBACK_GPU_MEMORY_GB = 80.0


def check_gpus_per_trial(value: float | str | None) -> float | str:
    """'auto' or a valid number (None = the default)."""
    if value is None:
        value = DEFAULT_GPUS_PER_TRIAL
    if isinstance(value, str):
        value = packing.parse_gpus_per_trial(value)
        if value == "auto":
            return value
    gpus = float(value)
    if gpus < 0 or (gpus > 1 and gpus != int(gpus)):
        raise UserError(f"--gpus-per-trial: {gpus:g} must be 0, a fraction below 1 "
                        f"(e.g. 0.5), a whole number or 'auto'")
    return gpus


def gpu_request_decision(mode: str, cluster_gpus: float, requested: float | str, explicit: bool,
                         cpus_per_trial: float) -> tuple[bool, str | None]:
    """Whether trials ask Ray for GPUs, and the one line to print about it (or None).

    A Ray with no GPU at the start runs trials on CPUs (and says so), except when the sweep joins
    a cluster (``--address``) and the user asked for GPUs explicitly (a number or ``auto``): an
    autoscaling cluster (``ray up``) starts with a CPU-only head and adds GPU workers only for
    pending GPU requests, so the request is kept and the trials wait for them.
    """
    if requested != "auto" and float(requested) == 0:
        return False, None
    if cluster_gpus > 0:
        return True, None
    if mode == "cluster" and explicit:
        return True, ("the Ray cluster has no GPU node up yet: trials wait for the autoscaler to add "
                      "GPU workers (on a cluster without GPU node types they would wait forever: "
                      "use --gpus-per-trial 0)")
    hint = ("; to wait for the autoscaler to add GPU workers instead, pass --gpus-per-trial auto or 1"
            if mode == "cluster" else "")
    return False, (f"the Ray cluster has no GPUs: running trials on CPUs "
                   f"({cpus_per_trial:g} CPU each){hint}")


def resolve_gpu_memory(flag: float | None, nodes: list | None = None) -> tuple[float, str]:
    """GPU memory for packing and where it came from: the flag, the Ray cluster's GPU nodes
    (smallest GPU), this machine's GPU (torch), else FALLBACK_GPU_MEMORY_GB."""
    if flag:
        return float(flag), "--gpu-memory-gb"
    if nodes:
        gb = packing.gpu_memory_from_ray_nodes(nodes)
        if gb:
            return gb, "the Ray cluster's accelerator types"
    gb = packing.detect_gpu_memory_gb()
    if gb:
        return gb, "this machine's GPU"
    return FALLBACK_GPU_MEMORY_GB, "no GPU seen, so assumed; set --gpu-memory-gb"


def gpu_shares(trials: list[Trial], requested: float | str, gpu_gb: float, table) -> dict[str, float]:
    """Trial id -> the GPU share it asks Ray for."""
    if requested != "auto":
        return {t.trial_id: float(requested) for t in trials}
    return {t.trial_id: packing.gpus_per_trial(t.params.model, t.params.resolution, gpu_gb, table)
            for t in trials}


def _resources_per_trial(handle, cpus_per_trial: float, shares: dict[str, float],
                         out: IO[str]) -> dict[str, dict]:
    """Trial id -> Tune resources; ``shares`` already decided (0 = CPU only)."""
    if handle.mode == "embedded":
        import ray
        node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        if cpus_per_trial > node_cpus:
            raise UserError(f"--cpus-per-trial {cpus_per_trial:g}: the local Ray has only "
                            f"{node_cpus:g} CPUs")
        node_gpus = max((n["Resources"].get("GPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        gpus = max(shares.values(), default=0.0)
        if gpus > node_gpus:
            raise UserError(f"--gpus-per-trial {gpus:g}: the local Ray has only {node_gpus:g} GPUs")
    out_res = {}
    for tid, gpus in shares.items():
        res = {"cpu": float(cpus_per_trial)}
        if gpus > 0:
            res["gpu"] = float(gpus)
        out_res[tid] = res
    return out_res


def _slots(handle, cpus_per_trial: float, shares: list[float]) -> int:
    """Trials that run at once; with mixed GPU shares, for their mean share (what the ETA needs)."""
    import ray
    gpu = sum(shares) / len(shares) if shares else 0.0
    total = 0
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        r = n["Resources"]
        k = int(r.get("CPU", 0) // cpus_per_trial) if cpus_per_trial > 0 else 10**6
        if gpu > 0:
            k = min(k, int(r.get("GPU", 0) / gpu + 1e-9))
        total += k
    return max(1, total)


def describe_resources(res: dict[str, dict]) -> str:
    """'{'cpu': 1.0, 'gpu': 1.0}' for one kind, else each kind with its trial count."""
    kinds: dict[str, int] = {}
    for r in res.values():
        kinds[str(r)] = kinds.get(str(r), 0) + 1
    if len(kinds) == 1:
        return next(iter(kinds))
    return ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))


def run_sweep(*, resolutions: Sequence[int], store: str, storage_loc: str, name: str,
              models: Sequence[str] = DEFAULT_MODELS, seeds: Sequence[int] = DEFAULT_SEEDS,
              task_mode: str = "multi", tasks: Sequence[str] | None = None,
              config: TrainConfig | dict | None = None, address: str | None = None,
              cpus_per_trial: float = 1, gpus_per_trial: float | str | None = None,
              gpu_memory_gb: float | None = None,
              gpu_measurements: str | Sequence[str] | None = None, max_failures: int = 2,
              dry_run: bool = False, verify_store: bool = True, trial_fn: Any = None,
              num_cpus: int | None = None, num_gpus: int | None = None,
              progress_interval: float = 30.0, aggregate: bool = True,
              results_dir: str | None = None, command: str = "", out: IO[str] | None = None,
              max_concurrent_trials: int | None = None, reuse_actors: bool = True) -> SweepResult:
    """Run (or dry-run) a sweep; see the module docstring. Bad input raises UserError before any
    trial starts. ``config``: the base TrainConfig (or overrides of its defaults) every trial
    shares; ``trial_fn``: a callable or ``"module:function"`` replacing trainer.train.run_trial.
    ``num_cpus``/``num_gpus`` size the embedded local Ray (ignored when joining a cluster).
    ``gpus_per_trial``: a number, ``"auto"`` (orchestrator/packing.py picks each trial's share
    with ``gpu_memory_gb`` and the ``gpu_measurements`` gpu_check JSONs), or None (= not given:
    DEFAULT_GPUS_PER_TRIAL; see :func:`gpu_request_decision` for what "given" changes)."""
    out = out or sys.stdout
    name = check_name(name)
    # Trials run in Ray worker processes with another working directory: make local paths absolute.
    store = absolute(store)
    storage_loc = absolute(storage_loc)
    if cpus_per_trial <= 0:
        raise UserError(f"--cpus-per-trial: {cpus_per_trial} is not positive")
    gpus_explicit = gpus_per_trial is not None
    gpus_per_trial = check_gpus_per_trial(gpus_per_trial)
    if gpu_memory_gb is not None and not gpu_memory_gb > 0:
        raise UserError(f"--gpu-memory-gb: {gpu_memory_gb:g} is not positive")
    measurements = ([gpu_measurements] if isinstance(gpu_measurements, str)
                    else list(gpu_measurements or []))
    if max_failures < 0:
        raise UserError(f"--max-failures: {max_failures} is negative")

    tasks = list(tasks) if tasks else None
    if isinstance(config, TrainConfig):
        base = config
    else:
        overrides = dict(config or {})
        if tasks and task_mode == "multi":
            overrides["tasks"] = tasks
        base = TrainConfig.from_dict(overrides)
    if tasks and task_mode == "multi" and tuple(tasks) != tuple(base.tasks):
        base = TrainConfig.from_dict({"tasks": tasks}, base=base)
    try:   # the trials' CUDA-graph setting decides which figures (graphed or eager) apply
        gpu_table = (packing.load_table(measurements, base.cuda_graphs)
                     if gpus_per_trial == "auto" else None)
        rates = packing.measured_rates(measurements, base.cuda_graphs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--gpu-measurements: cannot read a gpu_check JSON "
                        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    paths = {"store": store, "task_mode": "multi", "task": ""}
    for key in ("weights_dir", "cache_dir"):
        if getattr(base, key):
            paths[key] = absolute(getattr(base, key))
    if base.weights not in ("imagenet", "none"):
        paths["weights"] = absolute(base.weights)
    base = TrainConfig.from_dict(paths, base=base)
    task_axis = tasks or list(TASKS)
    points = grid_mod.build_grid(list(resolutions), list(models), list(seeds), task_mode,
                                 task_axis)
    needed = task_axis if task_mode == "single" else list(base.tasks)
    st = open_and_check_store(store, sorted({p.resolution for p in points}), verify_store, needed)
    sweep_loc = storage.join(storage_loc, name)
    trials = plan_trials(points, base, st.manifest_hash)
    ids = [t.trial_id for t in trials]
    if dry_run:
        entries = ledger.read_all(sweep_loc) if storage.exists(sweep_loc) else {}
    else:
        check_storage(sweep_loc)
        joining = cluster_address(address)
        if joining is not None:   # fail fast, before anything is written or started
            check_reachable(joining)
        entries = ledger.read_all(sweep_loc)
    plan = ledger.plan(sweep_loc, ids, entries)
    result = SweepResult(sweep_loc=sweep_loc, trial_ids=ids, dry_run=dry_run)
    if dry_run:
        print(f"sweep {name} at {storage.display(sweep_loc)}; store {storage.display(store)} "
              f"(manifest {st.manifest_hash[:12]})", file=out)
        shares: float | dict[str, float] = gpus_per_trial
        if gpus_per_trial == "auto":
            gb, source = resolve_gpu_memory(gpu_memory_gb)
            shares = gpu_shares(trials, "auto", gb, gpu_table)
            print(packing.describe([(t.params.model, t.params.resolution) for t in trials], gb,
                                   gpu_table) + f"\n  (GPU memory: {source}; on a Ray without GPUs "
                  f"the trials run on CPUs)\n", file=out)
        print(dry_run_report(trials, plan, st, base, shares, rates), file=out, flush=True)
        result.skipped_finished = plan.finished
        return result

    run_id = new_run_id()
    result.run_id = run_id
    axes = {"resolutions": sorted({p.resolution for p in points}), "models": list(models),
            "seeds": list(seeds), "task_mode": task_mode,
            "tasks": task_axis if task_mode == "single" else list(base.tasks)}
    write_sweep_file(sweep_loc, name=name, store_loc=store, manifest_hash=st.manifest_hash,
                     trials=trials, base=base, axes=axes, command=command, run_id=run_id)
    by_id = {t.trial_id: t for t in trials}
    for tid in plan.finished:   # the folder holds result.json but the worker died before the ledger
        ledger.adopt_finished(sweep_loc, tid)
    for tid in plan.to_run:
        ledger.register(sweep_loc, tid, by_id[tid].params.as_dict(), run_id)
    result.skipped_finished = list(plan.finished)
    print(f"sweep {name}: {len(ids)} trials, {len(plan.finished)} already finished, "
          f"{len(plan.to_run)} to run ({len(plan.resumed)} resume from storage); "
          f"storage {storage.display(sweep_loc)}", file=out, flush=True)

    if plan.to_run:
        _run_on_ray(sweep_loc=sweep_loc, run_id=run_id, trials=[by_id[t] for t in plan.to_run],
                    all_trials=trials, finished=plan.finished, address=address,
                    cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
                    gpus_explicit=gpus_explicit, gpu_memory_flag=gpu_memory_gb,
                    gpu_table=gpu_table, max_failures=max_failures, trial_fn=trial_fn, num_cpus=num_cpus,
                    num_gpus=num_gpus, progress_interval=progress_interval, out=out,
                    max_concurrent_trials=max_concurrent_trials, reuse_actors=reuse_actors)
    result.ran = list(plan.to_run)

    entries = ledger.read_all(sweep_loc)
    for tid in plan.to_run:
        state = entries.get(tid, {}).get("state")
        if state != "finished" and ledger.effective_state(entries.get(tid), sweep_loc,
                                                          tid) == "finished":
            ledger.adopt_finished(sweep_loc, tid)   # died after result.json, before the ledger
        elif state == "running" and entries[tid].get("driver_run") == run_id:
            ledger.mark_failed(sweep_loc, tid, "the trial stopped without finishing (sweep "
                               "interrupted, worker killed or out of memory, or node lost)")
    entries = ledger.read_all(sweep_loc)
    result.finished = [t for t in ids if entries.get(t, {}).get("state") == "finished"]
    result.failed = [t for t in ids if t not in set(result.finished)]
    table = results_table(entries, ids)
    if result.failed or not aggregate:
        print(table, file=out)
    if result.failed:
        print(f"{len(result.failed)} of {len(ids)} trials did not finish "
              f"({', '.join(result.failed[:5])}{' ...' if len(result.failed) > 5 else ''}); "
              f"errors are in {storage.display(storage.join(sweep_loc, 'ledger'))}; re-run the same "
              f"command to continue them from their checkpoints", file=out, flush=True)
        result.exit_code = 1
    elif aggregate:
        run_aggregator(sweep_loc, results_dir or os.path.join("results", name), out, table)
    return result


def _run_on_ray(*, sweep_loc, run_id, trials, all_trials, finished, address, cpus_per_trial,
                gpus_per_trial, gpus_explicit, gpu_memory_flag, gpu_table, max_failures,
                trial_fn, num_cpus, num_gpus, progress_interval,
                out, max_concurrent_trials, reuse_actors) -> None:
    # The legacy output engine at verbose=0 prints nothing; the new one still draws its header.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    from ray import tune
    from orchestrator.local_ray import ray_session
    from orchestrator.progress import SweepProgress
    from orchestrator.trainable import make_trainable, trial_name, trial_spec

    with ray_session(address, num_cpus=num_cpus, num_gpus=num_gpus) as handle:
        import ray
        use_gpus, note = gpu_request_decision(handle.mode, handle.total_gpus, gpus_per_trial,
                                              gpus_explicit, cpus_per_trial)
        if note:
            print(note, file=out, flush=True)
        if not use_gpus:
            shares = {t.trial_id: 0.0 for t in trials}
        elif gpus_per_trial == "auto":
            gb, source = resolve_gpu_memory(gpu_memory_flag, ray.nodes())
            shares = gpu_shares(trials, "auto", gb, gpu_table)
            print(packing.describe([(t.params.model, t.params.resolution) for t in trials], gb,
                                   gpu_table) + f"\n  (GPU memory: {source})", file=out, flush=True)
        else:
            shares = gpu_shares(trials, gpus_per_trial, 0.0, None)
        res_by_id = _resources_per_trial(handle, cpus_per_trial, shares, out)
        res = describe_resources(res_by_id)
        slots = _slots(handle, cpus_per_trial, list(shares.values()))
        if max_concurrent_trials:
            slots = min(slots, max_concurrent_trials)
        where = {"embedded": f"a private local Ray (run dir {handle.run_dir})",
                 "cluster": f"the Ray cluster at {handle.address}"}.get(
                     handle.mode, f"the Ray already running in this process ({handle.address})")
        print(f"running {len(trials)} trials on {where}: {handle.total_cpus:g} CPUs, "
              f"{handle.total_gpus:g} GPUs; per trial {res}; up to {slots} at once",
              file=out, flush=True)
        if handle.mode == "cluster" and not storage.is_remote(sweep_loc):
            print(f"note: storage {sweep_loc} is a local path; on a multi-node cluster it must be a "
                  f"shared filesystem mounted at the same path on every node (or use s3://...)",
                  file=out, flush=True)
        specs = []
        for t in trials:
            cfg = t.config
            if cfg.workers == -1:   # loader workers within the trial's CPU share (not in the trial id)
                cfg = dataclasses.replace(cfg, workers=max(0, min(8, int(cpus_per_trial) - 1)))
            specs.append(trial_spec(t.trial_id, cfg.to_dict(), sweep_loc, run_id, t.params.as_dict()))
        progress = SweepProgress(
            {t.trial_id: {"resolution": t.params.resolution, "model": t.params.model,
                          "total_epochs": t.config.total_epochs} for t in all_trials},
            finished=finished, slots=slots, interval=progress_interval, out=out, sweep_loc=sweep_loc)
        fs, path = storage.resolve(storage.join(sweep_loc, TUNE_DIR))
        # Tune calls this with each trial's resolved config: {"trial": <its trial_spec>}.
        trainable = tune.with_resources(make_trainable(trial_fn),
                                        lambda config: res_by_id[config.get("trial", config)["trial_id"]])
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(specs)},
            tune_config=tune.TuneConfig(num_samples=1, trial_name_creator=trial_name,
                                        trial_dirname_creator=trial_name,
                                        reuse_actors=reuse_actors,
                                        max_concurrent_trials=max_concurrent_trials),
            run_config=tune.RunConfig(
                name=run_id, storage_path=path, storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=max_failures),
                callbacks=[progress], verbose=0, log_to_file=True),
        )
        progress.maybe_status(force=True)
        tuner.fit()   # trial errors are in the ledger; the driver reads the ledger afterwards


# --- command line -----------------------------------------------------------------------------------
def _field_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true/false")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the grid")
    g.add_argument("--resolutions", default=",".join(map(str, DEFAULT_RESOLUTIONS)),
                   help="comma-separated square input sizes (px); each must be in the store")
    g.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated trainer.models names; 'efficientnet' = matched to resolution")
    g.add_argument("--seeds", default="0-4", help="seeds: '0-4', '0,1,2' or '0-2,7'")
    g.add_argument("--task-mode", default="multi", choices=["multi", "single"],
                   help="multi: one model per grid point for all tasks; single: one per task")
    g.add_argument("--tasks", default=None,
                   help=f"comma-separated tasks (default all: {', '.join(TASKS)})")
    w = p.add_argument_group("where")
    w.add_argument("--store", required=False, default=None,
                   help="store location (path or s3://...) built by python -m preprocessing build")
    w.add_argument("--storage", required=False, default=None,
                   help="where sweeps live (path or s3://...); this sweep is STORAGE/NAME")
    w.add_argument("--name", default=None, help="sweep name (a folder below --storage)")
    w.add_argument("--address", default=None,
                   help="Ray cluster to join (HOST:PORT or 'auto' on a head node); default: "
                        "RAY_ADDRESS, else a private local Ray started for this run")
    w.add_argument("--results-dir", default=None, help="aggregated report folder (default results/NAME)")
    r = p.add_argument_group("resources and retries")
    r.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs reserved per trial")
    r.add_argument("--gpus-per-trial", default=None, metavar="N|auto",
                   help="GPUs per trial: 'auto' (the default) packs 2-4 small trials on one GPU "
                        "where memory and the GPU's busy share allow (orchestrator/packing.py; "
                        "no memory isolation) and gives the rest one GPU each; 1 = one GPU each "
                        "always; 0 = CPUs only. On a Ray without GPUs trials run on CPUs, except "
                        "with --address and this flag given: then they wait for GPU workers")
    r.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="GPU memory for 'auto' (default: the Ray cluster's GPU type, else this "
                        "machine's GPU, else 80)")
    r.add_argument("--gpu-measurements", action="append", default=None, metavar="FILE",
                   help="bench/gpu_check.py JSON whose measured memory and busy share replace "
                        "the packing estimates (repeatable; later files win)")
    r.add_argument("--max-failures", type=int, default=2,
                   help="in-run retries of a crashed trial (each continues from its checkpoint)")
    r.add_argument("--max-concurrent", type=int, default=None, help="cap on trials at once")
    r.add_argument("--no-reuse-actors", action="store_true",
                   help="start a fresh worker process for every trial (default: a finished trial's "
                        "process, and its GPU, runs the next trial: saves seconds per trial)")
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray (default all)")
    r.add_argument("--num-gpus", type=int, default=None, help="GPUs of the embedded local Ray (default all)")
    m = p.add_argument_group("mode")
    m.add_argument("--resume", action="store_true",
                   help="explicit spelling of the default: run only what is not finished")
    m.add_argument("--dry-run", action="store_true",
                   help="print the grid, finished trials and a GPU-hour estimate; start nothing")
    m.add_argument("--no-verify-store", action="store_true",
                   help="skip checking the store's shard checksums before starting")
    m.add_argument("--no-aggregate", action="store_true", help="do not build the report afterwards")
    m.add_argument("--progress-interval", type=float, default=30.0,
                   help="seconds between progress summaries (events print as they happen)")
    t = p.add_argument_group("training (every trial; defaults = PROTOCOL.md; see trainer.config)")
    t.add_argument("--config", default=None, help="TrainConfig file (JSON/YAML); flags override it")
    t.add_argument("--weights", default=None, help="imagenet | none | path to a state_dict")
    t.add_argument("--weights-dir", default=None, help="local ImageNet weight cache")
    t.add_argument("--epochs-frozen", type=int, default=None, help="stage-1 epochs (body frozen)")
    t.add_argument("--epochs", "--epochs-unfrozen", dest="epochs_unfrozen", type=int, default=None,
                   help="stage-2 epochs (everything trains)")
    t.add_argument("--max-train-studies", type=int, default=None, help="0 = all")
    t.add_argument("--max-valid-studies", type=int, default=None, help="0 = all")
    t.add_argument("--workers", type=int, default=None,
                   help="loader workers per trial (default: cpus-per-trial - 1, at most 8)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in _GRID_FIELDS or f.name in _DEDICATED:
            continue
        hint = hints[f.name]
        kind = (_parse_bool if hint is bool else int if hint is int else float if hint is float
                else str)
        t.add_argument(_field_flag(f.name), dest=f.name, type=kind, default=None,
                       metavar="BOOL" if hint is bool else None,
                       help=f"TrainConfig.{f.name} (default {f.default!r})")


def config_overrides(args: argparse.Namespace) -> TrainConfig:
    base = TrainConfig.from_file(args.config) if args.config else TrainConfig()
    values = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in _GRID_FIELDS or f.name == "tasks":   # --tasks is handled by run_sweep
            continue
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return TrainConfig.from_dict(values, base=base) if values else base


def run(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    for flag, value in (("--store", args.store), ("--storage", args.storage), ("--name", args.name)):
        if not value:
            raise UserError(f"{flag} is required")
    resolutions = parse_int_list(args.resolutions, "--resolutions")
    models = grid_mod.parse_names(args.models, "--models")
    seeds = grid_mod.parse_seeds(args.seeds)
    tasks = grid_mod.parse_names(args.tasks, "--tasks") if args.tasks else None
    base = config_overrides(args)
    command = " ".join(shlex.quote(a) for a in (["python", "-m", "orchestrator.sweep"]
                                                 + list(getattr(args, "_argv", []) or [])))
    res = run_sweep(resolutions=resolutions, store=args.store, storage_loc=args.storage,
                    name=args.name, models=models, seeds=seeds, task_mode=args.task_mode,
                    tasks=tasks, config=base, address=args.address,
                    cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                    gpu_memory_gb=args.gpu_memory_gb, gpu_measurements=args.gpu_measurements,
                    max_failures=args.max_failures, dry_run=args.dry_run,
                    verify_store=not args.no_verify_store, num_cpus=args.num_cpus,
                    num_gpus=args.num_gpus, progress_interval=args.progress_interval,
                    aggregate=not args.no_aggregate, results_dir=args.results_dir,
                    command=command, out=out, max_concurrent_trials=args.max_concurrent,
                    reuse_actors=not args.no_reuse_actors)
    return res.exit_code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.sweep",
                                description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=HelpFormatter)
    add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args._argv = argv
    return run(args)


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="orchestrator.sweep"))
