"""The part of a sweep that runs on Ray: GPU shares, Tune resources, the Tuner, progress and
trackers. ``orchestrator.sweep.run_sweep`` calls :func:`run_on_ray` with the trials to run."""
from __future__ import annotations

import dataclasses
import os
from typing import IO, Any

from common import storage
from common.cli import UserError
from orchestrator import packing
from orchestrator.grid import Trial
from orchestrator.sweep_config import SweepConfig

#: GPU memory assumed for packing when neither the flag, the Ray cluster nor torch tells.
FALLBACK_GPU_MEMORY_GB = 80.0


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


def _resources_per_trial(handle, cpus_per_trial: float, shares: dict[str, float]) -> dict[str, dict]:
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


def _slots(cpus_per_trial: float, shares: list[float]) -> int:
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


def run_on_ray(sweep: SweepConfig, *, run_id: str, trials: list[Trial], all_trials: list[Trial],
               finished: list[str], gpu_table, trial_fn: Any, callbacks: list, out: IO[str]) -> None:
    # The legacy output engine at verbose=0 prints nothing; the new one still draws its header.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    from ray import tune

    from orchestrator import trackers
    from orchestrator.local_ray import ray_session
    from orchestrator.progress import SweepProgress
    from orchestrator.trainable import make_trainable, trial_name, trial_spec

    sweep_loc = sweep.folder.location
    requested = sweep.gpu_share()
    with ray_session(sweep.address or None, num_cpus=sweep.num_cpus,
                     num_gpus=sweep.num_gpus) as handle:
        import ray
        use_gpus, note = gpu_request_decision(handle.mode, handle.total_gpus, requested,
                                              sweep.gpus_explicit, sweep.cpus_per_trial)
        if note:
            print(note, file=out, flush=True)
        if not use_gpus:
            shares = {t.trial_id: 0.0 for t in trials}
        elif requested == "auto":
            gb, source = resolve_gpu_memory(sweep.gpu_memory_gb, ray.nodes())
            shares = gpu_shares(trials, "auto", gb, gpu_table)
            print(packing.describe([(t.params.model, t.params.resolution) for t in trials], gb,
                                   gpu_table) + f"\n  (GPU memory: {source})", file=out, flush=True)
        else:
            shares = gpu_shares(trials, requested, 0.0, None)
        res_by_id = _resources_per_trial(handle, sweep.cpus_per_trial, shares)
        slots = _slots(sweep.cpus_per_trial, list(shares.values()))
        if sweep.max_concurrent:
            slots = min(slots, sweep.max_concurrent)
        where = {"embedded": f"a private local Ray (run dir {handle.run_dir})",
                 "cluster": f"the Ray cluster at {handle.address}"}.get(
                     handle.mode, f"the Ray already running in this process ({handle.address})")
        print(f"running {len(trials)} trials on {where}: {handle.total_cpus:g} CPUs, "
              f"{handle.total_gpus:g} GPUs; per trial {describe_resources(res_by_id)}; up to "
              f"{slots} at once", file=out, flush=True)
        if handle.mode == "cluster" and not storage.is_remote(sweep_loc):
            print(f"note: storage {sweep_loc} is a local path; on a multi-node cluster it must be a "
                  f"shared filesystem mounted at the same path on every node (or use s3://...)",
                  file=out, flush=True)
        specs = []
        for t in trials:
            cfg = t.config
            if cfg.workers == -1:   # loader workers within the trial's CPU share (not in the trial id)
                cfg = dataclasses.replace(cfg, workers=max(0, min(8, int(sweep.cpus_per_trial) - 1)))
            specs.append(trial_spec(t.trial_id, cfg.to_dict(), sweep_loc, run_id, t.params.as_dict()))
        progress = SweepProgress(
            {t.trial_id: {"resolution": t.params.resolution, "model": t.params.model,
                          "total_epochs": t.config.total_epochs} for t in all_trials},
            finished=finished, slots=slots, interval=sweep.progress_interval, out=out,
            sweep_loc=sweep_loc, style=sweep.progress)
        fs, path = storage.resolve(sweep.folder.tune_dir)
        # Tune calls this with each trial's resolved config: {"trial": <its trial_spec>}.
        trainable = tune.with_resources(make_trainable(trial_fn),
                                        lambda config: res_by_id[config.get("trial", config)["trial_id"]])
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(specs)},
            tune_config=tune.TuneConfig(num_samples=1, trial_name_creator=trial_name,
                                        trial_dirname_creator=trial_name,
                                        reuse_actors=sweep.reuse_actors,
                                        max_concurrent_trials=sweep.max_concurrent or None),
            run_config=tune.RunConfig(
                name=run_id, storage_path=path, storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                callbacks=[progress, *trackers.callbacks(sweep), *callbacks], verbose=0,
                log_to_file=True),
        )
        progress.maybe_status(force=True)
        tuner.fit()   # trial errors are in the ledger; the driver reads the ledger afterwards
        progress.close()
