"""One trial: train one (model, resolution, seed[, task]) on the store and evaluate it every epoch.

``run_trial(cfg, trial_dir)`` is what the sweep calls and what ``python -m trainer.train`` runs on
its own. The loop reads top to bottom in phases:

  1. store and identity   open + verify the store, trial id, refuse a folder of another config
  2. data                 study-level batches of one resolution (trainer/data.py)
  3. model                create_model + device, bf16 autocast / channels_last / CUDA graphs on CUDA
  4. resume               continue after the last finished epoch of checkpoints/latest.pt
  5. epochs               stage 1 (body frozen) then stage 2 (unfrozen), each a one-cycle schedule;
                          train -> validate -> records -> checkpoints after every epoch
  6. result               result.json, written last (its presence means "finished")

docs/trainer.md describes the schedule, the records and the determinism guarantees.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import io
import json
import logging
import math
import os
import resource
import subprocess
import sys
import time
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from common import storage
from common.cli import UserError, run_cli
from common.schema import task_key
from trainer import checkpoint as ckpt
from trainer.augment import AugmentSettings, to_model_input
from trainer.config import ConfigError, TrainConfig, field_help
from trainer.data import StudyBatches, load_split, make_loader, resolve_workers, segment_max
from trainer.compile import compile_model, want_compile
from trainer.graphs import GraphedTraining, want_graphs
from trainer.metrics import auroc_per_task, masked_bce_with_logits, nanmean

log = logging.getLogger("trainer")

CONFIG_NAME = "config.json"
EPOCHS_NAME = "epochs.jsonl"
RESULT_NAME = "result.json"
LOG_NAME = "log.txt"

# How often the CUDA path checks the loss for NaN/inf (each check is a CPU-GPU sync point). The CPU
# path checks every step: there it costs nothing.
CUDA_NAN_CHECK_EVERY = 25


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the trial fails instead of training on garbage."""


class TrialConfigError(UserError):
    """The trial folder holds a trial of a different configuration (never mixed)."""


# ============================================================================================
# Small helpers
# ============================================================================================

def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {cfg.device!r} asked for, but CUDA is not available here")
    return device


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")


def use_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cuda")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"


def git_commit() -> str | None:
    """The source tree's commit (with '-dirty' when it has changes); None outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated by torch (CUDA) or the process's peak resident set (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


class TrialLog:
    """log.txt of the trial (rewritten whole, so it works on s3:// too) + the 'trainer' logger."""

    def __init__(self, location: str):
        self.location = location
        try:
            self.text = storage.read_bytes(location).decode("utf-8")
        except FileNotFoundError:
            self.text = ""

    def __call__(self, message: str) -> None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.text += f"{stamp} {message}\n"
        log.info(message)

    def flush(self) -> None:
        storage.write_bytes(self.location, self.text.encode("utf-8"))


# ============================================================================================
# Optimizer and schedule
# ============================================================================================

def build_optimizer(model, cfg: TrainConfig, stage: str) -> torch.optim.AdamW:
    """Stage 'frozen': one group (head + body BatchNorm) at lr_frozen. Stage 'unfrozen': the body
    and the head as two groups with discriminative max LRs (lr_body, lr_head)."""
    if stage == "frozen":
        model.freeze_body()
        groups = [{"params": [p for p in model.parameters() if p.requires_grad],
                   "lr": cfg.lr_frozen}]
    else:
        model.unfreeze_body()
        groups = [{"params": model.body_parameters(), "lr": cfg.lr_body},
                  {"params": model.head_parameters(), "lr": cfg.lr_head}]
    return torch.optim.AdamW(groups, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def build_scheduler(optimizer, cfg: TrainConfig, stage: str, steps_per_epoch: int):
    """One cycle over the whole stage (fastai's fit_one_cycle): warm up from max/div to max over
    pct_start of the steps, then cosine-anneal to max/final_div."""
    epochs = cfg.epochs_frozen if stage == "frozen" else cfg.epochs_unfrozen
    max_lrs = [g["lr"] for g in optimizer.param_groups]
    # OneCycleLR needs at least 2 steps to have a warm-up and an annealing phase.
    total = max(2, epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lrs, total_steps=total, pct_start=cfg.onecycle_pct_start,
        div_factor=cfg.onecycle_div, final_div_factor=cfg.onecycle_final_div,
        anneal_strategy="cos", cycle_momentum=False)


# ============================================================================================
# One epoch of training, one pass of validation
# ============================================================================================

def train_one_epoch(model, loader, optimizer, scheduler, *, epoch: int, device: torch.device,
                    augment: bool, bf16: bool, channels_last: bool, progress: bool = False,
                    graphs=None) -> tuple[float, int, float]:
    """Returns (mean train loss, images seen, seconds).

    ``graphs``: a trainer.graphs.GraphedTraining for this model and stage. It replays the forward
    and backward as CUDA graphs; None runs them eagerly.
    """
    forward = model if graphs is None else graphs
    model.train()
    loader.sampler.epoch = epoch
    nan_every = 1 if device.type == "cpu" else CUDA_NAN_CHECK_EVERY
    losses: list[torch.Tensor] = []
    checked = 0
    images_seen = 0
    batches = loader
    if progress:
        from tqdm import tqdm
        batches = tqdm(loader, desc=f"epoch {epoch} train", unit="batch", leave=False)
    t0 = time.perf_counter()
    for step, batch in enumerate(batches, start=1):
        # --- batch to the device: uint8 pixels, then float/augment/normalise there ---------------
        images = batch["images"].to(device, non_blocking=True)            # N_img, 1, R, R uint8
        study_index = batch["study_index"].to(device, non_blocking=True)  # N_img
        labels = batch["labels"].to(device, non_blocking=True)            # S, T (NaN = excluded)
        params = batch["aug"].to(device, non_blocking=True) if augment else None
        x = to_model_input(images, params, channels_last)                 # N_img, 3, R, R float32

        # --- forward: image logits -> study logits (max over a study's images) -> masked BCE -----
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            image_logits = forward(x)                                     # N_img, T
        study_logits = segment_max(image_logits.float(), study_index, labels.shape[0])  # S, T
        loss = masked_bce_with_logits(study_logits, labels)

        # --- backward and update ------------------------------------------------------------------
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.detach())
        images_seen += images.shape[0]

        # --- NaN/inf check (a sync point on CUDA, hence not every step there) ---------------------
        if step % nan_every == 0:
            _check_finite(losses, checked, epoch)
            checked = len(losses)
    _check_finite(losses, checked, epoch)
    seconds = time.perf_counter() - t0
    mean_loss = float(torch.stack(losses).double().mean()) if losses else math.nan
    return mean_loss, images_seen, seconds


def _check_finite(losses: list[torch.Tensor], start: int, epoch: int) -> None:
    if start >= len(losses):
        return
    window = torch.stack(losses[start:])
    finite = torch.isfinite(window)
    if not bool(finite.all()):
        bad = start + int((~finite).nonzero()[0, 0])
        raise NonFiniteLossError(
            f"training loss is {float(window[bad - start])} at epoch {epoch}, step {bad + 1}: the "
            f"trial is stopped (lower the learning rates, or check the input data)")


@torch.no_grad()
def evaluate(model, loader, *, device: torch.device, bf16: bool, channels_last: bool,
             num_studies: int, progress: bool = False) -> np.ndarray:
    """Study logits (S, T) float32 of the whole split, in split order, without augmentation."""
    model.eval()
    logits_out = np.zeros((num_studies, 0), dtype=np.float32)
    batches = loader
    if progress:
        from tqdm import tqdm
        batches = tqdm(loader, desc="validate", unit="batch", leave=False)
    parts, positions = [], []
    for batch in batches:
        x = to_model_input(batch["images"].to(device, non_blocking=True), None, channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            image_logits = model(x)
        study_index = batch["study_index"].to(device)
        parts.append(segment_max(image_logits.float(), study_index,
                                 batch["labels"].shape[0]).cpu())
        positions.append(batch["studies"])
    if parts:
        logits_out = np.zeros((num_studies, parts[0].shape[1]), dtype=np.float32)
        logits_out[torch.cat(positions).numpy()] = torch.cat(parts).numpy()
    return logits_out


def predictions_table(study_ids: list[str], task_keys: list[str], labels: np.ndarray,
                      probs: np.ndarray) -> pa.Table:
    """Long format: one row per (study, task) labelled for that task."""
    rows_study, rows_task, rows_label, rows_prob = [], [], [], []
    for j, key in enumerate(task_keys):
        present = np.flatnonzero(~np.isnan(labels[:, j]))
        rows_study.extend(study_ids[i] for i in present)
        rows_task.extend([key] * len(present))
        rows_label.append(labels[present, j])
        rows_prob.append(probs[present, j])
    return pa.table({
        "study_id": pa.array(rows_study, pa.string()),
        "task": pa.array(rows_task, pa.string()),
        "label": pa.array(np.concatenate(rows_label).astype(np.float32)),
        "probability": pa.array(np.concatenate(rows_prob).astype(np.float32)),
    })


def _write_parquet(location: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(location, buf.getvalue())


# ============================================================================================
# The trial
# ============================================================================================

def check_trial_dir(trial_dir: str, cfg: TrainConfig, manifest_hash: str) -> dict | None:
    """The stored config.json, after checking it is this trial's; None for a fresh folder."""
    loc = storage.join(trial_dir, CONFIG_NAME)
    if not storage.exists(loc):
        return None
    try:
        stored = storage.read_json(loc)
        stored_cfg = TrainConfig.from_dict(stored["config"])
    except (ValueError, KeyError, UserError) as exc:
        raise TrialConfigError(f"{storage.display(loc)} is not a readable trial config ({exc}); "
                               f"use a new --out folder") from None
    diffs = [f"{k}: {stored_cfg.result_dict()[k]!r} -> {v!r}"
             for k, v in cfg.result_dict().items() if stored_cfg.result_dict()[k] != v]
    if stored.get("manifest_hash") != manifest_hash:
        diffs.append(f"store manifest_hash: {str(stored.get('manifest_hash'))[:12]} -> "
                     f"{manifest_hash[:12]}")
    if diffs:
        raise TrialConfigError(f"trial folder {storage.display(trial_dir)} holds a different trial "
                               f"({'; '.join(diffs)}); use a new --out folder")
    return stored


def run_trial(cfg: TrainConfig, trial_dir: str, on_epoch: Callable[[dict], None] | None = None,
              *, progress: bool = False) -> dict:
    """Train and evaluate one trial in ``trial_dir`` (local or s3://); return its result record.

    Continues after the last checkpointed epoch; returns the stored result of a finished folder;
    raises TrialConfigError for a folder of another configuration, StoreError/DataError for a store
    that cannot serve the trial, NonFiniteLossError when the loss diverges.
    """
    from preprocessing.store import open_store
    cfg.validate()
    if not cfg.store:
        raise ConfigError("store: no store location given (--store)")
    t_start = time.time()

    # ---- 1. store and identity ----------------------------------------------------------------
    store_loc = cfg.store
    if cfg.cache_dir:
        # Node-local copy of this resolution (made once per node, sha256-checked), so concurrent
        # trials on a node read local disk instead of each pulling the shards from S3.
        from preprocessing.cache import local_store
        store_loc = local_store(cfg.store, cfg.resolution, cfg.cache_dir)
    store = open_store(store_loc, verify=True, resolution=cfg.resolution)
    for split in ("train", "valid"):
        store.shards(cfg.resolution, split)  # StoreError naming what is missing
    manifest_hash = store.manifest_hash
    trial_id = cfg.trial_id(manifest_hash)
    stored_config = check_trial_dir(trial_dir, cfg, manifest_hash)
    result_loc = storage.join(trial_dir, RESULT_NAME)
    if stored_config is not None and storage.exists(result_loc):
        return storage.read_json(result_loc)
    storage.makedirs(trial_dir)
    trial_log = TrialLog(storage.join(trial_dir, LOG_NAME))
    if stored_config is None:
        storage.write_json(storage.join(trial_dir, CONFIG_NAME), {
            "trial_id": trial_id, "config": cfg.to_dict(), "manifest_hash": manifest_hash,
            "result_fields": list(TrainConfig.result_fields()), "git_commit": git_commit(),
            "dataset": store.manifest["dataset"], "created": _now()})
    trial_log(f"trial {trial_id} in {storage.display(trial_dir)}; store {storage.display(cfg.store)} "
              f"({store.manifest['dataset']}, manifest {manifest_hash[:12]})")

    # ---- 2. data ----------------------------------------------------------------------------
    tasks = cfg.trained_tasks
    keys = [task_key(t) for t in tasks]
    single = cfg.task_mode == "single"
    train_data = load_split(store, cfg.resolution, "train", tasks,
                            max_studies=cfg.max_train_studies, require_all_tasks=single)
    valid_data = load_split(store, cfg.resolution, "valid", tasks,
                            max_studies=cfg.max_valid_studies, require_all_tasks=single)
    device = resolve_device(cfg)
    workers = resolve_workers(cfg.workers)
    pin = device.type == "cuda"
    augment = AugmentSettings.from_config(cfg) if cfg.augment else None
    train_loader = make_loader(StudyBatches(train_data, cfg.batch_studies, seed=cfg.seed,
                                            augment=augment, shuffle=cfg.shuffle), workers, pin)
    valid_loader = make_loader(StudyBatches(valid_data, cfg.batch_studies, seed=cfg.seed,
                                            augment=None), workers, pin)
    steps_per_epoch = len(train_loader)
    trial_log(f"data: res{cfg.resolution}, train {train_data.num_studies} studies / "
              f"{train_data.num_images} images ({steps_per_epoch} batches), valid "
              f"{valid_data.num_studies} studies / {valid_data.num_images} images; "
              f"tasks {', '.join(keys)}; {workers} loader workers")

    # ---- 3. model and numerics ------------------------------------------------------------------
    from trainer.models import create_model
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        # Bitwise-reproducible CPU runs (the resume guarantee rests on this).
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        # cudnn.benchmark stays off: a batch's image count varies with its studies (1-3 images
        # each), and benchmark mode re-tunes every new shape (measured: docs/bench-trainer.md).
        torch.backends.cudnn.benchmark = False
    try:
        latest_loc = storage.join(trial_dir, "checkpoints", ckpt.LATEST)
        resume = ckpt.load(latest_loc) if storage.exists(latest_loc) else None
        torch.manual_seed(cfg.seed)  # head (and random body) initialisation
        np.random.seed(cfg.seed % 2**32)
        model = create_model(cfg.model, cfg.resolution, outputs=len(tasks),
                             weights="none" if resume else cfg.weights,
                             weights_dir=cfg.weights_dir or None)
        bf16, channels_last = use_bf16(cfg, device), use_channels_last(cfg, device)
        graphs_on = want_graphs(cfg.cuda_graphs, device, cfg.resolution)
        model = model.to(device, memory_format=torch.channels_last if channels_last
                         else torch.contiguous_format)
        compile_on = want_compile(cfg.compile, device, cfg.resolution)
        if compile_on:   # in place: state_dict keys, checkpoints and resume are unchanged
            compile_model(model)
        trial_log(f"model {model.name} ({cfg.weights} weights) on {device_name(device)}; "
                  f"bf16 {'on' if bf16 else 'off'}, channels_last {'on' if channels_last else 'off'}, "
                  f"CUDA graphs {'on' if graphs_on else 'off'}, compile {'on' if compile_on else 'off'}")

        # ---- 4. resume ------------------------------------------------------------------------
        history: list[dict] = []
        best: dict[str, dict] = {}
        start_epoch = 1
        optimizer = scheduler = graphs = None
        opt_stage = None
        if resume is not None:
            model.load_state_dict(resume["model"])
            history, best = list(resume["history"]), dict(resume["best"])
            start_epoch = int(resume["epoch"]) + 1
            if start_epoch <= cfg.total_epochs and cfg.stage(start_epoch) == resume["stage"]:
                opt_stage = resume["stage"]
                optimizer = build_optimizer(model, cfg, opt_stage)
                scheduler = build_scheduler(optimizer, cfg, opt_stage, steps_per_epoch)
                optimizer.load_state_dict(resume["optimizer"])
                scheduler.load_state_dict(resume["scheduler"])
            ckpt.set_rng_state(resume["rng"])
            trial_log(f"resumed after epoch {resume['epoch']}")
        # epochs.jsonl must match the checkpoint (a crash may have left one record too many).
        _write_epochs(trial_dir, history)

        # ---- 5. epochs ----------------------------------------------------------------------------
        for epoch in range(start_epoch, cfg.total_epochs + 1):
            stage = cfg.stage(epoch)
            if stage != opt_stage:  # stage boundary: new optimizer and a new one-cycle schedule
                optimizer = build_optimizer(model, cfg, stage)
                scheduler = build_scheduler(optimizer, cfg, stage, steps_per_epoch)
                opt_stage = stage
            if graphs_on and (graphs is None or graphs.stage != stage):
                graphs = GraphedTraining(model, bf16=bf16, stage=stage)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t_epoch = time.perf_counter()

            train_loss, n_images, train_seconds = train_one_epoch(
                model, train_loader, optimizer, scheduler, epoch=epoch, device=device,
                augment=augment is not None, bf16=bf16, channels_last=channels_last,
                progress=progress, graphs=graphs)
            if graphs is not None:
                trial_log(f"epoch {epoch}: CUDA graphs {graphs.stats()}")

            logits = evaluate(model, valid_loader, device=device, bf16=bf16,
                              channels_last=channels_last, num_studies=valid_data.num_studies,
                              progress=progress)
            val_loss = float(masked_bce_with_logits(torch.from_numpy(logits),
                                                    torch.from_numpy(valid_data.labels)))
            probs = torch.sigmoid(torch.from_numpy(logits)).numpy()
            aurocs = auroc_per_task(valid_data.labels, probs, keys)

            # ---- records: predictions, epoch record, best checkpoints, latest checkpoint -------
            _write_parquet(storage.join(trial_dir, "predictions", f"epoch-{epoch:03d}.parquet"),
                           predictions_table(valid_data.study_ids, keys, valid_data.labels, probs))
            record = {"epoch": epoch, "stage": stage, "train_loss": train_loss, "val_loss": val_loss,
                      **{f"auroc_{k}": aurocs[k] for k in keys},
                      "auroc_mean": nanmean(aurocs.values()),
                      "images_per_s": n_images / train_seconds if train_seconds > 0 else math.nan,
                      "epoch_seconds": time.perf_counter() - t_epoch,
                      "peak_memory_bytes": peak_memory_bytes(device)}
            history.append(record)
            _write_epochs(trial_dir, history)
            for k in keys:
                if not math.isnan(aurocs[k]) and aurocs[k] > best.get(k, {}).get("auroc", -1.0):
                    best[k] = {"epoch": epoch, "auroc": aurocs[k]}
                    ckpt.save(storage.join(trial_dir, "checkpoints", ckpt.best_name(k)),
                              {"model": model.state_dict(), "epoch": epoch, "auroc": aurocs[k],
                               "task": k, "trial_id": trial_id})
            # latest.pt is the commit point of the epoch: written after everything it describes.
            ckpt.save(latest_loc, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "stage": stage, "epoch": epoch,
                "rng": ckpt.rng_state(), "history": history, "best": best,
                "config": cfg.to_dict(), "trial_id": trial_id})
            trial_log(f"epoch {epoch} ({stage}): train_loss {train_loss:.4f} val_loss "
                      f"{val_loss:.4f} auroc_mean {record['auroc_mean']:.4f} "
                      f"({record['images_per_s']:.1f} img/s, {record['epoch_seconds']:.1f} s)")
            trial_log.flush()
            if on_epoch is not None:
                on_epoch(dict(record))
    finally:
        torch.use_deterministic_algorithms(deterministic_before)

    # ---- 6. result ------------------------------------------------------------------------------
    train_seconds_total = sum(r["epoch_seconds"] for r in history)
    result = {
        "trial_id": trial_id, "config": cfg.to_dict(), "manifest_hash": manifest_hash,
        "dataset": store.manifest["dataset"],
        "tasks": keys, "best": best, "history": history,
        "images_per_s": float(np.mean([r["images_per_s"] for r in history])),
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in history),
        "seconds": train_seconds_total, "wall_seconds_this_run": time.time() - t_start,
        "device": device_name(device), "git_commit": git_commit(), "finished": _now()}
    storage.write_json(result_loc, result)
    trial_log(f"finished: best {json.dumps(best, sort_keys=True)}")
    trial_log.flush()
    return result


def _write_epochs(trial_dir: str, history: list[dict]) -> None:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in history)
    storage.write_bytes(storage.join(trial_dir, EPOCHS_NAME), text.encode("utf-8"))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ============================================================================================
# Command line
# ============================================================================================

HELP = "Train and evaluate one trial (one model, resolution, seed[, task]) on a store."
EPILOG = """examples:
  # a quick CPU smoke run on the demo phantom store
  python -m trainer.train --store demo/store --model resnet18 --resolution 160 --seed 0 \\
      --weights none --epochs-frozen 1 --epochs 1 --max-train-studies 200 --out runs/smoke

  # the thesis protocol for one grid point (ImageNet weights from the cache, bf16 on a GPU)
  python -m trainer.train --store s3://bucket/store --model densenet121 --resolution 320 \\
      --seed 3 --out runs/r320-densenet121-s3

  # one binary model per task, as in the thesis
  python -m trainer.train --store demo/store --model efficientnet --resolution 240 \\
      --task-mode single --task Cardiomegaly --out runs/cardio

  # settings from a file (JSON or YAML), flags override it
  python -m trainer.train --config trial.yaml --seed 1 --out runs/s1

Rerunning on the same --out folder continues after its last finished epoch, or prints the stored
result if the trial finished. A folder of a different configuration is refused.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.train", description=HELP,
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="trial folder (local or s3://); rerun on it to resume")
    parser.add_argument("--config", metavar="FILE",
                        help="JSON/YAML file of TrainConfig fields (flags override it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    helps = field_help()
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        names = [flag, "--epochs"] if f.name == "epochs_unfrozen" else [flag]
        default = getattr(defaults, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        text = f"{helps.get(f.name, '')} (default: {shown!r})".replace("%", "%%")
        if f.type in (bool, "bool"):
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=text)
        else:
            kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else
                                                     getattr(f.type, "__name__", ""), str)
            parser.add_argument(*names, dest=f.name, type=kind, default=argparse.SUPPRESS,
                                metavar=f.name.upper(), help=text)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """defaults < --config file < flags."""
    base = TrainConfig.from_file(args.config) if args.config else TrainConfig()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if hasattr(args, f.name)}
    return TrainConfig.from_dict(given, base=base)


def format_result(result: dict) -> str:
    lines = [f"trial {result['trial_id']}  ({result['device']}, {result['seconds']:.1f} s, "
             f"{result['images_per_s']:.1f} train img/s, peak memory "
             f"{result['peak_memory_bytes'] / 2**20:.0f} MiB)", ""]
    keys = result["tasks"]
    head = f"{'epoch':>5} {'stage':>8} {'train_loss':>10} {'val_loss':>9} " + \
        " ".join(f"{k[:12]:>12}" for k in keys) + f" {'mean':>7}"
    lines.append(head)
    for r in result["history"]:
        lines.append(f"{r['epoch']:>5} {r['stage']:>8} {r['train_loss']:>10.4f} {r['val_loss']:>9.4f} "
                     + " ".join(f"{r['auroc_' + k]:>12.4f}" for k in keys)
                     + f" {r['auroc_mean']:>7.4f}")
    lines.append("")
    lines.append("best epoch per task: " + ", ".join(
        f"{k} {b['auroc']:.4f} (epoch {b['epoch']})" for k, b in sorted(result["best"].items())))
    return "\n".join(lines)


PHANTOM_BANNER = ("*** SYNTHETIC PHANTOM DATA: this store is the built-in phantom, not CheXpert; "
                  "its AUROCs say nothing about chest radiographs ***")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if not cfg.store:
        raise ConfigError("--store: no store location given")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from preprocessing.store import open_store
    phantom = open_store(cfg.store, verify=False).is_phantom
    if phantom:
        print(PHANTOM_BANNER, file=sys.stderr)

    def on_epoch(record: dict) -> None:
        if not args.quiet:
            print(f"epoch {record['epoch']} ({record['stage']}): train_loss {record['train_loss']:.4f}"
                  f" val_loss {record['val_loss']:.4f} auroc_mean {record['auroc_mean']:.4f} "
                  f"[{record['images_per_s']:.1f} img/s]", file=sys.stderr)

    try:
        result = run_trial(cfg, args.out, on_epoch=on_epoch, progress=not args.quiet)
    except NonFiniteLossError as exc:
        print(f"trainer.train: error: {exc}", file=sys.stderr)
        return 1
    print(format_result(result))
    if phantom:
        print(PHANTOM_BANNER)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="trainer.train"))
