"""Shared pieces of the sweep tests: a tiny real store, a fake trial function with the contract of
``trainer.train.run_trial`` (records, checkpoints, resume), and Ray housekeeping.

The fake keeps the orchestration tests fast (no torch); the end-to-end tests use the real trainer.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import time

import numpy as np
from PIL import Image

from common import storage
from common.schema import TASKS, task_key

HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *TASKS]


def ray_env(mp) -> str:
    """Point every file Ray writes at a fresh short temp dir (Ray housekeeping: nothing under /tmp/ray) and
    return it. Short because Ray's Unix socket paths live below it (~107 bytes at most)."""
    import secrets
    import tempfile
    base = tempfile.mkdtemp(prefix="sw", dir="/tmp")
    token = os.path.join(base, "token")
    with open(token, "w") as f:
        f.write(secrets.token_hex(32))
    os.chmod(token, 0o600)
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    mp.setenv("RAY_TMPDIR", base)
    mp.setenv("TMPDIR", base)
    mp.setenv("CXR_RAY_DIR", base)
    mp.setenv("RAY_AUTH_TOKEN_PATH", token)
    mp.setenv("HOME", base)          # ~/.ray/auth_token would land here, not in the real home
    mp.setenv("RAY_AUTH_MODE", "token")   # ray.init sets it in os.environ; this way it is undone
    mp.delenv("RAY_ADDRESS", raising=False)
    refresh_ray_auth()
    return base


def refresh_ray_auth() -> None:
    """Make this process re-read RAY_AUTH_MODE and the token (Ray caches both at import)."""
    from orchestrator.local_ray import _reset_token_cache
    _reset_token_cache()


def make_tiny_store(root, resolutions=(32, 40, 48), n_train=4, n_valid=2) -> str:
    """A real (built, verifiable) store of a few noise images."""
    from preprocessing import build
    root = str(root)
    rng = np.random.default_rng(0)
    rows = {"train": [], "valid": []}
    for split, n in (("train", n_train), ("valid", n_valid)):
        for i in range(n):
            path = f"CheXpert-v1.0/{split}/patient{i + (0 if split == 'train' else 100):05d}/study1/view1_frontal.jpg"
            full = os.path.join(root, "src", path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(full, quality=95)
            labels = ["1.0" if (i + j) % 2 else "0.0" for j in range(len(TASKS))]
            rows[split].append([path, "Female", "60", "Frontal", "PA", *labels])
    csvs = []
    for split in ("train", "valid"):
        p = os.path.join(root, f"{split}.csv")
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(HEADER)
            w.writerows(rows[split])
        csvs.append(p)
    out = os.path.join(root, "store")
    build.build_store(os.path.join(root, "src"), csvs, out, resolutions=list(resolutions),
                      use_ray=False, progress=False)
    return out


def run_small_sweep(store, storage_loc, name, *, config=None, trial_fn=None, out=None,
                    callbacks=(), **fields):
    """``run_sweep`` with SweepConfig fields as keywords and ``config`` the TrainConfig values."""
    from orchestrator.sweep import run_sweep
    from orchestrator.sweep_config import SweepConfig
    from trainer.config import TrainConfig
    sweep = SweepConfig(store=str(store), storage=str(storage_loc), name=name, **fields)
    return run_sweep(sweep, TrainConfig.from_dict(dict(config or {})), callbacks,
                     trial_fn=trial_fn, out=out)


def _det(*parts) -> float:
    h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return int(h[:12], 16) / float(16 ** 12)


class FakeTrial:
    """Callable with run_trial's signature and folder contract, minus the training.

    Each epoch: sleeps ``epoch_seconds``, derives deterministic metrics from (config, epoch and the
    previous epoch's state carried in the checkpoint), writes epochs.jsonl, checkpoints/latest.json,
    then calls on_epoch. ``fail`` = {trial-id substring: epoch} raises once, after that epoch's
    checkpoint, the first time (a marker file in ``marker_dir`` remembers). Every executed epoch
    is also appended to executions.jsonl (pid, epoch, start time) so tests can see resumes.
    """

    def __init__(self, epoch_seconds: float = 0.0, fail: dict | None = None, marker_dir: str = "",
                 fail_always: bool = False):
        self.epoch_seconds = epoch_seconds
        self.fail = dict(fail or {})
        self.marker_dir = marker_dir
        self.fail_always = fail_always

    @staticmethod
    def resume_epoch(trial_dir) -> int:
        """The epoch its checkpoint holds (the sweep's ledger records where an attempt resumed)."""
        latest = storage.join(trial_dir, "checkpoints", "latest.json")
        return storage.read_json(latest)["epoch"] if storage.exists(latest) else 0

    def __call__(self, cfg, trial_dir, on_epoch=None):
        from preprocessing.store import open_store
        store = open_store(cfg.store, verify=False, resolution=cfg.resolution)
        trial_id = cfg.trial_id(store.manifest_hash)
        result_loc = storage.join(trial_dir, "result.json")
        if storage.exists(result_loc):
            return storage.read_json(result_loc)
        storage.makedirs(trial_dir)
        latest = storage.join(trial_dir, "checkpoints", "latest.json")
        state = storage.read_json(latest) if storage.exists(latest) else {"epoch": 0, "acc": 0.0,
                                                                         "history": []}
        if not storage.exists(storage.join(trial_dir, "config.json")):
            storage.write_json(storage.join(trial_dir, "config.json"),
                               {"trial_id": trial_id, "config": cfg.to_dict(),
                                "manifest_hash": store.manifest_hash})
        keys = [task_key(t) for t in cfg.trained_tasks]
        history = list(state["history"])
        for epoch in range(state["epoch"] + 1, cfg.total_epochs + 1):
            t0 = time.time()
            _append(storage.join(trial_dir, "executions.jsonl"),
                    {"pid": os.getpid(), "epoch": epoch, "t": t0,
                     "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")})
            if self.epoch_seconds:
                time.sleep(self.epoch_seconds)
            acc = state["acc"] + _det(trial_id, epoch)
            aurocs = {k: 0.5 + 0.5 * _det(trial_id, epoch, k, acc) for k in keys}
            record = {"epoch": epoch, "stage": cfg.stage(epoch), "train_loss": 1.0 / epoch,
                      "val_loss": 1.0 / (epoch + acc), **{f"auroc_{k}": v for k, v in aurocs.items()},
                      "auroc_mean": float(np.mean(list(aurocs.values()))), "images_per_s": 1.0,
                      "epoch_seconds": time.time() - t0, "peak_memory_bytes": 0}
            history.append(record)
            storage.write_bytes(storage.join(trial_dir, "epochs.jsonl"),
                                "".join(json.dumps(r) + "\n" for r in history).encode())
            state = {"epoch": epoch, "acc": acc, "history": history}
            storage.write_json(latest, state)
            if on_epoch is not None:
                on_epoch(dict(record))
            for needle, at in self.fail.items():
                if needle in trial_id and epoch == at:
                    marker = os.path.join(self.marker_dir, f"failed-{trial_id}")
                    if self.fail_always or not os.path.exists(marker):
                        open(marker, "a").close()
                        raise RuntimeError(f"injected failure after epoch {epoch}")
        best = {}
        for k in keys:
            top = max(history, key=lambda r: r[f"auroc_{k}"])
            best[k] = {"epoch": top["epoch"], "auroc": top[f"auroc_{k}"]}
        result = {"trial_id": trial_id, "config": cfg.to_dict(), "manifest_hash": store.manifest_hash,
                  "best": best, "history": history, "images_per_s": 1.0, "peak_memory_bytes": 0,
                  "seconds": sum(r["epoch_seconds"] for r in history), "device": "fake",
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        storage.write_json(result_loc, result)
        return result


def _append(location: str, record: dict) -> None:
    try:
        old = storage.read_bytes(location)
    except FileNotFoundError:
        old = b""
    storage.write_bytes(location, old + (json.dumps(record) + "\n").encode())


def read_jsonl(location: str) -> list[dict]:
    try:
        text = storage.read_bytes(location).decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def stable_result(result: dict) -> dict:
    """A result without wall-clock fields, for exact comparisons between runs."""
    drop = {"epoch_seconds", "images_per_s", "peak_memory_bytes"}
    return {"best": result["best"],
            "history": [{k: v for k, v in r.items() if k not in drop} for r in result["history"]]}


def by_value():
    """Ship this module's code to Ray workers by value (tests/ is not importable there)."""
    import sys

    from ray import cloudpickle   # Ray's vendored copy is the one that pickles tasks
    cloudpickle.register_pickle_by_value(sys.modules[__name__])


@contextlib.contextmanager
def local_ray(num_gpus: int = 0, by_value_modules=()):
    """A private local Ray for one test module (2 CPUs, ``num_gpus`` fake GPUs, all its files in a
    temporary folder), stopped and cleaned up afterwards. ``by_value_modules``: further test modules
    whose code Ray workers need."""
    import shutil
    import sys

    import pytest
    import ray
    from ray import cloudpickle
    mp = pytest.MonkeyPatch()
    base = ray_env(mp)
    by_value()
    for name in by_value_modules:
        cloudpickle.register_pickle_by_value(sys.modules[name])
    assert not ray.is_initialized()
    ray.init(address="local", num_cpus=2, num_gpus=num_gpus, include_dashboard=False,
             _temp_dir=os.path.join(base, "r"), logging_level="WARNING", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        mp.undo()
        refresh_ray_auth()
        shutil.rmtree(base, ignore_errors=True)


class RealTrialFailingOnce:
    """trainer.train.run_trial, raising once right after epoch ``epoch`` was recorded (its
    checkpoint is written before on_epoch), the first time only (marker file in marker_dir)."""

    def __init__(self, marker_dir: str, epoch: int = 1):
        self.marker_dir = marker_dir
        self.epoch = epoch

    def __call__(self, cfg, trial_dir, on_epoch=None):
        from trainer.train import run_trial
        marker = os.path.join(self.marker_dir, "failed-once")

        def hook(record):
            if on_epoch is not None:
                on_epoch(record)
            if record["epoch"] == self.epoch and not os.path.exists(marker):
                open(marker, "a").close()
                raise RuntimeError(f"injected failure after epoch {record['epoch']}")

        return run_trial(cfg, trial_dir, on_epoch=hook)
