"""Fractional-GPU packing: how many small trials may share one GPU (``--gpus-per-trial auto``).

A trial that cannot fill a GPU (EfficientNet-B0 at 160 px on an H100) wastes most of it. Ray Tune
can give such trials a fraction of a GPU (``{"gpu": 0.5}``: two trials share one, with the same
CUDA_VISIBLE_DEVICES and *no* memory isolation), so the sweep needs,
per (model, resolution), two numbers for one trial at the protocol's batch (40 studies, 48 images,
``common.schema.images_per_batch``):

* ``memory_gb``: its peak GPU memory, CUDA context included (what another process cannot use);
* ``busy_share``: the share of the GPU's capacity it keeps busy alone (0..1).

The rule (:func:`gpus_per_trial`): the largest k in (4, 3, 2) such that k trials fit in
``MEMORY_HEADROOM`` of the GPU's memory AND their summed busy share is at most ``BUSY_LIMIT``
gives 1/k; otherwise 1 (a whole GPU). Unknown models are never packed.

Where the numbers come from, in order of trust:

1. **Measured** on a GPU by ``bench/gpu_check.py`` (``load_measurements(path)`` reads its JSON):
   memory = ``torch.cuda.max_memory_reserved`` of the trial + ``CUDA_CONTEXT_GB``; busy share =
   1 / packing gain where the check ran two copies at once (the direct measure of what packing
   buys), else NVML ``utilization.gpu`` during the timed loop (an upper bound: it counts the GPU
   busy while any kernel runs, however few SMs it uses, so it only under-packs).
2. **Estimates** (:func:`estimate`, used for everything not measured), from figures measured on
   CPU and kept in ``orchestrator.throughput.CPU_PROFILE`` (``python -m orchestrator.packing
   --profile-cpu`` recomputes them): parameter count, bytes of tensors autograd saves per image at
   128 px (fp32), forward FLOPs per image at 128 px, and the number of aten operations one forward
   dispatches. Then, at resolution R and batch B:

   - memory = 16 B x params (fp32 weights, grads, two AdamW moments)
     + 0.5 x saved bytes x (R/128)^2 x B x ``ACTIVATION_SLACK`` (bf16 autocast halves the
     saved activations; slack covers cuDNN workspaces and allocator fragmentation)
     + ``CUDA_CONTEXT_GB``;
   - GPU time per step = B / the throughput model's images/s (``orchestrator.throughput``, the
     same figure the GPU-hour estimate uses);
     CPU time per step = ``LAUNCH_S`` x (3 x forward aten ops + ``FIXED_KERNELS``) (eager
     PyTorch launches kernels one by one, backward ~2 per forward op; a small step is bound by
     that), or ``LAUNCH_S`` x ``FIXED_KERNELS`` where the trial replays its forward and backward
     as CUDA graphs (trainer/graphs.py: by default at <= 320 px on CUDA, ``cuda_graphs``);
     busy share = GPU time / max(GPU time, CPU time).

   These are ESTIMATES, to be replaced by measurements: they say which trials are small, not how
   small exactly. ``Footprint.source`` says which one a number is.

How the sweep uses it (``orchestrator/sweep.py``, ``--gpus-per-trial auto``, the default)::

    table = packing.load_table(measurement_files)          # estimates, overridden by gpu_check JSONs
    gpu_gb = (args.gpu_memory_gb or packing.gpu_memory_from_ray_nodes(ray.nodes())
              or packing.detect_gpu_memory_gb() or 80.0)
    res = {t.trial_id: packing.trial_resources(t.params.model, t.params.resolution, cpus, gpu_gb, table)
           for t in trials}
    trainable = tune.with_resources(make_trainable(fn), lambda config: res[config["trial"]["trial_id"]])
    # run and dry run: print(packing.describe([(t.params.model, t.params.resolution) for t in trials], gpu_gb, table))

Tune accepts a function of the trial's config as its resources (Ray 2.60;
tests/test_sweep_packing.py checks on one fake GPU that each trial gets its own share).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Iterable, Mapping

from orchestrator import throughput
from orchestrator.throughput import CPU_PROFILE, REFERENCE_RESOLUTION

#: Per-process GPU memory that torch's allocator counters do not show (CUDA context, cuDNN/cuBLAS
#: handles and kernels): ~0.5-0.7 GB on Hopper with CUDA 12/13.
CUDA_CONTEXT_GB = 0.6
#: Packed trials may use at most this share of the GPU's memory (the rest: fragmentation, spikes).
MEMORY_HEADROOM = 0.85
#: Packed trials' summed busy share may reach this; beyond it they slow each other down.
BUSY_LIMIT = 0.9
#: The fractions tried, most packed first (Ray accepts any fraction; these divide 1 evenly).
PACKINGS = (4, 3, 2)
#: Estimate constants (see the module docstring).
ACTIVATION_SLACK = 1.2
LAUNCH_S = 10e-6          # eager PyTorch: ~10 us of CPU per kernel launch incl. autograd
FIXED_KERNELS = 120       # augmentation, normalisation, loss, foreach-AdamW and scheduler per step

@dataclass(frozen=True)
class Footprint:
    """One trial of (model, resolution) at the protocol batch on one GPU."""
    memory_gb: float
    busy_share: float
    source: str            # 'estimate' or 'measured: <device>, <date>[, probe]'
    images_per_s: float | None = None   # measured training rate alone on the GPU (synthetic data)


Table = Mapping[tuple[str, int], Footprint]


def uses_graphs(resolution: int, cuda_graphs: str = "auto") -> bool:
    """Whether a trial with TrainConfig.cuda_graphs = ``cuda_graphs`` replays CUDA graphs on a GPU."""
    import torch

    from trainer.graphs import want_graphs
    return want_graphs(cuda_graphs, torch.device("cuda"), int(resolution))


def estimate(model: str, resolution: int, images: int | None = None,
             graphs: bool | None = None) -> Footprint | None:
    """The CPU-profile estimate for a trial, or None for a model without a profile. ``images``:
    per batch (None: the protocol's). ``graphs``: whether the trial replays CUDA graphs (None:
    what the trainer's default does at this size)."""
    p = CPU_PROFILE.get(model)
    if p is None:
        return None
    if images is None:
        images = throughput.protocol_images_per_batch()
    if graphs is None:
        graphs = uses_graphs(resolution)
    scale = (resolution / REFERENCE_RESOLUTION) ** 2
    memory = (16 * p["params"] + 0.5 * p["saved_bytes_at128"] * scale * images * ACTIVATION_SLACK) / 1e9
    gpu_s = images / throughput.images_per_s(model, resolution)
    cpu_s = LAUNCH_S * (FIXED_KERNELS + (0 if graphs else 3 * p["fwd_ops"]))
    busy = gpu_s / max(gpu_s, cpu_s)
    return Footprint(memory_gb=round(memory + CUDA_CONTEXT_GB, 2), busy_share=round(busy, 2),
                     source="estimate, CUDA graphs" if graphs else "estimate")


def estimate_table(models: Iterable[str] | None = None,
                   resolutions: Iterable[int] = (160, 240, 320, 400, 480),
                   cuda_graphs: str = "auto") -> dict:
    return {(m, int(r)): estimate(m, int(r), graphs=uses_graphs(r, cuda_graphs))
            for m in (models or CPU_PROFILE) for r in resolutions if m in CPU_PROFILE}


def uses_compile(resolution: int, compile: str = "auto") -> bool:
    """Whether a trial with TrainConfig.compile = ``compile`` runs compiled on a GPU."""
    import torch

    from trainer.compile import want_compile
    return want_compile(compile, torch.device("cuda"), int(resolution))


def load_measurements(json_path: str, cuda_graphs: str = "auto",
                      compile: str = "auto") -> dict[tuple[str, int], Footprint]:
    """Footprints measured by ``bench/gpu_check.py`` (its JSON document), keyed (model, resolution).

    A file measured with cuDNN autotuning on is skipped whole (trials run with it off). Only
    configs that ran on CUDA with a synthetic measurement at the protocol's batch, in the mode
    a trial runs in (CUDA graphs or eager, per :func:`uses_graphs` with the sweep's ``cuda_graphs``
    setting), are taken, compiled or not as the trial runs (:func:`uses_compile`; a group measured
    only in the other compile mode is taken when nothing better is there): an eager step at 160 px keeps a GPU less than half as busy as a graphed
    one, so the other mode's figures would mislead. The busy share is 1 / packing gain where the
    check's packing probe ran that config in that mode, else NVML's utilisation.
    """
    with open(json_path) as f:
        report = json.load(f)
    if report.get("device_type") != "cuda":
        return {}
    env = report.get("env") if isinstance(report.get("env"), dict) else {}
    where = f"measured: {env.get('device_name', 'cuda')}, {str(report.get('started', ''))[:10]}"
    probe = report.get("packing_probe") if isinstance(report.get("packing_probe"), dict) else {}
    settings = report.get("settings") if isinstance(report.get("settings"), dict) else {}
    if settings.get("cudnn_benchmark"):
        return {}   # trials run without cuDNN autotuning: autotuned rates are not theirs
    protocol_images = settings.get("images_per_batch")
    out: dict[tuple[str, int], Footprint] = {}
    fallback: dict[tuple[str, int], Footprint] = {}   # measured in the other compile mode
    for section in ("configs", "extra"):
        value = report.get(section)
        if not isinstance(value, dict):
            continue
        for rec in value.get("results", []):
            syn = rec.get("synthetic")
            if not isinstance(syn, dict) or "images_per_s" not in syn:
                continue
            mem_bytes = syn.get("peak_memory_reserved_bytes") or syn.get("peak_memory_allocated_bytes")
            if not mem_bytes:
                continue
            if protocol_images and rec.get("images_per_batch", protocol_images) != protocol_images:
                continue   # a batch-size experiment, not what a trial runs
            key = (rec["model"], int(rec["resolution"]))
            graphs = bool(rec.get("cuda_graphs", False))
            if graphs != uses_graphs(key[1], cuda_graphs):
                continue
            compiled = bool(rec.get("compile", False))
            other_mode = compiled != uses_compile(key[1], compile)
            busy = syn.get("busy_share")
            source = where + (", CUDA graphs" if graphs else "") + (", compiled" if compiled else "")
            if (probe.get("model"), probe.get("resolution")) == key and probe.get("packing_gain") \
                    and bool(probe.get("cuda_graphs", False)) == graphs:
                busy, source = min(1.0, 1.0 / float(probe["packing_gain"])), source + ", probe"
            if busy is None:
                continue
            fp = Footprint(memory_gb=round(mem_bytes / 1e9 + CUDA_CONTEXT_GB, 2),
                           busy_share=round(float(busy), 2), source=source,
                           images_per_s=float(syn["images_per_s"]))
            (fallback if other_mode else out)[key] = fp
    # A group measured only in the other compile mode still beats the table (compiled and eager
    # steps differ by tens of percent, the table by more); its source says which mode it was.
    return {**{k: v for k, v in fallback.items() if k not in out}, **out}


def load_table(measurements: str | Iterable[str] | None = None,
               cuda_graphs: str = "auto", compile: str = "auto") -> dict[tuple[str, int], Footprint]:
    """Estimates for every profiled model at the protocol resolutions, overridden by the
    measurements in ``measurements`` (a gpu_check JSON, or several: later files win), if given.
    ``cuda_graphs`` is the trials' TrainConfig.cuda_graphs: it decides which mode's figures apply."""
    table = estimate_table(cuda_graphs=cuda_graphs)
    for path in ([measurements] if isinstance(measurements, str) else (measurements or [])):
        table.update(load_measurements(path, cuda_graphs, compile))
    return table


def measured_rates(measurements: str | Iterable[str] | None, cuda_graphs: str = "auto",
                   compile: str = "auto") -> dict[tuple[str, int], tuple[float, str]]:
    """(model, resolution) -> (measured images/s, where) from gpu_check JSONs, in the trials' graph
    mode; later files win. The sweep's dry run costs these groups with them instead of the table."""
    out: dict[tuple[str, int], tuple[float, str]] = {}
    for path in ([measurements] if isinstance(measurements, str) else (measurements or [])):
        for key, fp in load_measurements(path, cuda_graphs, compile).items():
            if fp.images_per_s:
                out[key] = (fp.images_per_s, f"{fp.source} ({os.path.basename(path)})")
    return out

def footprint(model: str, resolution: int, table: Table | None = None) -> Footprint | None:
    """The table's entry, else the estimate at this resolution, else None (unknown model)."""
    if table is not None and (model, int(resolution)) in table:
        return table[(model, int(resolution))]
    return estimate(model, int(resolution))


def gpus_per_trial(model: str, resolution: int, gpu_memory_gb: float, table: Table | None = None) -> float:
    """1, 1/2, 1/3 or 1/4: the GPU share one trial of (model, resolution) is given.

    The most packed k in (4, 3, 2) with k x memory <= MEMORY_HEADROOM x GPU memory and
    k x busy share <= BUSY_LIMIT, else a whole GPU. A model with no footprint gets a whole GPU.

    >>> t = {("efficientnet-b0", 160): Footprint(2.0, 0.3, "test"), ("resnet50", 480): Footprint(20, 0.97, "test")}
    >>> gpus_per_trial("efficientnet-b0", 160, 80, t)
    0.3333333333333333
    >>> gpus_per_trial("resnet50", 480, 80, t)
    1.0
    >>> gpus_per_trial("efficientnet-b0", 160, 5, t)   # memory: two would need 4 GB of 4.25
    0.5
    """
    fp = footprint(model, resolution, table)
    if fp is None or gpu_memory_gb <= 0:
        return 1.0
    for k in PACKINGS:
        if k * fp.memory_gb <= MEMORY_HEADROOM * gpu_memory_gb and k * fp.busy_share <= BUSY_LIMIT:
            return 1.0 / k
    return 1.0


def parse_gpus_per_trial(text: str) -> float | str:
    """``--gpus-per-trial`` value: ``'auto'`` or a number (validated by the sweep as before)."""
    text = str(text).strip().lower()
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        from common.cli import UserError
        raise UserError(f"--gpus-per-trial: {text!r} is not a number or 'auto'") from None


def trial_resources(model: str, resolution: int, cpus_per_trial: float, gpu_memory_gb: float,
                    table: Table | None = None) -> dict:
    """The Tune resources of one trial under ``--gpus-per-trial auto``."""
    return {"cpu": float(cpus_per_trial),
            "gpu": gpus_per_trial(model, resolution, gpu_memory_gb, table)}


#: GPU memory (GB) by Ray's ``accelerator_type:<name>`` node resource (ray.util.accelerators);
#: where a name covers several sizes (A100 40/80 GB, V100 16/32 GB) the smaller one.
ACCELERATOR_MEMORY_GB = {"K80": 12, "P4": 8, "P100": 16, "T4": 16, "V100": 16, "A10G": 24,
                         "L4": 24, "L40S": 48, "A100": 40, "H100": 80, "H20": 96, "H200": 141,
                         "B200": 180, "RTX-PRO-6000": 96}


def gpu_memory_from_ray_nodes(nodes: Iterable[dict]) -> float | None:
    """The smallest GPU memory among the alive GPU nodes of ``ray.nodes()``, read from their
    ``accelerator_type:*`` resource; None when no GPU node is up or none has a known type."""
    sizes = []
    for n in nodes:
        r = n.get("Resources") or {}
        if not n.get("Alive") or r.get("GPU", 0) <= 0:
            continue
        for key in r:
            if key.startswith("accelerator_type:") and key.split(":", 1)[1] in ACCELERATOR_MEMORY_GB:
                sizes.append(float(ACCELERATOR_MEMORY_GB[key.split(":", 1)[1]]))
    return min(sizes) if sizes else None


def detect_gpu_memory_gb() -> float | None:
    """Memory of this machine's first GPU in GB (1e9 bytes), or None without CUDA. On a cluster
    the driver may have no GPU: the sweep first asks :func:`gpu_memory_from_ray_nodes`."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / 1e9
    except Exception:
        pass
    return None


def format_fraction(fraction: float) -> str:
    k = round(1 / fraction) if fraction > 0 else 0
    return "1" if fraction >= 1 else f"1/{k}"


def describe(points: Iterable[tuple[str, int]], gpu_memory_gb: float, table: Table | None = None) -> str:
    """Dry-run lines: per distinct (model, resolution) the GPU share and why."""
    lines = [f"GPU packing (--gpus-per-trial auto, {gpu_memory_gb:.0f} GB per GPU; memory "
             f"<= {MEMORY_HEADROOM:.0%} of it, summed busy share <= {BUSY_LIMIT}):"]
    for model, res in sorted(set((m, int(r)) for m, r in points), key=lambda x: (x[1], x[0])):
        fp = footprint(model, res, table)
        frac = gpus_per_trial(model, res, gpu_memory_gb, table)
        if fp is None:
            lines.append(f"  r{res} {model}: 1 GPU (no footprint known for this model)")
        else:
            lines.append(f"  r{res} {model}: {format_fraction(frac)} GPU (one trial ~{fp.memory_gb:.1f} GB, "
                         f"busy {fp.busy_share:.2f}; {fp.source})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.packing", description=__doc__.split("\n")[0],
        epilog="examples:\n  python -m orchestrator.packing --gpu-memory-gb 80\n"
               "  python -m orchestrator.packing --measurements gpu_check.json --models efficientnet-b0,resnet50\n"
               "  python -m orchestrator.packing --cuda-graphs off   # the plan for eager trials\n"
               "  python -m orchestrator.packing --profile-cpu resnet50,efficientnet-b0   # recompute CPU_PROFILE rows\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measurements", default=None, help="a bench/gpu_check.py JSON to override the estimates")
    parser.add_argument("--gpu-memory-gb", type=float, default=None, help="GPU memory (default: this GPU, else 80)")
    parser.add_argument("--models", default=None, help="comma-separated (default: every profiled model)")
    parser.add_argument("--resolutions", default="160,240,320,400,480")
    parser.add_argument("--cuda-graphs", default="auto", choices=("auto", "on", "off"),
                        help="the trials' TrainConfig.cuda_graphs (graphed trials fill the GPU "
                             "far better at small sizes; default auto: on at <= 320 px)")
    parser.add_argument("--profile-cpu", default=None, metavar="MODELS",
                        help="measure the CPU profile of these models and print CPU_PROFILE rows")
    args = parser.parse_args(argv)
    if args.profile_cpu:
        for m in args.profile_cpu.split(","):
            p = throughput.profile_cpu(m.strip())
            print(f"{m.strip()} {p['params']:.0f} {p['saved_bytes_at128']:.0f} {p['fwd_flops_at128']:.0f} "
                  f"{p['fwd_ops']:.0f}", flush=True)
        return 0
    try:
        resolutions = [int(r) for r in args.resolutions.split(",") if r.strip()]
    except ValueError:
        print(f"error: --resolutions {args.resolutions!r}: integers expected", file=sys.stderr)
        return 2
    if args.measurements and not os.path.exists(args.measurements):
        print(f"error: --measurements {args.measurements}: no such file", file=sys.stderr)
        return 2
    gpu_gb = args.gpu_memory_gb or detect_gpu_memory_gb() or 80.0
    table = load_table(args.measurements, args.cuda_graphs)
    models = [m.strip() for m in args.models.split(",")] if args.models else sorted(CPU_PROFILE)
    print(describe([(m, r) for m in models for r in resolutions], gpu_gb, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())

