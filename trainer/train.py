"""One trial: train one (model, resolution, seed[, task]) on the store and evaluate it every epoch.

``run_trial(cfg, trial_dir)`` is what the sweep calls and what ``python -m trainer.train`` runs on
its own. The loop reads top to bottom in phases:

  1. store and identity   open + verify the store, trial id, refuse a folder of another config
  2. data                 study-level batches of one resolution (trainer/data.py)
  3. model                create_model + device, bf16 autocast / channels_last / CUDA graphs on CUDA
  4. resume               continue after the last finished epoch of checkpoints/latest.pt
  5. epochs               stage 1 (body frozen) then stage 2 (unfrozen), each a one-cycle schedule
                          (trainer/optim.py); train -> validate -> records -> checkpoints per epoch
  6. result               result.json, written last (its presence means "finished")

docs/trainer.md describes the schedule, the records and the determinism guarantees.
"""
from __future__ import annotations

import argparse
import datetime as _dt
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
import torch

from common import storage
from common.cli import UserError, run_cli
from common.schema import task_key
from common.trial_folder import TrialFolder
from trainer import checkpoint as ckpt
from trainer.augment import AugmentSettings
from trainer.config import ConfigError, TrainConfig
from trainer.data import StudyBatches, load_split, make_loader, resolve_workers
from trainer.compile import compile_model, want_compile
from trainer.graphs import GraphedTraining, want_graphs
from trainer.loop import (NonFiniteLossError, evaluate, predictions_table,  # noqa: F401
                          train_one_epoch, write_parquet)
from trainer.metrics import auroc_per_task, masked_bce_with_logits, nanmean
from trainer.optim import build_optimizer, build_scheduler, set_stage

log = logging.getLogger("trainer")


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
# The trial
# ============================================================================================

def check_trial_dir(folder: TrialFolder, cfg: TrainConfig, manifest_hash: str) -> dict | None:
    """The stored config.json, after checking it is this trial's; None for a fresh folder."""
    if not folder.exists():
        return None
    try:
        stored = folder.read_config()
        stored_cfg = TrainConfig.from_dict(stored["config"])
    except (ValueError, KeyError, UserError) as exc:
        raise TrialConfigError(f"{storage.display(folder.config_path)} is not a readable trial "
                               f"config ({exc}); use a new --out folder") from None
    diffs = [f"{k}: {stored_cfg.result_dict()[k]!r} -> {v!r}"
             for k, v in cfg.result_dict().items() if stored_cfg.result_dict()[k] != v]
    if stored.get("manifest_hash") != manifest_hash:
        diffs.append(f"store manifest_hash: {str(stored.get('manifest_hash'))[:12]} -> "
                     f"{manifest_hash[:12]}")
    if diffs:
        raise TrialConfigError(f"trial folder {folder.display()} holds a different trial "
                               f"({'; '.join(diffs)}); use a new --out folder")
    return stored


def check_store_tasks(store, cfg: TrainConfig) -> None:
    """Every task the trial trains is one the store labels (its manifest lists them)."""
    missing = [t for t in cfg.trained_tasks if t not in store.tasks]
    if missing:
        raise ConfigError(f"task(s) {', '.join(map(repr, missing))} not in store "
                          f"{storage.display(cfg.store)}, which labels: {', '.join(store.tasks)}")


def create_trial_model(cfg: TrainConfig, outputs: int, weights: str):
    """The trial's CXRNet: its model, resolution, outputs and the recipe's model options."""
    from trainer.models import create_model
    return create_model(cfg.model, cfg.resolution, outputs=outputs, weights=weights,
                        weights_dir=cfg.weights_dir or None, **cfg.model_options())


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
    folder = TrialFolder(trial_dir)

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
    check_store_tasks(store, cfg)
    manifest_hash = store.manifest_hash
    trial_id = cfg.trial_id(manifest_hash)
    stored_config = check_trial_dir(folder, cfg, manifest_hash)
    if stored_config is not None and folder.is_finished():
        return folder.read_result()
    storage.makedirs(trial_dir)
    trial_log = TrialLog(folder.log_path)
    if stored_config is None:
        folder.write_config({
            "trial_id": trial_id, "config": cfg.to_dict(), "manifest_hash": manifest_hash,
            "result_fields": list(TrainConfig.result_fields()), "git_commit": git_commit(),
            "dataset": store.manifest["dataset"], "created": _now()})
    trial_log(f"trial {trial_id} in {folder.display()}; store {storage.display(cfg.store)} "
              f"({store.manifest['dataset']}, manifest {manifest_hash[:12]}); recipe {cfg.recipe}")

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
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        # Bitwise-reproducible CPU runs (the resume guarantee rests on this).
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        # cudnn.benchmark stays off: a batch's image count varies with its studies (1-3 images
        # each), and benchmark mode re-tunes every new shape (measured: docs/benchmarks.md, cuDNN autotuning).
        torch.backends.cudnn.benchmark = False
    try:
        latest_loc = folder.latest_checkpoint
        resume = ckpt.load_latest(trial_dir)   # falls back to previous.pt when latest.pt is damaged
        torch.manual_seed(cfg.seed)  # head (and random body) initialisation
        np.random.seed(cfg.seed % 2**32)
        model = create_trial_model(cfg, len(tasks), "none" if resume else cfg.weights)
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
        # Stage 2 starts with fresh Adam moments, as fastai's Learner.unfreeze() leaves it
        # (it clears the optimizer state); cfg.carry_optimizer keeps stage 1's instead (freezing
        # only switches gradients off). The schedule is rebuilt per stage.
        history: list[dict] = []
        best: dict[str, dict] = {}
        start_epoch = 1
        optimizer = scheduler = graphs = None
        opt_stage = None
        if resume is not None:
            model.load_state_dict(resume["model"])
            history, best = list(resume["history"]), dict(resume["best"])
            start_epoch = int(resume["epoch"]) + 1
            if start_epoch <= cfg.total_epochs:
                stage = cfg.stage(start_epoch)
                same_stage = stage == resume["stage"]
                if same_stage or cfg.carry_optimizer:
                    optimizer = build_optimizer(model, cfg, stage)
                    optimizer.load_state_dict(resume["optimizer"])
                    scheduler = build_scheduler(optimizer, cfg, stage, steps_per_epoch)
                    if same_stage:
                        scheduler.load_state_dict(resume["scheduler"])
                    opt_stage = stage
            ckpt.set_rng_state(resume["rng"])
            trial_log(f"resumed after epoch {resume['epoch']}")
        # epochs.jsonl must match the checkpoint (a crash may have left one record too many).
        folder.write_epochs(history)

        # ---- 5. epochs ----------------------------------------------------------------------------
        for epoch in range(start_epoch, cfg.total_epochs + 1):
            stage = cfg.stage(epoch)
            if stage != opt_stage:  # stage boundary: a new one-cycle schedule
                if optimizer is None or not cfg.carry_optimizer:
                    optimizer = build_optimizer(model, cfg, stage)
                else:
                    set_stage(model, stage)
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
                progress=progress, graphs=graphs, aug_style=cfg.aug_style)
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
            write_parquet(folder.predictions_path(epoch),
                           predictions_table(valid_data.study_ids, keys, valid_data.labels, probs))
            record = {"epoch": epoch, "stage": stage, "train_loss": train_loss, "val_loss": val_loss,
                      **{f"auroc_{k}": aurocs[k] for k in keys},
                      "auroc_mean": nanmean(aurocs.values()),
                      "images_per_s": n_images / train_seconds if train_seconds > 0 else math.nan,
                      "epoch_seconds": time.perf_counter() - t_epoch,
                      "peak_memory_bytes": peak_memory_bytes(device)}
            history.append(record)
            folder.write_epochs(history)
            for k in keys:
                if not math.isnan(aurocs[k]) and aurocs[k] > best.get(k, {}).get("auroc", -1.0):
                    best[k] = {"epoch": epoch, "auroc": aurocs[k]}
                    ckpt.save(folder.best_checkpoint(k),
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
    folder.write_result(result)
    trial_log(f"finished: best {json.dumps(best, sort_keys=True)}")
    trial_log.flush()
    return result


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

  # the literal reading of the thesis's recipe instead of fastai's (docs/trainer.md)
  python -m trainer.train --store demo/store --model resnet50 --resolution 320 \\
      --recipe literal --out runs/literal

  # settings from a file (JSON or YAML), flags override it
  python -m trainer.train --config trial.yaml --seed 1 --out runs/s1

Rerunning on the same --out folder continues after its last finished epoch, or prints the stored
result if the trial finished. A folder of a different configuration is refused.
"""


class _OneLineErrors(argparse.ArgumentParser):
    """Bad flags are one line (run_cli prints UserError), not the usage of ~70 flags."""

    def error(self, message: str):
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    from common.config_args import add_config_arguments
    parser = _OneLineErrors(prog="python -m trainer.train", description=HELP, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="trial folder (local or s3://); rerun on it to resume")
    parser.add_argument("--config", metavar="FILE",
                        help="JSON/YAML file of TrainConfig fields (flags override it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    fields = parser.add_argument_group("trial settings (TrainConfig; docs/trainer.md)")
    add_config_arguments(fields, TrainConfig)
    fields.add_argument("--epochs", dest="epochs_unfrozen", type=int, default=argparse.SUPPRESS,
                        metavar="EPOCHS_UNFROZEN", help="the same as --epochs-unfrozen")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """defaults < --config file < flags."""
    from common import config_args
    base = TrainConfig.from_file(args.config) if args.config else None
    return config_args.config_from_args(args, TrainConfig, base=base)


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
    store = open_store(cfg.store, verify=False)
    if tuple(cfg.tasks) == tuple(TrainConfig.tasks):
        # no tasks asked for: the store's dataset decides (CheXpert's five for CheXpert), as in the sweep
        cfg = TrainConfig.from_dict({"tasks": list(store.default_tasks)}, base=cfg)
    phantom = store.is_phantom
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
