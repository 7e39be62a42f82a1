"""The Ray Tune function trainable: one grid point -> ``trainer.train.run_trial`` on its own folder.

Config in (what the sweep puts in the param space), flat metrics out (one ``tune.report`` per
epoch). The trial folder ``STORAGE/SWEEP/trials/<trial_id>`` is the checkpoint: ``run_trial``
continues from its newest checkpoint by itself, so a retry by ``FailureConfig`` or a re-run of the
sweep needs no Tune checkpoint at all. Only ``ray.tune`` APIs are used (``ray.train.*`` inside a
Tune function errors in Ray 2.60).
"""
from __future__ import annotations

import importlib
import os
import traceback
from typing import Any, Callable

from common import storage
from orchestrator import ledger

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


def epochs_on_storage(trial_dir: str) -> int:
    """Finished epochs already recorded in the trial folder (0 for a fresh trial)."""
    try:
        text = storage.read_bytes(storage.join(trial_dir, "epochs.jsonl")).decode()
    except FileNotFoundError:
        return 0
    return sum(1 for line in text.splitlines() if line.strip())


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
        folder = ledger.trial_dir(sweep_loc, trial_id)
        where = placement()
        ledger.mark_running(sweep_loc, trial_id, run_id=config["run_id"], node=where["node"],
                            gpu_ids=where["gpu_ids"],
                            cuda_visible_devices=where["cuda_visible_devices"],
                            node_id=where["node_id"],  # fake test nodes share one IP
                            resumed_from_epoch=epochs_on_storage(folder))
        try:
            cfg = TrainConfig.from_dict(config["train_config"])
            fn = load_trial_fn(trial_fn)
            result = fn(cfg, folder, on_epoch=lambda rec: tune.report(_flat_metrics(rec, trial_id)))
        except BaseException as exc:
            message = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            ledger.mark_failed(sweep_loc, trial_id, message)
            storage.write_bytes(storage.join(folder, "error.txt"),
                                traceback.format_exc().encode())
            raise
        ledger.mark_finished(sweep_loc, trial_id, ledger.result_summary(result))

    sweep_trial.__name__ = "sweep_trial"
    return sweep_trial
