"""The real loader in the GPU check: a phantom store built on the fly, the trainer's StudyBatches
in DataLoader workers, the loader's own rate, and a Trial stepping on it.

``loader_steps`` is the number the issue cares about: the step fed by the loader against the same
step on a synthetic batch already on the device (bench/gpu/trial.py). The gap is the loader's cost.
"""
from __future__ import annotations

import os
import time

import torch

from bench.gpu.measure import Budget, error_text
from bench.gpu.trial import BATCH, Trial, time_steps

#: Loader warm-up epochs for a CUDA-graph trial (each new batch shape is captured once).
GRAPH_WARMUP_EPOCHS = 6


def build_phantom_store(root: str, studies: int, resolutions: list[int], source_size: int,
                        workers: int) -> dict:
    """A small phantom store at ``resolutions``: square phantom images of ``source_size`` px, then
    the store build in this process (no Ray), as ``python -m preprocessing build --no-ray`` does."""
    from preprocessing.build import build_store
    from preprocessing.phantom import make_phantom
    t0 = time.perf_counter()
    src = os.path.join(root, "phantom")
    make_phantom(src, studies=studies, seed=0, min_size=source_size, max_size=source_size, square=True,
                 workers=max(1, workers))
    t1 = time.perf_counter()
    out = os.path.join(root, "store")
    manifest = build_store(src, [os.path.join(src, "train.csv"), os.path.join(src, "valid.csv")], out,
                           resolutions=resolutions, use_ray=False, progress=False)
    t2 = time.perf_counter()
    per_split = manifest["counts"]["per_split"]
    return {"location": out, "studies": studies, "source_size": source_size,
            "resolutions": manifest["resolutions"], "encoding": manifest["encoding"],
            "images": {s: c["stored"] for s, c in per_split.items()},
            "phantom_seconds": t1 - t0, "build_seconds": t2 - t1}


class MultiEpochSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, batch)`` for epochs 1..E in one pass, so one DataLoader iterator (workers
    forked once) covers many epochs of a small store, as one long CheXpert epoch would."""

    def __init__(self, num_batches: int, epochs: int):
        self.num_batches, self.epochs = num_batches, epochs

    def __iter__(self):
        return iter([(e, b) for e in range(1, self.epochs + 1) for b in range(self.num_batches)])

    def __len__(self) -> int:
        return self.num_batches * self.epochs


def make_store_loader(store_loc: str, resolution: int, workers: int, pin: bool, epochs: int = 10_000):
    from common.schema import TASKS
    from preprocessing.store import open_store
    from trainer.augment import AugmentSettings
    from trainer.data import StudyBatches, load_split
    store = open_store(store_loc, verify=False)
    data = load_split(store, resolution, "train", tuple(TASKS))
    batches = StudyBatches(data, BATCH["studies"], seed=0, augment=AugmentSettings())
    kwargs: dict = {}
    if workers > 0:
        import multiprocessing as mp
        if "fork" in mp.get_all_start_methods():
            kwargs["multiprocessing_context"] = "fork"
        kwargs["prefetch_factor"] = 4
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=MultiEpochSampler(len(batches), epochs),
        num_workers=workers, pin_memory=pin, generator=torch.Generator().manual_seed(0), **kwargs)
    return loader, len(batches), data.num_images


def loader_only(store_loc: str, resolution: int, workers: int, pin: bool, seconds: float) -> dict:
    """The loader's own rate (read, decode, augmentation parameters, collate, pin): no step."""
    loader, per_epoch, n_images = make_store_loader(store_loc, resolution, workers, pin)
    it = iter(loader)
    for _ in range(min(per_epoch, 2 * max(1, workers))):   # let every worker start
        next(it)
    images = batches = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or batches < 2:
        images += int(next(it)["images"].shape[0])
        batches += 1
    elapsed = time.perf_counter() - start
    del it
    return {"loader_only_images_per_s": images / elapsed, "loader_only_batches": batches,
            "loader_only_images_per_s_per_worker": images / elapsed / max(1, workers)}


def loader_steps(trial: Trial, store_loc: str, workers: int, seconds: float, budget: Budget) -> dict:
    """The trial stepping on the real loader: one warm-up epoch (every batch shape once, so cuDNN's
    autotuning is not timed), then the timed loop."""
    dev = trial.device
    loader, per_epoch, n_images = make_store_loader(store_loc, trial.resolution, workers,
                                                    pin=dev.type == "cuda")
    it = iter(loader)
    # With CUDA graphs every new image count is a capture: warm up over several epochs (several
    # shuffles) so that most shapes are captured before the timed window, which reports the rest.
    warmup = max(per_epoch, 2) * (GRAPH_WARMUP_EPOCHS if trial.graphs is not None else 1)
    out = time_steps(trial, it, warmup_steps=warmup, min_steps=4, seconds=seconds, budget=budget)
    del it
    out.update({"workers": workers, "batches_per_epoch": per_epoch, "images_per_epoch": n_images})
    return out


def section_loader_rates(store: dict, resolutions: list[int], workers: int, seconds: float,
                         device: torch.device) -> list[dict]:
    out = []
    for res in resolutions:
        try:
            r = loader_only(store["location"], res, workers, device.type == "cuda", seconds)
            r.update({"resolution": res, "workers": workers})
        except Exception as exc:
            r = {"resolution": res, "workers": workers, "error": error_text(exc)}
        out.append(r)
    return out
