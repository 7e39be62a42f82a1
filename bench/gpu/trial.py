"""One model stepping the trainer's own training step, and how its steps are timed.

Nothing here re-implements the trainer: the optimizer and schedule are the trainer's builders, the
step is the trainer's ``train_one_epoch`` run over a window of batches (uint8 batch -> device, keyed
augmentation + ImageNet normalisation on the device, bf16 autocast forward, study logit = max over
the study's images, masked multi-task BCE, backward, optimizer, schedule, the NaN check), and the
modes are the trainer's: ``trainer.graphs.GraphedTraining`` and ``trainer.compile.compile_model``.
When the trainer's API changes, this module fails with the name it could not find, never with a
stale copy of the step.
"""
from __future__ import annotations

import importlib
import time

import numpy as np
import torch

from common.schema import images_per_batch
from bench.gpu.measure import Budget, BusySampler, peak_memory, reset_peak, sync

#: The protocol's batch: 40 studies, 1.19 images each on CheXpert (common.schema.images_per_batch).
#: (--tiny shrinks both; the figures then mean nothing, the code paths are the same.)
BATCH = {"studies": 40, "images": images_per_batch(40)}


def trainer_api() -> dict:
    """The trainer's public step and optimizer builders, wherever the trainer keeps them."""
    api = {}
    for name, modules in (("train_one_epoch", ("trainer.loop", "trainer.train")),
                          ("build_optimizer", ("trainer.optim", "trainer.train")),
                          ("build_scheduler", ("trainer.optim", "trainer.train"))):
        for module in modules:
            try:
                fn = getattr(importlib.import_module(module), name, None)
            except ModuleNotFoundError:
                fn = None
            if fn is not None:
                api[name] = fn
                break
        else:
            raise ImportError(f"the trainer has no public {name} in {' or '.join(modules)}")
    return api


class _Window:
    """``n`` batches from a long-lived iterator, looking like a DataLoader to the trainer's epoch
    loop (which sets ``.sampler.epoch``): the loader's workers are forked once for the whole check
    instead of once per window."""

    class _Sampler:
        epoch = 1

    def __init__(self, source, n: int):
        self.sampler = self._Sampler()
        self.source, self.n = source, n

    def __iter__(self):
        for _ in range(self.n):
            yield next(self.source)

    def __len__(self) -> int:
        return self.n


def repeat(batch: dict):
    while True:
        yield batch


class Trial:
    """One model in stage 2 (everything unfrozen) with the trainer's optimizer, schedule and step,
    optionally compiled (inductor) and/or replayed as CUDA graphs, as a trial of that config runs."""

    def __init__(self, name: str, resolution: int, device: torch.device, amp: bool,
                 channels_last: bool, tasks: int = 5, graphs: bool = False, compile: bool = False,
                 seed: int = 0):
        from trainer.config import TrainConfig
        from trainer.models import create_model
        api = trainer_api()
        torch.manual_seed(seed)
        self.device, self.amp, self.channels_last = device, amp, channels_last
        model = create_model(name, resolution, outputs=tasks, weights="none")
        self.name, self.resolution = model.name, resolution
        self.parameters = sum(p.numel() for p in model.parameters())
        model = model.to(device, memory_format=torch.channels_last if channels_last
                         else torch.contiguous_format)
        self.step_source = f"{api['train_one_epoch'].__module__}.train_one_epoch"
        if compile:
            from trainer.compile import compile_model
            compile_model(model)
            self.step_source += " + trainer.compile.compile_model"
        self.model, self.epoch_fn = model, api["train_one_epoch"]
        cfg = TrainConfig(model=name, resolution=resolution, weights="none")
        self.opt = api["build_optimizer"](model, cfg, "unfrozen")
        self.sched = api["build_scheduler"](self.opt, cfg, "unfrozen", steps_per_epoch=100_000)
        self.graphs = None
        if graphs:   # after the optimizer: it decides which parameters train (the captured set)
            from trainer.graphs import GraphedTraining
            self.graphs = GraphedTraining(model, bf16=amp, stage="unfrozen")
            self.step_source += " + trainer.graphs.GraphedTraining"

    def run(self, source, steps: int) -> tuple[float, int]:
        """``steps`` training steps on batches from the iterator ``source``; returns (mean loss,
        images seen). Ends synchronised (the trainer's final NaN check reads the losses back)."""
        extra = {"graphs": self.graphs} if self.graphs is not None else {}
        loss, images, _ = self.epoch_fn(self.model, _Window(source, steps), self.opt, self.sched,
                                        epoch=1, device=self.device, augment=True, bf16=self.amp,
                                        channels_last=self.channels_last, **extra)
        sync(self.device)
        return float(loss), int(images)


def synthetic_batch(resolution: int, device: torch.device, images: int | None = None,
                    studies: int | None = None, tasks: int = 5, seed: int = 0) -> dict:
    """A batch shaped like the loader's: ``studies`` studies, ``images`` images (1-2 per study),
    random pixels, the trainer's keyed augmentation parameters, labels with some excluded (NaN)."""
    from trainer.augment import AugmentSettings, sample_params
    images = BATCH["images"] if images is None else images
    studies = BATCH["studies"] if studies is None else studies
    g = torch.Generator().manual_seed(seed)
    counts = np.ones(studies, dtype=np.int64)
    counts[: max(0, images - studies)] += 1
    index = torch.from_numpy(np.repeat(np.arange(studies), counts))
    labels = torch.randint(0, 2, (studies, tasks), generator=g).float()
    labels[torch.rand(studies, tasks, generator=g) < 0.2] = float("nan")
    pixels = torch.randint(0, 256, (int(counts.sum()), 1, resolution, resolution), generator=g,
                           dtype=torch.uint8)
    aug = torch.from_numpy(sample_params(AugmentSettings(), 0, 1, np.arange(int(counts.sum()))))
    batch = {"images": pixels, "study_index": index, "labels": labels, "aug": aug,
             "studies": torch.arange(studies)}
    return {k: v.to(device) for k, v in batch.items()}


def time_steps(trial: Trial, source, *, warmup_steps: int, min_steps: int, seconds: float,
               budget: Budget | None = None) -> dict:
    """Warm up (``warmup_steps``: compilation and graph capture happen here), calibrate the step
    time, then time one window of steps sized to last ~``seconds`` (at least ``min_steps``) between
    synchronisations.

    Returns images/s, step time, steps and images, the warm-up's seconds, the busy share during the
    timed window and the peak memory of the timed window alone (``steady_*``).
    """
    dev = trial.device
    t0 = time.perf_counter()
    trial.run(source, warmup_steps)
    warmup_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    calib_steps = max(1, min_steps // 2)
    trial.run(source, calib_steps)
    step_s = (time.perf_counter() - t1) / calib_steps
    steps = int(max(min_steps, min(5000, seconds / max(step_s, 1e-6))))
    if budget is not None:   # never let one window eat the rest of the budget
        steps = int(max(2, min(steps, 0.5 * max(budget.left, 1.0) / max(step_s, 1e-6))))
    reset_peak(dev)
    graphs_before = trial.graphs.stats() if trial.graphs is not None else None
    sampler = BusySampler(dev)
    with sampler:
        start = time.perf_counter()
        _, images = trial.run(source, steps)
        elapsed = time.perf_counter() - start
    out = {"images_per_s": images / elapsed, "step_ms": 1000 * elapsed / steps, "steps": steps,
           "images": images, "timed_s": elapsed, "warmup_steps": warmup_steps, "warmup_s": warmup_s,
           "step_source": trial.step_source}
    out.update(sampler.result())
    if graphs_before is not None:
        # Graphs captured inside the timed window (a new batch shape) are timed too: say how many.
        after = trial.graphs.stats()
        out["cuda_graphs"] = {**after, "captured_in_timed_window": after["graphs"] - graphs_before["graphs"],
                              "eager_steps_in_timed_window": after["eager_steps"] - graphs_before["eager_steps"]}
    steady = peak_memory(dev)
    out["steady_peak_memory_allocated_bytes"] = steady["peak_memory_allocated_bytes"]
    out["steady_peak_memory_reserved_bytes"] = steady["peak_memory_reserved_bytes"]
    return out
