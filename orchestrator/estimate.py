"""GPU-hours of a sweep: per (model, resolution) group, images per trial / images/s x GPU share.

The images/s of a group come from, in order of trust:

1. a measured file (``bench/gpu_check.py`` JSON): the sweep reads every committed
   ``bench/results/*.json`` by default (``--gpu-measurements`` names others), in the trials' CUDA
   graph mode and without cuDNN autotuning (``packing.load_measurements``);
2. the throughput model (``orchestrator.throughput``) on the FLOPs table of the registry's models
   (``table``), or on FLOPs counted for any other model (``FLOPs estimate``).

Validation is a forward pass over the valid split every epoch, costed at 1/3 of a training image.
Every figure but a measured one is an ESTIMATE; the dry run says per group which it used.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

from common.cli import HelpFormatter, UserError, parse_int_list, run_cli
from common.schema import IMAGES_PER_STUDY

#: A validation image costs about a third of a training image (forward only).
VALID_COST = 1.0 / 3.0


def committed_measurements() -> list[str]:
    """The gpu_check JSONs committed to this checkout's bench/results, its per-group folders
    (``groups-<gpu>/``) included (none in an installed copy)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return sorted(glob.glob(os.path.join(root, "bench", "results", "**", "*.json"), recursive=True))


@dataclass
class Estimate:
    trials: int
    gpu_hours: float
    per_group: dict        # (model, resolution) -> {"trials", "images_per_s", "gpu_hours", "gpu_share", "source"}


def epoch_images(train_images: int, valid_images: int, max_train_studies: int = 0,
                 max_valid_studies: int = 0) -> tuple[int, int]:
    if max_train_studies:
        train_images = min(train_images, round(max_train_studies * IMAGES_PER_STUDY))
    if max_valid_studies:
        valid_images = min(valid_images, round(max_valid_studies * IMAGES_PER_STUDY))
    return train_images, valid_images


def group_rate(model: str, resolution: int,
               measured: Mapping[tuple[str, int], tuple[float, str]] | None = None) -> tuple[float, str]:
    """(images/s, where it came from) of one group."""
    from orchestrator import throughput
    hit = (measured or {}).get((model, resolution))
    if hit and hit[0]:
        return float(hit[0]), hit[1]
    return throughput.images_per_s(model, resolution), throughput.source(model)


def estimate(trials: list[tuple[str, int]], epochs: int, train_images: int, valid_images: int,
             gpus_per_trial: float | Sequence[float] = 1.0,
             measured: Mapping[tuple[str, int], tuple[float, str] | float] | None = None) -> Estimate:
    """GPU-hours for trials given as (resolved model, resolution) pairs.

    ``measured``: (model, resolution) -> (images/s, where) measured on the target GPU
    (``packing.measured_rates``); a bare number is accepted as (number, 'measured').

    ``gpus_per_trial``: one GPU share for every trial, or one per trial (``--gpus-per-trial
    auto``). A trial holding a fraction of a GPU is costed at its wall time times that fraction,
    assuming the packed trials do not slow each other down (the packing rule keeps their summed
    busy share <= 0.9, so this holds roughly; 0 = a CPU run, costed as a whole GPU).
    """
    shares = (list(gpus_per_trial) if isinstance(gpus_per_trial, Sequence)
              else [gpus_per_trial] * len(trials))
    if len(shares) != len(trials):
        raise ValueError(f"{len(shares)} GPU shares for {len(trials)} trials")
    rates = {k: (v if isinstance(v, tuple) else (float(v), "measured"))
             for k, v in (measured or {}).items()}
    per_group: dict = {}
    total = 0.0
    for (model, res), share in zip(trials, shares):
        g = per_group.get((model, res))
        if g is None:
            ips, where = group_rate(model, res, rates)
            g = per_group[(model, res)] = {"trials": 0, "images_per_s": ips, "gpu_hours": 0.0,
                                           "gpu_share": share, "source": where}
        seconds = epochs * (train_images + VALID_COST * valid_images) / g["images_per_s"]
        hours = seconds / 3600.0 * (share if share > 0 else 1.0)
        g["trials"] += 1
        g["gpu_hours"] += hours
        total += hours
    return Estimate(trials=len(trials), gpu_hours=total, per_group=per_group)


def is_measured(source: str) -> bool:
    return source.startswith("measured")


def throughput_table(models: list[str], resolutions: list[int],
                     measured: Mapping[tuple[str, int], tuple[float, str]] | None = None) -> str:
    """Markdown table of img/s per model and resolution, each cell marked with its source."""
    from trainer.models import resolve_model_name
    head = "| model | " + " | ".join(f"{r} px" for r in resolutions) + " |"
    rows = [head, "| --- |" + " ---: |" * len(resolutions)]
    for m in models:
        cells = []
        for r in resolutions:
            name = resolve_model_name(m, r)
            ips, where = group_rate(name, r, measured)
            mark = "m" if is_measured(where) else "t" if where == "table" else "f"
            cells.append(f"{'' if name == m else name + ': '}{ips:,.0f} ({mark})")
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n\n(m) measured, (t) FLOPs table, (f) FLOPs counted for this model"


EPILOG = """examples:
  python -m orchestrator.estimate                       # the thesis models, committed measurements
  python -m orchestrator.estimate --models smallcnn,resnet18 --resolutions 64,128
  python -m orchestrator.estimate --gpu-measurements none   # the throughput model alone

GPU-hours of a whole sweep: python -m orchestrator.sweep ... --dry-run (docs/sweep.md).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.estimate",
                                description="Training images/s per model and resolution on one H100 "
                                            "(measured where a bench/gpu_check.py file has it, else "
                                            "estimated), as a markdown table.",
                                epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--models", default="resnet50,resnet152,densenet121,densenet161,efficientnet",
                   help="comma-separated trainer.models names")
    p.add_argument("--resolutions", default="160,240,320,400,480", help="comma-separated px")
    p.add_argument("--gpu-measurements", action="append", default=None, metavar="FILE",
                   help="gpu_check JSONs (repeatable; 'none' for none; default: every committed "
                        "bench/results/*.json)")
    p.add_argument("--cuda-graphs", default="auto", choices=("auto", "on", "off"),
                   help="the trials' TrainConfig.cuda_graphs: which mode's measurements apply")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from orchestrator import packing
    files = args.gpu_measurements
    if files is None:
        files = committed_measurements()
    elif [f.lower() for f in files] == ["none"]:
        files = []
    try:
        measured = packing.measured_rates(files, args.cuda_graphs)
    except (OSError, ValueError) as exc:
        raise UserError(f"--gpu-measurements: cannot read a gpu_check JSON ({exc})") from None
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    print(throughput_table(models, parse_int_list(args.resolutions, "--resolutions"), measured))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="orchestrator.estimate"))
