"""``--log tensorboard,mlflow,wandb``: Ray Tune's own logger callbacks, fed every epoch's flat
record (``train_loss``, ``val_loss``, ``auroc_<task_key>`` per task, ``auroc_mean``,
``images_per_s``, ...; docs/architecture.md) with the epoch as the step.

=============  ===============================================================================
tracker        where the runs go
=============  ===============================================================================
tensorboard    ``STORAGE/NAME/tune/<run id>/<trial id>/events.out.tfevents.*`` (one folder per
               trial and driver run): ``tensorboard --logdir STORAGE/NAME/tune``
mlflow         one run per trial in the experiment NAME at ``--mlflow-tracking-uri``, else
               ``MLFLOW_TRACKING_URI``, else the SQLite store ``STORAGE/NAME/mlflow.db`` (local
               storage) or ``./mlflow.db`` (``mlflow ui --backend-store-uri sqlite:///...``)
wandb          one run per trial in ``--wandb-project``, grouped by NAME; ``WANDB_MODE=offline``
               writes to ``./wandb`` (local storage: ``STORAGE/NAME/wandb``) without an account
=============  ===============================================================================

Tune's own CSV and JSON records stay on for every run (they sit next to the TensorBoard files).
``run_sweep(..., callbacks=[...])`` adds any other ``ray.tune.Callback`` from Python.
"""
from __future__ import annotations

import importlib.util
import os

from common import storage
from common.cli import UserError
from orchestrator.sweep_config import SweepConfig

_PACKAGES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}


def check(sweep: SweepConfig) -> None:
    """Fail before anything starts when a tracker's package is missing."""
    for name in sweep.log:
        package = _PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise UserError(f"--log {name}: the {package} package is not installed "
                            f"(pip install 'cxr-sweep[trackers]')")


def mlflow_tracking_uri(sweep: SweepConfig) -> str:
    if sweep.mlflow_tracking_uri:
        return sweep.mlflow_tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = sweep.folder.location if not storage.is_remote(sweep.storage) else os.getcwd()
    os.makedirs(root, exist_ok=True)
    # MLflow 3 keeps its plain-file store in maintenance mode; SQLite is its local default.
    return "sqlite:///" + os.path.join(root, "mlflow.db")


def wandb_dir(sweep: SweepConfig) -> str:
    root = sweep.folder.location if not storage.is_remote(sweep.storage) else os.getcwd()
    path = os.path.join(root, "wandb")
    os.makedirs(path, exist_ok=True)
    return path


def callbacks(sweep: SweepConfig) -> list:
    """The Tune callbacks of ``sweep.log`` (plus Tune's CSV and JSON records)."""
    # Tune adds its CSV, JSON and TensorBoard loggers by itself unless told not to; the sweep
    # adds them itself so that --log decides about TensorBoard.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback
    out = [CSVLoggerCallback(), JsonLoggerCallback()]
    if "tensorboard" in sweep.log:
        out.append(TBXLoggerCallback())
    if "mlflow" in sweep.log:
        from ray.air.integrations.mlflow import MLflowLoggerCallback
        out.append(MLflowLoggerCallback(tracking_uri=mlflow_tracking_uri(sweep),
                                        experiment_name=sweep.name, tags={"sweep": sweep.name},
                                        save_artifact=False))
    if "wandb" in sweep.log:
        from ray.air.integrations.wandb import WandbLoggerCallback
        # W&B logs from a Ray actor, which does not see variables set after Ray started.
        mode = {"mode": os.environ["WANDB_MODE"]} if os.environ.get("WANDB_MODE") else {}
        out.append(WandbLoggerCallback(project=sweep.wandb_project, group=sweep.name,
                                       dir=wandb_dir(sweep), **mode))
    return out
