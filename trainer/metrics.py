"""Loss and evaluation: the masked multi-task BCE and per-task AUROC (scikit-learn)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score


def masked_bce_with_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the labelled entries of (S, T) study logits.

    ``labels`` holds 1/0, or NaN where a study is excluded for a task (blank, or uncertain under
    U-Ignore); those entries add nothing to the loss or its gradient. The mean is over the present
    entries of the whole batch, so every labelled (study, task) pair weighs the same. A batch with
    no labelled entry gives 0 (with a gradient of zeros), not NaN.
    """
    mask = ~torch.isnan(labels)
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    per_entry = F.binary_cross_entropy_with_logits(logits.float(), safe.float(), reduction="none")
    per_entry = per_entry * mask
    return per_entry.sum() / mask.sum().clamp(min=1)


def auroc_per_task(labels: np.ndarray, probs: np.ndarray, task_keys: list[str] | tuple[str, ...]
                   ) -> dict[str, float]:
    """{task_key: AUROC} over the studies labelled for each task.

    A task whose labelled studies are all of one class has no AUROC: NaN with a warning (a tiny
    validation subset can hit this), never an exception that would kill the trial.
    """
    out: dict[str, float] = {}
    for j, key in enumerate(task_keys):
        mask = ~np.isnan(labels[:, j])
        y = labels[mask, j]
        if y.size == 0 or np.unique(y).size < 2:
            warnings.warn(f"AUROC of {key} is undefined: {int(y.size)} labelled validation studies, "
                          f"{int((y == 1).sum())} positive", RuntimeWarning, stacklevel=2)
            out[key] = math.nan
            continue
        out[key] = float(roc_auc_score(y, probs[mask, j]))
    return out


def nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan
