"""Checks a sweep runs before Ray starts or anything is written to its folder.

Every problem found here would otherwise surface inside each trial (and be retried), or only after
Ray had started and ``sweep.json`` and the ledger were written. Each check raises
``common.cli.UserError`` with one line naming the flag, file or location, cheapest first:

1. resources the embedded Ray can never satisfy (``--num-cpus 0``, ``--cpus-per-trial 99`` on a
   2-core machine);
2. the cluster address answers (before any folder is created);
3. the weights of every model in the grid are in the cache (names the missing files and the
   download command) or the ``--weights`` file exists;
4. the storage location is writable (probed at ``--storage``, so a failing check leaves no
   sweep folder behind).

The store (opens, has the resolutions, verifies) is checked by the sweep itself
(``orchestrator.sweep.open_and_check_store``) right after these.
"""
from __future__ import annotations

import os
from typing import Sequence

from common import storage
from common.cli import UserError


def machine_cpus() -> int:
    """CPUs this process may use (the embedded Ray's default size)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_resources(cpus_per_trial: float, num_cpus: int | None, joining: bool,
                    available_cpus: int | None = None) -> None:
    """An embedded Ray of ``num_cpus`` (default: this machine) must fit one trial. On a cluster
    the autoscaler may add nodes, so only the flag's own range is checked there."""
    if not cpus_per_trial > 0:
        raise UserError(f"--cpus-per-trial: {cpus_per_trial:g} is not positive")
    if joining:
        return
    if num_cpus is not None and num_cpus < 1:
        raise UserError(f"--num-cpus: {num_cpus} leaves the local Ray no CPU to run a trial on "
                        f"(give at least 1, or leave it out to use all)")
    have = num_cpus if num_cpus is not None else (available_cpus or machine_cpus())
    if cpus_per_trial > have:
        where = f"--num-cpus {num_cpus}" if num_cpus is not None else f"this machine has {have}"
        raise UserError(f"--cpus-per-trial {cpus_per_trial:g}: no trial could ever start on the "
                        f"local Ray ({where} CPUs); lower it or join a cluster with --address")


def check_address(address: str | None) -> None:
    """An explicit cluster address must accept a connection (one line, no Ray retry loop)."""
    from orchestrator.local_ray import check_reachable, cluster_address
    joining = cluster_address(address)
    if joining is not None:
        check_reachable(joining)


def check_weights(models: Sequence[str], resolutions: Sequence[int], weights: str,
                  weights_dir: str | None) -> None:
    """``weights``: 'imagenet' (the cache must hold every resolved model of the grid), 'none', or
    a file that must exist. Missing ImageNet files are listed together with the one command that
    fetches them all."""
    from trainer.models import model_info, resolve_model_name
    from trainer.models import weights_cache as w
    mode = w.weights_mode(weights)          # WeightsError naming a missing --weights file
    if mode != "imagenet":
        return
    resolved = sorted({resolve_model_name(m, int(r)) for m in models for r in resolutions})
    without = [m for m in resolved if model_info(m).weights_file is None]
    if without:
        raise UserError(f"--weights imagenet: {', '.join(without)} has no ImageNet weights; use "
                        f"--weights none (random body) or a state_dict file")
    cache = weights_dir or w.default_weights_dir()
    missing = [m for m in resolved if not storage.exists(w.weights_location(m, cache))]
    if missing:
        files = ", ".join(storage.display(w.weights_location(m, cache)) for m in missing)
        raise UserError(f"ImageNet weights missing for {len(missing)} model(s) of the grid: {files}; "
                        f"fetch them once where there is internet: {w.DOWNLOAD_COMMAND} --models "
                        f"{','.join(missing)} --dir {storage.display(cache)} (or --weights none)")


def check_storage(storage_loc: str, sweep_loc: str) -> None:
    """Write and remove a probe file; probing ``--storage`` (or the sweep folder when it already
    exists) creates no sweep folder."""
    target = sweep_loc if storage.exists(sweep_loc) else storage_loc
    try:
        storage.check_writable(target)
    except storage.StorageError as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    except Exception as exc:  # bad URIs raise several pyarrow types
        raise UserError(f"storage location {storage.display(target)} is not usable: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def run_preflight(*, models: Sequence[str], resolutions: Sequence[int], weights: str,
                  weights_dir: str | None, cpus_per_trial: float, num_cpus: int | None,
                  address: str | None, storage_loc: str, sweep_loc: str) -> None:
    """Every check above, cheapest first; raises the first problem as a UserError."""
    from orchestrator.local_ray import cluster_address
    check_resources(cpus_per_trial, num_cpus, joining=cluster_address(address) is not None)
    check_address(address)
    check_weights(models, resolutions, weights, weights_dir)
    check_storage(storage_loc, sweep_loc)
