"""The Ray Tune function trainable: one grid point -> ``trainer.train.run_trial`` on its own folder.

Config in (what the sweep puts in the param space), flat metrics out (one ``tune.report`` per
epoch). The trial folder (``SweepFolder.trial``) is the checkpoint: ``run_trial`` continues from
its newest checkpoint by itself, so a retry by ``FailureConfig`` or a re-run of the sweep needs no
Tune checkpoint at all. Only ``ray.tune`` APIs are used (``ray.train.*`` inside a Tune function
errors in Ray 2.60).

How an attempt ends, in the ledger:

* finished: ``result.json`` written.
* failed, not retried: a deterministic error (a ``UserError``: configuration, store, weights,
  data; or a full or read-only disk). The trial returns normally so Tune's ``max_failures`` does
  not run it again to the same end; the message is in the ledger, the traceback in
  ``TrialFolder.error_path``.
* failed, retried: anything else (a worker or node lost, out of memory, a flaky network) is
  re-raised for Tune to retry from the checkpoint.
* interrupted: Ctrl-C or Tune stopping the actor (``KeyboardInterrupt`` / ``SystemExit``).
"""
from __future__ import annotations

import errno
import importlib
import os
import traceback
from typing import Any, Callable

from common import storage
from common.cli import UserError
from common.sweep_folder import SweepFolder
from orchestrator import ledger

#: OSError numbers that a retry of the same write cannot fix (free space or fix the mount first).
STORAGE_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}

TrialFn = Callable[..., dict]

#: The real trial function; tests and the overhead benchmark inject their own of the same signature.
DEFAULT_TRIAL_FN = "trainer.train:run_trial"


def load_trial_fn(spec: str | TrialFn | None) -> TrialFn:
    """A callable, or ``"module:function"``; None is the real trainer."""
    if callable(spec):
        return spec
    module_name, _, attr = (spec or DEFAULT_TRIAL_FN).partition(":")
    return getattr(importlib.import_module(module_name), attr or "run_trial")


def trial_spec(trial_id: str, train_config: dict, sweep_loc: str, run_id: str,
               params: dict) -> dict:
    """The config dict of one Tune trial (kept JSON-plain: it lands in Tune's params.json)."""
    return {"trial_id": trial_id, "train_config": train_config, "sweep": sweep_loc,
            "run_id": run_id, "params": params}


def spec_of(trial) -> dict:
    """The trial spec inside a Tune Trial's config (for callbacks and name creators)."""
    return trial.config.get("trial", trial.config)


def trial_name(trial) -> str:
    """Tune trial (folder) name = our trial id, so Tune's own folder is readable next to ours."""
    return str(spec_of(trial).get("trial_id", trial.trial_id))


def placement() -> dict[str, Any]:
    """Where this trial runs: node ip and id, GPU ids Ray gave it, CUDA_VISIBLE_DEVICES."""
    import ray
    ctx = ray.get_runtime_context()
    try:
        gpu_ids = [int(g) if str(g).isdigit() else str(g) for g in ray.get_gpu_ids()]
    except Exception:
        gpu_ids = []
    return {"node": ray.util.get_node_ip_address(), "node_id": ctx.get_node_id(),
            "gpu_ids": gpu_ids, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def checkpoint_epoch(trial_dir: str) -> int:
    """The epoch a trial folder's checkpoint holds (0: none), i.e. where run_trial continues."""
    from trainer.checkpoint import resume_epoch
    try:
        return resume_epoch(trial_dir)
    except Exception:   # unreadable storage: the trainer itself will report it
        return 0


def is_deterministic(exc: BaseException) -> bool:
    """Errors a retry would only repeat: bad input (UserError) and full or read-only storage."""
    if isinstance(exc, UserError):
        return True
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in STORAGE_FULL_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def describe_error(exc: BaseException) -> str:
    """One line: the exception's type and first line, or the storage cause under it."""
    cause = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in STORAGE_FULL_ERRNOS:
            where = f" ({cause.filename})" if getattr(cause, "filename", None) else ""
            return f"{type(cause).__name__}: {os.strerror(cause.errno)}{where}"[:500]
        cause = cause.__cause__ or cause.__context__
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:500]


def _flat_metrics(record: dict, trial_id: str) -> dict:
    out = {"trial_id": trial_id}
    for k, v in record.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
    return out


def make_trainable(trial_fn: str | TrialFn | None = None) -> Callable[[dict], None]:
    """The function trainable Tune runs; ``trial_fn`` as in :func:`load_trial_fn`."""

    def sweep_trial(config: dict) -> None:
        from ray import tune
        from trainer.config import TrainConfig

        config = config.get("trial", config)   # the sweep grid-searches over whole trial specs
        trial_id = config["trial_id"]
        sweep_loc = config["sweep"]
        trial_folder = SweepFolder(sweep_loc).trial(trial_id)
        folder = trial_folder.location
        where = placement()
        fn = load_trial_fn(trial_fn)
        # where the attempt continues: the trial function's own answer when it has one (a test
        # fake with its own checkpoint format), else the trainer's checkpoint
        start_epoch = getattr(fn, "resume_epoch", checkpoint_epoch)(folder)
        ledger.mark_running(sweep_loc, trial_id, run_id=config["run_id"], node=where["node"],
                            gpu_ids=where["gpu_ids"],
                            cuda_visible_devices=where["cuda_visible_devices"],
                            node_id=where["node_id"],  # fake test nodes share one IP
                            resumed_from_epoch=start_epoch)
        first = []

        def on_epoch(record: dict) -> None:
            if not first:   # the trainer's own word on where it continued (a damaged latest.pt
                first.append(record.get("epoch"))   # falls back to previous.pt, or starts over)
                if isinstance(record.get("epoch"), int) and record["epoch"] - 1 != start_epoch:
                    ledger.set_resumed_from(sweep_loc, trial_id, record["epoch"] - 1)
            tune.report(_flat_metrics(record, trial_id))

        try:
            cfg = TrainConfig.from_dict(config["train_config"])
            result = fn(cfg, folder, on_epoch=on_epoch)
        except (KeyboardInterrupt, SystemExit) as exc:
            ledger.mark_interrupted(sweep_loc, trial_id, f"interrupted ({type(exc).__name__}: "
                                                         f"the sweep was stopped)")
            raise
        except BaseException as exc:
            deterministic = is_deterministic(exc)
            message = describe_error(exc) + (" (not retried: the same input fails the same way)"
                                             if deterministic else "")
            ledger.mark_failed(sweep_loc, trial_id, message)
            try:
                storage.write_bytes(trial_folder.error_path,
                                    traceback.format_exc().encode())
            except Exception:   # a full disk must not hide the error it caused
                pass
            if deterministic:
                return   # a normal return: Tune's max_failures does not run it again
            raise
        ledger.mark_finished(sweep_loc, trial_id, ledger.result_summary(result))

    sweep_trial.__name__ = "sweep_trial"
    return sweep_trial
