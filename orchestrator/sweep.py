"""``python -m orchestrator.sweep``: Ray Tune runs every (resolution, model, seed[, task]) trial,
one GPU each (small ones packed 2-4 per GPU), resumable from the trial ledger on storage.

Flow: settings (cxr-sweep.toml < CXR_SWEEP_* < flags) -> SweepConfig + TrainConfig -> checks
(grid, store, storage, cluster, weights) -> ``STORAGE/NAME/sweep.json`` -> new trials registered in
the ledger -> what is not finished runs on Ray Tune (a private local Ray, or ``--address``) -> the
report (``analysis``) in ``STORAGE/NAME/results``. See docs/sweep.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from typing import IO, Any, Sequence

from common import storage
from common.cli import UserError, run_cli
from common.config_args import (ArgumentParser, add_config_arguments, apply_layers,
                                config_from_args, env_values, find_config_file, read_toml)
from common.sweep_folder import SweepFile, SweepFolder
from orchestrator.grid import Trial, build_grid, plan_trials
from orchestrator.sweep_config import CONFIG_FILE, ENV_PREFIX, GRID_FIELDS, SweepConfig

EPILOG = """examples:
  # the thesis grid (5 resolutions x 5 models x 5 seeds = 125 trials); store, storage and name
  # from cxr-sweep.toml (python -m orchestrator.sweep init writes one), CXR_SWEEP_* or flags
  python -m orchestrator.sweep --resolutions 160,240,320,400,480 --store s3://bucket/store \\
      --storage s3://bucket/sweeps --name thesis

  # what would run and its GPU-hours; starts nothing (without --store: planned for CheXpert's size)
  python -m orchestrator.sweep --resolutions 160,240,320,400,480 --dry-run

  # a starter cxr-sweep.toml in this folder
  python -m orchestrator.sweep init --store s3://bucket/store --storage s3://bucket/sweeps

  # on a cluster started by `ray up cluster.yaml` (from the head node); with --gpus-per-trial
  # given, trials wait for the autoscaler to add GPU workers instead of running on the CPU head
  python -m orchestrator.sweep --address auto --gpus-per-trial auto --gpu-memory-gb 24

  # trackers: TensorBoard files (in STORAGE/NAME/tune/), MLflow and W&B runs per trial
  python -m orchestrator.sweep ... --log tensorboard,mlflow,wandb

  # a small CPU sweep on a phantom store: 2 models, 1 seed, short epochs
  python -m orchestrator.sweep --resolutions 160,240 --models resnet18,densenet121 --seeds 0 \\
      --store demo/store --storage demo/sweeps --name demo --weights none --epochs-frozen 1 \\
      --epochs-unfrozen 1 --max-train-studies 40 --cpus-per-trial 1

  # re-run the same command after a crash: only unfinished trials run, continuing from their
  # newest checkpoint; finished trials are never run again

settings come from cxr-sweep.toml in this folder or a parent (keys = long flag names, e.g.
store = "s3://bucket/store", lr-head = 0.001), then CXR_SWEEP_<FLAG> environment variables
(CXR_SWEEP_STORE, CXR_SWEEP_LR_HEAD), then flags; later wins. Training flags (every trial; the
thesis protocol's defaults, docs/trainer.md) are TrainConfig's fields.
"""


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


# --- provenance -----------------------------------------------------------------------------------
def git_commit() -> str:
    """The commit of this checkout ('' outside a git checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def versions() -> dict[str, str]:
    from importlib import metadata
    out = {"python": platform.python_version()}
    for dist in ("torch", "ray", "cxr-sweep"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = ""
    return out


# --- checks (everything that can fail does so before any trial starts) ---------------------------
def open_and_check_store(store_loc: str, resolutions: Sequence[int], verify: bool,
                         needed_tasks: Sequence[str], store=None):
    """The store (``store``: already open), checked for every requested resolution and task (and
    verified unless told not to)."""
    from preprocessing.manifest import verify_store
    from preprocessing.store import StoreError, open_store
    store = store if store is not None else open_store(store_loc, verify=False)
    missing = [r for r in resolutions if int(r) not in store.resolutions]
    if missing:
        raise StoreError(f"store {storage.display(store_loc)} lacks resolution(s) "
                         f"{', '.join(map(str, missing))} (it has {', '.join(map(str, store.resolutions))});"
                         f" build them with python -m preprocessing build --resolutions ...")
    absent = [t for t in needed_tasks if t not in store.tasks]
    if absent:
        raise StoreError(f"store {storage.display(store_loc)} has no labels for {', '.join(absent)} "
                         f"(it labels: {', '.join(store.tasks)}); choose with --tasks")
    if verify:
        for r in resolutions:
            problems = verify_store(store_loc, resolution=int(r))
            if problems:
                more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
                raise StoreError(f"store {storage.display(store_loc)} does not verify at {r} px: "
                                 f"{problems[0]}{more}")
    return store


def base_config(sweep: SweepConfig, train) -> Any:
    """The TrainConfig every trial starts from: ``train`` with the sweep's store, tasks and
    absolute local paths (trials run in Ray workers with another working folder)."""
    from orchestrator.sweep_config import absolute
    from trainer.config import TrainConfig
    train = train if train is not None else TrainConfig()
    values: dict[str, Any] = {"store": sweep.store, "task_mode": "multi", "task": ""}
    if sweep.tasks and sweep.task_mode == "multi":
        values["tasks"] = list(sweep.tasks)
    for key in ("weights_dir", "cache_dir"):
        if getattr(train, key):
            values[key] = absolute(getattr(train, key))
    if train.weights not in ("imagenet", "none"):
        values["weights"] = absolute(train.weights)
    return TrainConfig.from_dict(values, base=train)


def write_sweep_file(sweep_loc: str, *, name: str, store_loc: str, manifest_hash: str,
                     trials: list[Trial], base, axes: dict, command: str, run_id: str,
                     argv: Sequence[str] = ()) -> SweepFile:
    """sweep.json: the current grid plus every trial any run of this sweep registered."""
    folder = SweepFolder(sweep_loc)
    try:
        old = folder.read_sweep_file()
    except FileNotFoundError:
        old = SweepFile()
    all_trials = {**old.all_trials, **{t.trial_id: t.params.as_dict() for t in trials}}
    doc = dataclasses.replace(
        old, name=name, store=storage.display(store_loc), store_location=store_loc,
        manifest_hash=manifest_hash, grid=axes,
        base_config={k: v for k, v in base.to_dict().items() if k not in GRID_FIELDS or k == "tasks"},
        trial_ids=[t.trial_id for t in trials],
        trials={t.trial_id: t.params.as_dict() for t in trials}, all_trials=all_trials,
        command=command, argv=list(argv), git_commit=git_commit(), versions=versions(),
        created=old.created or now_iso(), updated=now_iso(),
        runs=(old.runs + [{"run_id": run_id, "started": now_iso(), "command": command,
                           "trials": len(trials)}])[-100:])
    folder.write_sweep_file(doc)
    return doc


# --- output ---------------------------------------------------------------------------------------
def ledger_table(entries: dict[str, dict], trial_ids: list[str]) -> str:
    """Mean best AUROC (mean over tasks, then over seeds) per model (rows) and resolution (columns),
    from the ledger alone: what the driver prints when the analysis cannot run or is skipped."""
    cells: dict[tuple[str, int], list[float]] = {}
    for tid in trial_ids:
        e = entries.get(tid) or {}
        p = e.get("params") or {}
        r = (e.get("result") or {}).get("best_auroc_mean")
        if e.get("state") == "finished" and isinstance(r, (int, float)) and r == r:
            cells.setdefault((p.get("model", "?"), int(p.get("resolution", 0))), []).append(r)
    if not cells:
        return "no finished trials yet"
    models = sorted({m for m, _ in cells})
    resolutions = sorted({r for _, r in cells})
    width = max(len(m) for m in models) + 2
    lines = ["mean best validation AUROC (mean over tasks and seeds)",
             "model".ljust(width) + "".join(f"{str(r) + ' px':>16}" for r in resolutions)]
    for m in models:
        row = []
        for r in resolutions:
            vals = cells.get((m, r))
            row.append(f"{sum(vals) / len(vals):.4f} (n={len(vals)})" if vals else "-")
        lines.append(m.ljust(width) + "".join(f"{c:>16}" for c in row))
    return "\n".join(lines)


def run_aggregator(sweep_loc: str, out_dir: str, out: IO[str], fallback_table: str) -> None:
    """Build the report with the analysis package and print its table (the ledger's if it fails)."""
    from analysis.aggregate import aggregate_sweep
    try:
        summary = aggregate_sweep(sweep_loc, out_dir)
    except UserError as exc:
        print(fallback_table, file=out)
        print(f"aggregation failed: {exc}", file=out)
        return
    if summary.table:
        print(summary.table, file=out)
    print(f"report: {summary.out_dir or storage.display(out_dir)}", file=out, flush=True)


# --- the sweep ------------------------------------------------------------------------------------
def run_sweep(sweep: SweepConfig, train=None, callbacks: Sequence[Any] = (), *,
              trial_fn: Any = None, out: IO[str] | None = None, command: str = "",
              argv: Sequence[str] = ()) -> SweepResult:
    """Run (or dry-run) ``sweep`` with ``train`` (a TrainConfig; default: the protocol's) as
    every trial's base config. ``callbacks``: extra Ray Tune callbacks (trackers of your own);
    ``trial_fn``: a callable or ``"module:function"`` replacing trainer.train.run_trial (tests);
    ``command``/``argv``: the command line as typed, recorded in sweep.json. Bad input raises a
    UserError before any trial starts."""
    from orchestrator import ledger, packing
    out = out or sys.stdout
    base = base_config(sweep, train)
    files = sweep.measurement_files()
    try:   # the trials' CUDA-graph setting decides which figures (graphed or eager) apply
        gpu_table = packing.load_table(files, base.cuda_graphs, base.compile)
        rates = packing.measured_rates(files, base.cuda_graphs, base.compile)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--gpu-measurements: cannot read a gpu_check JSON "
                        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    task_axis = list(sweep.tasks or base.tasks)
    points = build_grid(sweep.resolutions, sweep.models, sweep.seeds, sweep.task_mode, task_axis)
    trials = plan_trials(points, base, "")   # every trial's config is checked before the store
    if not sweep.dry_run:
        sweep.require_run_settings()
    store = None
    if sweep.store:
        from preprocessing.store import open_store
        from trainer.config import TrainConfig
        store = open_store(sweep.store, verify=False)
        if not sweep.tasks and tuple(base.tasks) == tuple(TrainConfig.tasks):
            # no tasks asked for: the store's dataset decides (CheXpert's five for CheXpert)
            base = TrainConfig.from_dict({"tasks": list(store.default_tasks)}, base=base)
            task_axis = list(base.tasks)
            points = build_grid(sweep.resolutions, sweep.models, sweep.seeds, sweep.task_mode,
                                task_axis)
        needed = task_axis if sweep.task_mode == "single" else list(base.tasks)
        open_and_check_store(sweep.store, sorted({t.params.resolution for t in trials}),
                             sweep.verify_store, needed, store=store)
        trials = plan_trials(points, base, store.manifest_hash)
    ids = [t.trial_id for t in trials]
    folder = sweep.folder if sweep.storage and sweep.name else None
    result = SweepResult(sweep_loc=folder.location if folder else "", trial_ids=ids,
                         dry_run=sweep.dry_run)

    if sweep.dry_run:
        from orchestrator import dry_run
        entries = (ledger.read_all(folder.location) if folder and storage.exists(folder.location)
                   else {})
        plan = (ledger.plan(folder.location, ids, entries) if folder and store
                else ledger.Plan(to_run=list(ids), finished=[], resumed=[]))
        print(dry_run.report(sweep, trials, plan, store, base, gpu_table, rates), file=out,
              flush=True)
        result.skipped_finished = list(plan.finished)
        return result

    sweep_loc = folder.location
    from orchestrator import trackers
    trackers.check(sweep)
    # Checks before Ray starts or anything is written: resources, the cluster, every model's
    # weights, the storage location (orchestrator/preflight.py).
    from orchestrator.preflight import run_preflight
    run_preflight(models=sorted({t.params.model for t in trials}),
                  resolutions=sorted({t.params.resolution for t in trials}),
                  weights=base.weights, weights_dir=base.weights_dir or None,
                  cpus_per_trial=sweep.cpus_per_trial, num_cpus=sweep.num_cpus,
                  address=sweep.address or None, storage_loc=sweep.storage, sweep_loc=sweep_loc)
    # One driver per sweep (orchestrator/lock.py): held around everything this driver writes.
    from orchestrator.lock import driver_lock
    run_id = new_run_id()
    result.run_id = run_id
    with driver_lock(folder.lock_file, run_id=run_id, command=command, take_over=sweep.take_over):
        return _run_locked(sweep, base, trials, callbacks, trial_fn, out, command, argv, run_id,
                           store.manifest_hash, gpu_table, result)


def _run_locked(sweep: SweepConfig, base, trials: list[Trial], callbacks, trial_fn, out,
                command: str, argv, run_id: str, manifest_hash: str, gpu_table,
                result: SweepResult) -> SweepResult:
    from orchestrator import ledger
    sweep_loc = sweep.folder.location
    ids = [t.trial_id for t in trials]
    entries = ledger.read_all(sweep_loc)
    ledger.mark_stale_interrupted(sweep_loc, entries, run_id)   # attempts of a killed driver
    plan = ledger.plan(sweep_loc, ids, entries)
    axes = {"resolutions": sorted({t.params.resolution for t in trials}),
            "models": list(sweep.models), "seeds": list(sweep.seeds), "task_mode": sweep.task_mode,
            "tasks": list(sweep.tasks or base.tasks)}
    write_sweep_file(sweep_loc, name=sweep.name, store_loc=sweep.store, manifest_hash=manifest_hash,
                     trials=trials, base=base, axes=axes, command=command, run_id=run_id, argv=argv)
    by_id = {t.trial_id: t for t in trials}
    for tid in plan.finished:   # the folder holds result.json but the worker died before the ledger
        ledger.adopt_finished(sweep_loc, tid)
    for tid in plan.to_run:
        ledger.register(sweep_loc, tid, by_id[tid].params.as_dict(), run_id)
    result.skipped_finished = list(plan.finished)
    print(f"sweep {sweep.name}: {len(ids)} trials, {len(plan.finished)} already finished, "
          f"{len(plan.to_run)} to run ({len(plan.resumed)} resume from storage); "
          f"storage {storage.display(sweep_loc)}", file=out, flush=True)

    if plan.to_run:
        from orchestrator.ray_run import run_on_ray
        from orchestrator.trainable import describe_error
        try:
            run_on_ray(sweep, run_id=run_id, trials=[by_id[t] for t in plan.to_run],
                       all_trials=trials, finished=plan.finished, gpu_table=gpu_table,
                       trial_fn=trial_fn, callbacks=list(callbacks), out=out)
        except KeyboardInterrupt:
            ledger.close_run(sweep_loc, plan.to_run, run_id, "interrupted", "interrupted by Ctrl-C")
            print("interrupted: the running trials are recorded as interrupted; re-run the same "
                  "command to continue them from their checkpoints", file=out, flush=True)
            raise
        except UserError:
            raise
        except Exception as exc:   # Ray Tune itself stopped (e.g. its own files on a full disk)
            ledger.close_run(sweep_loc, plan.to_run, run_id, "failed",
                             f"the sweep stopped: {describe_error(exc)}")
            print(f"the sweep stopped: {describe_error(exc)}", file=out, flush=True)
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
    table = ledger_table(entries, ids)
    if result.failed or not sweep.aggregate:
        print(table, file=out)
    if result.failed:
        print(f"{len(result.failed)} of {len(ids)} trials did not finish "
              f"({', '.join(result.failed[:5])}{' ...' if len(result.failed) > 5 else ''}); "
              f"errors are in {storage.display(sweep.folder.ledger_dir)}; re-run the same "
              f"command to continue them from their checkpoints", file=out, flush=True)
        result.exit_code = 1
    elif sweep.aggregate:
        run_aggregator(sweep_loc, sweep.results_location, out, table)
    return result


# --- command line -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from trainer.config import TrainConfig
    p = ArgumentParser(prog="python -m orchestrator.sweep",
                       usage="python -m orchestrator.sweep [init] [FLAGS]",
                       description="Run every (resolution, model, seed[, task]) trial of a grid on "
                                   "Ray Tune, one GPU each (small ones packed), resumable from the "
                                   "trial ledger on storage.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p.add_argument_group("the sweep"), SweepConfig)
    t = p.add_argument_group("training (every trial; the thesis protocol's defaults, docs/trainer.md)")
    t.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                   help="a TrainConfig file (JSON or YAML) under the training flags")
    add_config_arguments(t, TrainConfig, exclude=GRID_FIELDS)
    return p


def layers(environ=None) -> list[tuple[str, dict]]:
    """The settings below the flags: cxr-sweep.toml (nearest), then each CXR_SWEEP_* variable."""
    out: list[tuple[str, dict]] = []
    path = find_config_file(CONFIG_FILE)
    if path:
        out.append((path, read_toml(path)))
    for key, value in sorted(env_values(ENV_PREFIX, environ).items()):
        out.append((ENV_PREFIX + key.upper().replace("-", "_"), {key: value}))
    return out


def configs_from_argv(argv: Sequence[str], environ=None):
    """(SweepConfig, TrainConfig) from the layers and ``argv``."""
    from trainer.config import TrainConfig
    parser = build_parser()
    apply_layers(parser, layers(environ))
    args = parser.parse_args(list(argv))
    sweep = config_from_args(args, SweepConfig)
    base = TrainConfig.from_file(args.config) if getattr(args, "config", None) else TrainConfig()
    train = config_from_args(args, TrainConfig, base=base, exclude=GRID_FIELDS)
    return sweep, train


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["init"]:
        from orchestrator.init import main as init_main
        return init_main(argv[1:])
    sweep, train = configs_from_argv(argv)
    command = " ".join(["python -m orchestrator.sweep"] + [shlex.quote(a) for a in argv])
    return run_sweep(sweep, train, command=command, argv=argv).exit_code


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="orchestrator.sweep"))
