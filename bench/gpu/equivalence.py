"""Does a speed mode train the same model? Eager against CUDA graphs, compile, and both.

Every run starts from one seed and steps the trainer's own step (bench/gpu/trial.py) over the same
batches, of two batch shapes each seen several times (new shapes are where capture and recompiling
happen). Then losses, weights and BatchNorm statistics are compared with the first eager run.

A second eager run measures the device's own run-to-run noise: on CUDA, atomics in cuDNN/cuBLAS
backward make eager differ from eager, and a mode is trustworthy when it differs from eager by about
as much. On CPU eager is bitwise reproducible, so a mode is held to fixed tolerances instead
(``TOLERANCE``: fused kernels sum in another order, so compiled fp32 differs in the last bits).
"""
from __future__ import annotations

import numpy as np
import torch

from bench.gpu.trial import BATCH, Trial, repeat, synthetic_batch

#: A mode's largest allowed difference from eager. fp32 (CPU): a few float32 roundings per
#: operation, grown over a few steps. bf16 (CUDA): bf16 keeps 8 bits of mantissa, so one rounding
#: step is 0.4%; or 3x the eager-vs-eager noise, whichever is larger.
TOLERANCE = {
    "fp32": {"max_rel_loss_diff": 1e-4, "max_abs_weight_diff": 1e-4, "max_abs_bn_stat_diff": 1e-4},
    "bf16": {"max_rel_loss_diff": 2e-2, "max_abs_weight_diff": 1e-3, "max_abs_bn_stat_diff": 2e-2},
}
NOISE_FACTOR = 3.0

#: (label, CUDA graphs, compile). Graphs need CUDA; the rest run anywhere.
MODES = (("graphed", True, False), ("compiled", False, True), ("compiled_graphed", True, True))


def train_run(name: str, res: int, device: torch.device, amp: bool, channels_last: bool,
              batches: list[dict], graphs: bool = False, compile: bool = False) -> dict:
    """One training run over ``batches``: its per-step losses, final state and mode statistics."""
    trial = Trial(name, res, device, amp, channels_last, graphs=graphs, compile=compile)
    losses = [trial.run(repeat(b), 1)[0] for b in batches]
    state = {k: v.detach().float().cpu().clone() for k, v in trial.model.state_dict().items()}
    return {"losses": losses, "state": state,
            "graphs": trial.graphs.stats() if trial.graphs is not None else None}


def compare(a: dict, b: dict) -> dict:
    """Largest differences between two runs: relative per-step loss, absolute weight (parameters
    and other buffers) and BatchNorm running statistic; whether BatchNorm counted the same batches."""
    la, lb = np.array(a["losses"]), np.array(b["losses"])
    sa, sb = a["state"], b["state"]
    bn = [k for k in sa if k.endswith("running_mean") or k.endswith("running_var")]
    weights = [k for k in sa if k not in bn and not k.endswith("num_batches_tracked")]
    return {"max_rel_loss_diff": float(np.max(np.abs(la - lb) / np.maximum(np.abs(la), 1e-12))),
            "max_abs_weight_diff": max(float((sa[k] - sb[k]).abs().max()) for k in weights),
            "max_abs_bn_stat_diff": max((float((sa[k] - sb[k]).abs().max()) for k in bn), default=0.0),
            "batches_tracked_equal": all(torch.equal(sa[k], sb[k]) for k in sa
                                         if k.endswith("num_batches_tracked"))}


def limits(amp: bool, noise: dict | None) -> dict:
    """The tolerance a mode is held to: the fixed one, or NOISE_FACTOR x the measured eager noise."""
    fixed = TOLERANCE["bf16" if amp else "fp32"]
    if not noise:
        return dict(fixed)
    return {k: max(v, NOISE_FACTOR * noise[k]) for k, v in fixed.items()}


def within(diff: dict, limit: dict) -> bool:
    return diff["batches_tracked_equal"] and all(diff[k] <= v for k, v in limit.items())


def section_equivalence(device: torch.device, amp: bool, channels_last: bool,
                        name: str = "resnet50", res: int = 160, rounds: int = 3,
                        modes=MODES, sizes: list[int] | None = None) -> dict:
    """Eager twice, then each mode of ``modes`` the device supports, over the same batches
    (``sizes``: images per batch, default the protocol's batch and 3 fewer, ``rounds`` times)."""
    sizes = sizes or [BATCH["images"], BATCH["images"] - 3] * rounds
    batches = [synthetic_batch(res, device, images=n, studies=min(BATCH["studies"], n), seed=i)
               for i, n in enumerate(sizes)]
    runs = {"eager": train_run(name, res, device, amp, channels_last, batches),
            "eager_again": train_run(name, res, device, amp, channels_last, batches)}
    skipped = {}
    for label, graphs, compile in modes:
        if graphs and device.type != "cuda":
            skipped[label] = "skipped: CUDA graphs need a CUDA device"
            continue
        runs[label] = train_run(name, res, device, amp, channels_last, batches, graphs, compile)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    noise = compare(runs["eager"], runs["eager_again"])
    limit = limits(amp, noise if device.type == "cuda" else None)
    out = {"model": name, "resolution": res, "steps": len(batches), "batch_images": sizes,
           "precision": "bf16" if amp else "fp32", "losses": {k: v["losses"] for k, v in runs.items()},
           "eager_vs_eager": noise, "tolerance": limit, "modes": {}}
    for label, _, _ in modes:
        if label in skipped:
            out["modes"][label] = skipped[label]
            continue
        diff = compare(runs["eager"], runs[label])
        out["modes"][label] = {**diff, "within_tolerance": within(diff, limit),
                               "graphs": runs[label]["graphs"]}
    out["all_within_tolerance"] = all(v["within_tolerance"] for v in out["modes"].values()
                                      if isinstance(v, dict))
    return out
