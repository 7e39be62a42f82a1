"""What one measurement is (a model at a resolution in a mode, ``MODEL@RES[:graphs][:compile][:bN]``)
and how a list of them is measured: the step on a synthetic batch, then on the real loader.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import torch

from bench.gpu.loaders import loader_steps
from bench.gpu.measure import Budget, clean, error_text, log, peak_memory, reset_peak
from common.schema import IMAGES_PER_STUDY
from bench.gpu.trial import BATCH, Trial, repeat, synthetic_batch, time_steps

#: Targets on one H100 (images/s, bf16 + channels_last, synthetic data): published A100 ResNet50
#: 2,470 img/s at 224 px x 1.8 for H100, scaled by 1/pixels.
TARGETS = {
    "resnet50": {160: 8700, 240: 3900, 320: 2200, 400: 1400, 480: 970},
    "densenet121": {160: 6400, 240: 2800, 320: 1600, 400: 1000, 480: 710},
    "resnet152": {160: 3600, 240: 1600, 320: 900, 400: 570, 480: 400},
}
TARGET_SHARE = 0.75      # a measurement "meets" its target at >= 75% of it


@dataclasses.dataclass(frozen=True)
class Config:
    """One measurement: a model at a resolution, optionally with CUDA graphs (trainer/graphs.py),
    compiled (trainer/compile.py) and at another batch size."""
    model: str
    resolution: int
    loader: bool = True          # also measure the step fed by the real loader
    graphs: bool = False
    compile: bool = False
    images: int | None = None    # images per batch; None = BATCH (the protocol's 40 studies)

    @property
    def label(self) -> str:
        return (f"{self.model}@{self.resolution}" + (":graphs" if self.graphs else "")
                + (":compile" if self.compile else "") + (f":b{self.images}" if self.images else ""))


def parse_configs(text: str) -> list[Config]:
    """``resnet50@160,resnet50@160:graphs,densenet161@480:compile,resnet50@160:b240`` -> Configs.
    A ``:bN`` batch experiment is synthetic only (the phantom's batches have the protocol's size)."""
    out = []
    for item in text.split(","):
        head, *opts = item.strip().split(":")
        name, _, res = head.partition("@")
        if not name or not res.isdigit():
            raise SystemExit(f"gpu_check: --configs item {item!r} is not MODEL@RES[:graphs][:compile][:bN]")
        kw: dict[str, Any] = {}
        for opt in opts:
            if opt in ("graphs", "compile"):
                kw[opt] = True
            elif opt[:1] == "b" and opt[1:].isdigit() and int(opt[1:]) > 0:
                kw["images"], kw["loader"] = int(opt[1:]), False
            else:
                raise SystemExit(f"gpu_check: --configs option {opt!r} in {item!r} is not "
                                 "'graphs', 'compile' or 'b<images>'")
        out.append(Config(name, int(res), **kw))
    return out


def run_configs(configs, device: torch.device, args, budget: Budget, store: dict | None,
                workers: int, reserve_s: float = 0.0) -> list[dict]:
    """:func:`measure_config` for each config in order."""
    return [measure_config(cfg, device, args, budget, store, workers, reserve_s) for cfg in configs]


def measure_config(cfg: Config, device: torch.device, args, budget: Budget, store: dict | None,
                   workers: int, reserve_s: float = 0.0) -> dict:
    """The synthetic and the loader measurement of one config, errors recorded, never raised.
    It starts only while ``reserve_s`` (kept for the later sections) plus its own need is left in
    the budget; a compiled config needs more (``args.compile_reserve_s``: inductor's warm-up)."""
    amp = device.type == "cuda" and not args.no_amp
    channels_last = device.type == "cuda" and not args.no_channels_last
    name, res, with_loader = cfg.model, cfg.resolution, cfg.loader
    images = cfg.images or BATCH["images"]
    studies = BATCH["studies"] if not cfg.images else max(1, round(cfg.images / IMAGES_PER_STUDY))
    rec: dict[str, Any] = {"label": cfg.label, "model": name, "resolution": res,
                           "batch_studies": studies, "images_per_batch": images,
                           "amp": "bf16" if amp else "off", "channels_last": channels_last,
                           "cuda_graphs": cfg.graphs, "compile": cfg.compile}
    target = TARGETS.get(name, {}).get(res)
    if target and device.type == "cuda":
        rec["target_images_per_s"] = target
    if cfg.graphs and device.type != "cuda":
        rec["synthetic"] = rec["loader"] = "skipped: CUDA graphs need a CUDA device"
        return rec
    needs = args.compile_reserve_s if cfg.compile else args.config_reserve_s
    if not budget.allows(needs + reserve_s):
        rec["synthetic"] = rec["loader"] = "skipped: budget"
        return rec
    trial = None
    try:
        reset_peak(device)
        t0 = time.perf_counter()
        trial = Trial(name, res, device, amp, channels_last, graphs=cfg.graphs, compile=cfg.compile)
        rec["model"] = trial.name
        rec["parameters"] = trial.parameters
        rec["build_s"] = time.perf_counter() - t0
        if cfg.compile:
            # One step of another shape first: a trial's batches vary in size, so after its
            # second shape it runs the graph with a symbolic image count; time that one.
            trial.run(repeat(synthetic_batch(res, device, images=images - 3, studies=studies)), 1)
        batch = synthetic_batch(res, device, images=images, studies=studies)
        syn = time_steps(trial, repeat(batch), warmup_steps=args.warmup_steps,
                         min_steps=args.min_steps, seconds=args.seconds, budget=budget)
        syn.update(peak_memory(device))   # whole trial so far: model, optimizer, warm-up
        rec["synthetic"] = syn
        if target and device.type == "cuda":
            rec["share_of_target"] = syn["images_per_s"] / target
            rec["meets_target"] = rec["share_of_target"] >= TARGET_SHARE
    except Exception as exc:
        rec["synthetic"] = {"error": error_text(exc)}
    if not with_loader:
        rec["loader"] = "not requested"
    elif store is None or "error" in store or store.get("skipped"):
        rec["loader"] = {"error": "no phantom store (see the 'store' section)"}
    elif trial is None or "error" in rec["synthetic"]:
        rec["loader"] = {"error": "model did not build or step (see synthetic)"}
    elif "oom_at_images_per_batch" in rec:
        rec["loader"] = {"error": "skipped: the synthetic batch ran out of memory at "
                                  f"{rec['oom_at_images_per_batch']} images (the phantom's batches are as large)"}
    elif not budget.allows(args.loader_reserve_s + reserve_s):
        rec["loader"] = "skipped: budget"
    else:
        try:
            lo = loader_steps(trial, store["location"], workers, args.seconds, budget)
            lo.update(peak_memory(device))
            syn_rate = rec["synthetic"]["images_per_s"]
            lo["share_of_synthetic"] = lo["images_per_s"] / syn_rate
            lo["within_10pct_of_synthetic"] = lo["share_of_synthetic"] >= 0.9
            rec["loader"] = lo
        except Exception as exc:
            rec["loader"] = {"error": error_text(exc)}
    del trial
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log(f"{cfg.label}: " + json.dumps(clean(_brief(rec))))
    return rec


def _brief(rec: dict) -> dict:
    out = {}
    for part in ("synthetic", "loader"):
        v = rec.get(part)
        if isinstance(v, dict):
            out[part] = {k: v.get(k) for k in ("images_per_s", "busy_share", "peak_memory_reserved_bytes",
                                               "error") if v.get(k) is not None}
        else:
            out[part] = v
    return out
