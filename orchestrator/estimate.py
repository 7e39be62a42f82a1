"""GPU-hours of a sweep, from a documented throughput table (an ESTIMATE, not a measurement).

Anchor (published, ../shared/RAY_NOTES.md): ResNet50 trains at ~2,470 images/s at 224 px on one
A100 with AMP (NVIDIA DeepLearningExamples); an H100 is ~1.8x an A100 on ResNet50 (MLPerf), so
ResNet50 ~4,446 img/s at 224 px on an H100. Throughput scales ~1/pixels with resolution.

Other models: relative to ResNet50 by forward FLOPs at 224 px (torchvision / EfficientNet paper
figures), times a per-family efficiency factor, because FLOPs alone flatter memory-bound networks:

* ResNet: 1.0 (the anchor family).
* DenseNet: 0.51, so that DenseNet121 lands at 0.735 x ResNet50, the ratio of the per-GPU targets
  in the throughput issue (6,400 vs 8,700 img/s at 160 px).
* EfficientNet: 0.133, so that B0 at 224 px trains ~1.4x faster than ResNet50 (depthwise
  convolutions and SiLU make it far slower than its 0.39 GFLOPs suggest); B1-B7 scale by FLOPs
  from B0. This factor is the least certain number in the table.

Validation is a forward pass over the valid split every epoch, costed at 1/3 of a training image.
Measured figures replace the table per (model, resolution): the sweep's ``--gpu-measurements
FILE`` (a ``bench/gpu_check.py`` JSON) gives ``estimate(..., measured=...)`` the check's images/s,
and the dry run says which groups were costed with them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

#: ResNet50, one H100, bf16/AMP, 224 px: 2,470 img/s (A100) x 1.8.
ANCHOR_IMAGES_PER_S = 2470.0 * 1.8
ANCHOR_RESOLUTION = 224

#: Forward GFLOPs (multiply-adds) at 224 x 224 px. EfficientNet values are the paper's figures at
#: each variant's native resolution rescaled to 224 px (cost ~ pixels).
GFLOPS_224 = {
    "resnet18": 1.82, "resnet34": 3.67, "resnet50": 4.11, "resnet152": 11.56,
    "densenet121": 2.87, "densenet161": 7.73, "densenet169": 3.36,
    "efficientnet-b0": 0.39,                      # native 224
    "efficientnet-b1": 0.70 * (224 / 240) ** 2,   # native 240
    "efficientnet-b2": 1.0 * (224 / 260) ** 2,    # native 260
    "efficientnet-b3": 1.8 * (224 / 300) ** 2,    # native 300
    "efficientnet-b4": 4.2 * (224 / 380) ** 2,    # native 380
    "efficientnet-b5": 9.9 * (224 / 456) ** 2,    # native 456
    "efficientnet-b6": 19.0 * (224 / 528) ** 2,   # native 528
    "efficientnet-b7": 37.0 * (224 / 600) ** 2,   # native 600
}

FAMILY_EFFICIENCY = {"resnet": 1.0, "densenet": 0.51, "efficientnet": 0.133}

#: CheXpert: 223,414 training images in 187,641 studies (used with --max-train-studies).
IMAGES_PER_STUDY = 1.19
#: A validation image costs about a third of a training image (forward only).
VALID_COST = 1.0 / 3.0


def family(model: str) -> str:
    for fam in FAMILY_EFFICIENCY:
        if model.startswith(fam):
            return fam
    raise KeyError(model)


def images_per_s(model: str, resolution: int) -> float:
    """Estimated training images/s of ``model`` at ``resolution`` px on one H100 (bf16)."""
    rel = FAMILY_EFFICIENCY[family(model)] * GFLOPS_224["resnet50"] / GFLOPS_224[model]
    return ANCHOR_IMAGES_PER_S * rel * (ANCHOR_RESOLUTION / resolution) ** 2


@dataclass
class Estimate:
    trials: int
    gpu_hours: float
    per_group: dict        # (model, resolution) -> {"trials", "images_per_s", "gpu_hours"}


def epoch_images(train_images: int, valid_images: int, max_train_studies: int = 0,
                 max_valid_studies: int = 0) -> tuple[int, int]:
    if max_train_studies:
        train_images = min(train_images, round(max_train_studies * IMAGES_PER_STUDY))
    if max_valid_studies:
        valid_images = min(valid_images, round(max_valid_studies * IMAGES_PER_STUDY))
    return train_images, valid_images


def estimate(trials: list[tuple[str, int]], epochs: int, train_images: int, valid_images: int,
             gpus_per_trial: float | Sequence[float] = 1.0,
             measured: Mapping[tuple[str, int], float] | None = None) -> Estimate:
    """GPU-hours for trials given as (resolved model, resolution) pairs.

    ``measured``: (model, resolution) -> images/s measured on the target GPU; those groups use it
    instead of the table (their ``per_group`` entry says ``"source": "measured"``).

    ``gpus_per_trial``: one GPU share for every trial, or one per trial (``--gpus-per-trial
    auto``). A trial holding a fraction of a GPU is costed at its wall time times that fraction,
    assuming the packed trials do not slow each other down (the packing rule keeps their summed
    busy share <= 0.9, so this holds roughly; 0 = a CPU run, costed as a whole GPU).
    """
    shares = (list(gpus_per_trial) if isinstance(gpus_per_trial, Sequence)
              else [gpus_per_trial] * len(trials))
    if len(shares) != len(trials):
        raise ValueError(f"{len(shares)} GPU shares for {len(trials)} trials")
    per_group: dict = {}
    total = 0.0
    for (model, res), share in zip(trials, shares):
        rate = (measured or {}).get((model, res))
        ips = rate if rate else images_per_s(model, res)
        seconds = epochs * (train_images + VALID_COST * valid_images) / ips
        hours = seconds / 3600.0 * (share if share > 0 else 1.0)
        g = per_group.setdefault((model, res), {"trials": 0, "images_per_s": ips, "gpu_hours": 0.0,
                                                "gpu_share": share,
                                                "source": "measured" if rate else "table"})
        g["trials"] += 1
        g["gpu_hours"] += hours
        total += hours
    return Estimate(trials=len(trials), gpu_hours=total, per_group=per_group)


def throughput_table(models: list[str], resolutions: list[int]) -> str:
    """Markdown table of the estimated img/s (what docs/sweep.md shows)."""
    head = "| model | " + " | ".join(f"{r} px" for r in resolutions) + " |"
    sep = "| --- |" + " ---: |" * len(resolutions)
    rows = [head, sep]
    for m in models:
        rows.append(f"| {m} | " + " | ".join(f"{images_per_s(m, r):,.0f}" for r in resolutions) + " |")
    return "\n".join(rows)


if __name__ == "__main__":   # regenerate the docs table
    from trainer.models import resolve_model_name
    res = [160, 240, 320, 400, 480]
    print(throughput_table(["resnet50", "resnet152", "densenet121", "densenet161"], res))
    print()
    print("| efficientnet (matched) | " + " | ".join(
        f"{resolve_model_name('efficientnet', r)}: {images_per_s(resolve_model_name('efficientnet', r), r):,.0f}"
        for r in res) + " |")
