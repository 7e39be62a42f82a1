"""One epoch of training and one pass of validation: the inner loops of a trial.

``run_trial`` (trainer/train.py) calls these once per epoch. A batch arrives as uint8 pixels with
its augmentation parameters (trainer/data.py); conversion, augmentation and normalisation run on
the training device; a study's logit is the max over its images' logits.
"""
from __future__ import annotations

import io
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from common import storage
from trainer.augment import to_model_input
from trainer.data import segment_max
from trainer.metrics import masked_bce_with_logits

# How often the CUDA path checks the loss for NaN/inf (each check is a CPU-GPU sync point). The CPU
# path checks every step: there it costs nothing.
CUDA_NAN_CHECK_EVERY = 25


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the trial fails instead of training on garbage."""


def train_one_epoch(model, loader, optimizer, scheduler, *, epoch: int, device: torch.device,
                    augment: bool, bf16: bool, channels_last: bool, progress: bool = False,
                    graphs=None, aug_style: str = "fastai") -> tuple[float, int, float]:
    """Returns (mean train loss, images seen, seconds).

    ``graphs``: a trainer.graphs.GraphedTraining for this model and stage. It replays the forward
    and backward as CUDA graphs; None runs them eagerly.
    """
    forward = model if graphs is None else graphs
    model.train()
    loader.sampler.epoch = epoch
    nan_every = 1 if device.type == "cpu" else CUDA_NAN_CHECK_EVERY
    losses: list[torch.Tensor] = []
    checked = 0
    images_seen = 0
    batches = loader
    if progress:
        from tqdm import tqdm
        batches = tqdm(loader, desc=f"epoch {epoch} train", unit="batch", leave=False)
    t0 = time.perf_counter()
    for step, batch in enumerate(batches, start=1):
        # --- batch to the device: uint8 pixels, then float/augment/normalise there ---------------
        images = batch["images"].to(device, non_blocking=True)            # N_img, 1, R, R uint8
        study_index = batch["study_index"].to(device, non_blocking=True)  # N_img
        labels = batch["labels"].to(device, non_blocking=True)            # S, T (NaN = excluded)
        params = batch["aug"].to(device, non_blocking=True) if augment else None
        x = to_model_input(images, params, channels_last, aug_style)      # N_img, 3, R, R float32

        # --- forward: image logits -> study logits (max over a study's images) -> masked BCE -----
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            image_logits = forward(x)                                     # N_img, T
        study_logits = segment_max(image_logits.float(), study_index, labels.shape[0])  # S, T
        loss = masked_bce_with_logits(study_logits, labels)

        # --- backward and update ------------------------------------------------------------------
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.detach())
        images_seen += images.shape[0]

        # --- NaN/inf check (a sync point on CUDA, hence not every step there) ---------------------
        if step % nan_every == 0:
            _check_finite(losses, checked, epoch)
            checked = len(losses)
    _check_finite(losses, checked, epoch)
    seconds = time.perf_counter() - t0
    mean_loss = float(torch.stack(losses).double().mean()) if losses else math.nan
    return mean_loss, images_seen, seconds


def _check_finite(losses: list[torch.Tensor], start: int, epoch: int) -> None:
    if start >= len(losses):
        return
    window = torch.stack(losses[start:])
    finite = torch.isfinite(window)
    if not bool(finite.all()):
        bad = start + int((~finite).nonzero()[0, 0])
        raise NonFiniteLossError(
            f"training loss is {float(window[bad - start])} at epoch {epoch}, step {bad + 1}: the "
            f"trial is stopped (lower the learning rates, or check the input data)")


@torch.no_grad()
def evaluate(model, loader, *, device: torch.device, bf16: bool, channels_last: bool,
             num_studies: int, progress: bool = False) -> np.ndarray:
    """Study logits (S, T) float32 of the whole split, in split order, without augmentation.

    With bf16 the body runs under autocast and the head in fp32 on fp32 features: logits rounded
    to bf16 (8 bits of mantissa) tie across studies and move AUROC and DeLong by up to ~5e-4.
    The head is a few kernels, so this costs nothing measurable."""
    model.eval()
    logits_out = np.zeros((num_studies, 0), dtype=np.float32)
    batches = loader
    if progress:
        from tqdm import tqdm
        batches = tqdm(loader, desc="validate", unit="batch", leave=False)
    parts, positions = [], []
    for batch in batches:
        x = to_model_input(batch["images"].to(device, non_blocking=True), None, channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            features = model.body(x)                                      # N_img, F, h, w
        with torch.autocast(device.type, enabled=False):
            image_logits = model.head(features.float())                   # N_img, T float32
        study_index = batch["study_index"].to(device)
        parts.append(segment_max(image_logits.float(), study_index,
                                 batch["labels"].shape[0]).cpu())
        positions.append(batch["studies"])
    if parts:
        logits_out = np.zeros((num_studies, parts[0].shape[1]), dtype=np.float32)
        logits_out[torch.cat(positions).numpy()] = torch.cat(parts).numpy()
    return logits_out


def predictions_table(study_ids: list[str], task_keys: list[str], labels: np.ndarray,
                      probs: np.ndarray) -> pa.Table:
    """Long format: one row per (study, task) labelled for that task."""
    rows_study, rows_task, rows_label, rows_prob = [], [], [], []
    for j, key in enumerate(task_keys):
        present = np.flatnonzero(~np.isnan(labels[:, j]))
        rows_study.extend(study_ids[i] for i in present)
        rows_task.extend([key] * len(present))
        rows_label.append(labels[present, j])
        rows_prob.append(probs[present, j])
    return pa.table({
        "study_id": pa.array(rows_study, pa.string()),
        "task": pa.array(rows_task, pa.string()),
        "label": pa.array(np.concatenate(rows_label).astype(np.float32)),
        "probability": pa.array(np.concatenate(rows_prob).astype(np.float32)),
    })


def write_parquet(location: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(location, buf.getvalue())
