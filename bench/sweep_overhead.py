"""``python -m bench.sweep_overhead``: what the sweep machinery costs on top of the trials.

Runs a real sweep (ledger, Tune, progress view, embedded local Ray) of N trials whose trial
function only sleeps (``SleepTrial``: run_trial's signature and folder records, no training), so
every second beyond the sleeping is orchestration. Reports:

* overhead per trial (wall seconds beyond the sleeping, once the first trial started, per trial)
  and the driver's resident memory over the run;
* with ``--aggregate``, the aggregator's time on the finished sweep (its trials write predictions
  per epoch, as real ones do);

* wall time of the sweep against the ideal ``sum(trial times) / slots`` (with and without the
  embedded Ray's start-up);
* with fake GPUs (``--fake-gpus G``): the share of time every GPU slot is busy while trials remain
  (from the first trial start to the last trial start), from the ledger's per-trial node/GPU/times.

Trial times come from the ledger (trainable start to finish), so the per-trial start-up of a Ray
worker process is counted as overhead, as it should be.
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import sys
import tempfile
import time

from common import storage
from common.cli import HelpFormatter, run_cli
from common.trial_folder import TrialFolder

EPILOG = """examples:
  python -m bench.sweep_overhead --trials 8 --epochs 2 --epoch-seconds 15 --slots 2
  python -m bench.sweep_overhead --trials 8 --epochs 2 --epoch-seconds 15 --fake-gpus 4
  python -m bench.sweep_overhead --trials 500 --epochs 2 --epoch-seconds 0.05 --aggregate   # load
"""


class SleepTrial:
    """A trial function with run_trial's contract whose epochs only sleep.

    It writes what a real trial writes (config.json, epochs.jsonl, per-epoch validation
    predictions through the trainer's own predictions_table, result.json with the best epoch per
    task), with scores drawn from a seeded generator, so that the aggregator reads and tests a
    realistic sweep."""

    def __init__(self, epoch_seconds: float, studies: int = 200):
        self.epoch_seconds = float(epoch_seconds)
        self.studies = int(studies)

    def __call__(self, cfg, trial_dir, on_epoch=None):
        import hashlib

        import numpy as np
        from sklearn.metrics import roc_auc_score

        from common.schema import task_key
        from trainer.loop import predictions_table, write_parquet
        folder = TrialFolder(trial_dir)
        if folder.is_finished():
            return folder.read_result()
        storage.makedirs(trial_dir)
        trial_id = os.path.basename(trial_dir)
        folder.write_config({"trial_id": trial_id, "config": cfg.to_dict(), "manifest_hash": ""})
        keys = [task_key(t) for t in cfg.trained_tasks]
        labels_rng = np.random.default_rng(0)            # the same validation studies in every trial
        labels = (labels_rng.random((self.studies, len(keys))) < 0.3).astype(np.float32)
        studies = [f"study{i:05d}" for i in range(self.studies)]
        seed = int.from_bytes(hashlib.sha256(trial_id.encode()).digest()[:4], "little")
        history = []
        for epoch in range(1, cfg.total_epochs + 1):
            t0 = time.time()
            time.sleep(self.epoch_seconds)
            scores = np.random.default_rng([seed, epoch]).random(labels.shape) + 0.3 * labels
            write_parquet(folder.predictions_path(epoch), predictions_table(studies, keys, labels, scores))
            aurocs = {k: float(roc_auc_score(labels[:, j], scores[:, j])) for j, k in enumerate(keys)}
            record = {"epoch": epoch, "stage": cfg.stage(epoch), "train_loss": 0.0, "val_loss": 0.0,
                      **{f"auroc_{k}": v for k, v in aurocs.items()},
                      "auroc_mean": float(np.mean(list(aurocs.values()))), "images_per_s": 0.0,
                      "epoch_seconds": time.time() - t0, "peak_memory_bytes": 0}
            history.append(record)
            folder.write_epochs(history)
            if on_epoch is not None:
                on_epoch(dict(record))
        best = {k: {"epoch": max(history, key=lambda r: r[f"auroc_{k}"])["epoch"],
                    "auroc": max(r[f"auroc_{k}"] for r in history)} for k in keys}
        result = {"trial_id": trial_id, "config": cfg.to_dict(), "manifest_hash": "", "best": best,
                  "history": history, "images_per_s": 0.0, "peak_memory_bytes": 0, "device": "sleep",
                  "seconds": sum(r["epoch_seconds"] for r in history),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        folder.write_result(result)
        return result


class DriverMemory:
    """This process's resident memory, sampled every ``interval`` seconds on a thread."""

    def __init__(self, interval: float = 1.0):
        import threading
        self.interval = interval
        self.samples: list[tuple[float, float]] = []      # (seconds since start, MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.time()

    @staticmethod
    def rss_mib() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.time() - self._t0, self.rss_mib()))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append((time.time() - self._t0, self.rss_mib()))

    def summary(self, points: int = 6) -> dict:
        values = [m for _, m in self.samples]
        picks = [self.samples[round(i * (len(self.samples) - 1) / (points - 1))] for i in range(points)]
        return {"start_mib": round(values[0]), "max_mib": round(max(values)), "end_mib": round(values[-1]),
                "over_time": [[round(t), round(m)] for t, m in picks]}


def _ts(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


def busy_share(intervals: dict[tuple, list[tuple[float, float]]], slots: int, start: float,
               end: float) -> float:
    """Share of slot-time in [start, end] during which the slots hold a trial."""
    if end <= start:
        return 1.0
    busy = 0.0
    for spans in intervals.values():
        for a, b in spans:
            busy += max(0.0, min(b, end) - max(a, start))
    return busy / (slots * (end - start))


def tiny_store(root: str) -> str:
    from preprocessing.build import build_store
    from preprocessing.phantom import make_phantom
    images = os.path.join(root, "phantom")
    make_phantom(images, studies=8, seed=0, min_size=64, max_size=72)
    out = os.path.join(root, "store")
    build_store(images, [os.path.join(images, "train.csv"), os.path.join(images, "valid.csv")], out,
                resolutions=[32], use_ray=False, progress=False)
    return out


def bench(trials: int, epochs: int, epoch_seconds: float, slots: int, fake_gpus: int,
          workdir: str, reuse_actors: bool = True, aggregate: bool = False) -> dict:
    from orchestrator import ledger
    from orchestrator.sweep import run_sweep
    from orchestrator.sweep_config import SweepConfig
    from trainer.config import TrainConfig
    store = tiny_store(workdir)
    per_trial_gpu = 1 if fake_gpus else 0
    num_cpus = max(slots, fake_gpus)   # sleeping trials need no real CPU: logical CPUs suffice
    n_slots = fake_gpus if fake_gpus else slots
    t0 = time.time()
    sweep = SweepConfig(resolutions=(32,), models=("resnet18",), seeds=tuple(range(trials)),
                        store=store, storage=os.path.join(workdir, "sweeps"), name="bench",
                        cpus_per_trial=1, gpus_per_trial=str(per_trial_gpu), num_cpus=num_cpus,
                        num_gpus=fake_gpus, max_failures=0, progress="lines",
                        progress_interval=3600, aggregate=False, log=(),
                        reuse_actors=reuse_actors)
    train = TrainConfig.from_dict({"epochs_frozen": 1, "epochs_unfrozen": epochs - 1,
                                   "weights": "none"})
    with DriverMemory() as memory:
        res = run_sweep(sweep, train, trial_fn=SleepTrial(epoch_seconds), out=io.StringIO())
    wall = time.time() - t0
    entries = ledger.read_all(res.sweep_loc)
    spans, per_slot = [], {}
    for e in entries.values():
        for h in e["history"]:
            a, b = _ts(h["started"]), _ts(h["ended"])
            spans.append((a, b))
            per_slot.setdefault((h.get("node_id"), tuple(h.get("gpu_ids") or [])), []).append((a, b))
    trial_seconds = sum(b - a for a, b in spans)
    ideal = trial_seconds / n_slots
    first_start, last_start = min(a for a, _ in spans), max(a for a, _ in spans)
    last_end = max(b for _, b in spans)
    out = {"reuse_actors": reuse_actors, "trials": trials, "epochs": epochs,
           "epoch_seconds": epoch_seconds, "slots": n_slots,
           "fake_gpus": fake_gpus, "finished": sum(e["state"] == "finished" for e in entries.values()),
           "wall_s": round(wall, 1), "first_trial_start_after_s": round(first_start - t0, 1),
           "trials_wall_s": round(last_end - first_start, 1),
           "sum_trial_s": round(trial_seconds, 1), "ideal_s": round(ideal, 1),
           "sleep_ideal_s": round(trials * epochs * epoch_seconds / n_slots, 1),
           "overhead_total": round(wall / ideal - 1, 4),
           "overhead_after_ray_start": round((last_end - first_start) / ideal - 1, 4),
           # wall seconds beyond the sleeping, per trial, once the first trial started
           "overhead_per_trial_s": round(((last_end - first_start)
                                          - trials * epochs * epoch_seconds / n_slots) / trials, 3),
           "driver_memory": memory.summary()}
    if aggregate:
        from analysis.aggregate import aggregate_sweep
        a0, c0 = time.time(), time.process_time()
        summary = aggregate_sweep(res.sweep_loc, figures=True, report=True)
        out["aggregator"] = {"wall_s": round(time.time() - a0, 1),
                             "cpu_s": round(time.process_time() - c0, 1),
                             "files": len(summary.files)}
    if fake_gpus:
        out["gpu_slots_seen"] = len(per_slot)
        out["gpu_busy_share_while_trials_remain"] = round(
            busy_share(per_slot, n_slots, first_start, last_start), 4)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sweep_overhead",
                                description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=HelpFormatter)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial (>= 2)")
    p.add_argument("--epoch-seconds", type=float, default=15.0, help="sleep per epoch")
    p.add_argument("--slots", type=int, default=2, help="concurrent trials (CPUs of the local Ray)")
    p.add_argument("--fake-gpus", type=int, default=0, help="pin trials to this many fake GPUs")
    p.add_argument("--no-reuse-actors", action="store_true", help="a fresh process per trial")
    p.add_argument("--workdir", default=None, help="where the store and sweep go (default: temp)")
    p.add_argument("--aggregate", action="store_true",
                   help="then time the aggregator (tables, figures, report) on the finished sweep")
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="cxr-bench-")
    result = bench(args.trials, max(2, args.epochs), args.epoch_seconds, args.slots, args.fake_gpus,
                   workdir, reuse_actors=not args.no_reuse_actors, aggregate=args.aggregate)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="bench.sweep_overhead"))
