"""One resolution of the store as study-level batches for training and validation.

A study (``patientNNNNN/studyN``) has 1-3 images that share its labels; the model scores every image
and the study's logit is the maximum over its images (the training step does that with a segment
max over ``study_index``). A batch is ``batch_studies`` whole studies, in a fixed order:

    images       uint8   (N_img, 1, R, R)   decoded pixels, exactly as stored
    study_index  int64   (N_img,)           image -> study position within the batch (0..S-1)
    labels       float32 (S, T)             1/0 per task, NaN = excluded for that task
    studies      int64   (S,)               study positions in the split (for study ids)
    aug          float32 (N_img, PARAMS)    augmentation parameters (identity when not augmenting)

Batches leave the loader workers as uint8; conversion to float, augmentation and normalisation run
on the training device (trainer/augment.py). The loader is a torch ``DataLoader`` over batch
*indices* (``batch_size=None``; the sampler yields ``(epoch, batch)``), and every batch is a pure
function of ``(split, epoch, batch)``, so results do not depend on the number of workers.

Memory: a split's image column is read once into the main process (Arrow buffers; forked workers
share them copy-on-write). With the store's default ``raw-uint8`` encoding that is R*R bytes per
image (CheXpert train at 320 px: ~23 GB). A lazy reader is future work; ``cache_dir`` only makes the read node-local.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from common.cli import UserError
from common.schema import label_column
from trainer.augment import AugmentSettings, identity_params, sample_params


class DataError(UserError):
    """The store cannot provide the data a trial asks for."""


@dataclass
class SplitData:
    """One split of one resolution, grouped into studies (studies sorted by id, images by id)."""
    split: str
    resolution: int
    encoding: str
    tasks: tuple[str, ...]
    study_ids: list[str]           # (S,)
    study_offsets: np.ndarray      # (S+1,) int64: study s owns images [off[s], off[s+1])
    image_ids: list[str]           # (N_img,) in study order
    labels: np.ndarray             # (S, T) float32, NaN = excluded
    blob_offsets: np.ndarray       # (N_img+1,) int64 into blob_data, in study order
    blob_data: np.ndarray          # uint8 buffer holding every image's encoded bytes

    @property
    def num_studies(self) -> int:
        return len(self.study_ids)

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    def blob(self, i: int) -> memoryview:
        return memoryview(self.blob_data[self.blob_offsets[i]:self.blob_offsets[i + 1]])


def _binary_buffers(column: pa.ChunkedArray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The binary column's bytes, reordered to ``order``, as (offsets, data) numpy arrays."""
    arr = column.take(pa.array(order)).combine_chunks()
    if pa.types.is_binary(arr.type):
        arr = arr.cast(pa.large_binary())
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None \
        else np.zeros(0, np.uint8)
    start = int(offsets[0])
    return offsets - start, data[start:]


def load_split(store, resolution: int, split: str, tasks: tuple[str, ...], *,
               max_studies: int = 0, require_all_tasks: bool = False) -> SplitData:
    """Read one split of one resolution and group it into studies.

    Studies with no usable label for any of ``tasks`` are dropped (they would add nothing to the
    loss); with ``require_all_tasks`` (single task mode) a study must have every task's label.
    ``max_studies`` keeps the first N studies (by study id) after that filter.
    """
    columns = ["image_id", "study_id", "image", *[label_column(t) for t in tasks]]
    table = store.read(resolution, split, columns=columns)
    if table.num_rows == 0:
        raise DataError(f"store {store_display(store)}: res{resolution}/{split} has no rows")
    image_ids = np.asarray(table.column("image_id").to_pylist(), dtype=object)
    study_ids = np.asarray(table.column("study_id").to_pylist(), dtype=object)
    order = np.lexsort((image_ids, study_ids))  # by study id, then image id: store-layout independent
    image_ids, study_ids = image_ids[order], study_ids[order]
    labels_img = np.stack([table.column(label_column(t)).to_numpy(zero_copy_only=False)
                           .astype(np.float32) for t in tasks], axis=1)[order]
    starts = np.flatnonzero(np.r_[True, study_ids[1:] != study_ids[:-1]])
    ends = np.r_[starts[1:], len(study_ids)]
    labels = labels_img[starts]
    # All images of a study carry its labels (docs/architecture.md); a store that breaks that would
    # silently train on arbitrary labels, so refuse it.
    for s, e in zip(starts, ends):
        block = labels_img[s:e]
        if not np.array_equal(block, np.broadcast_to(block[0], block.shape), equal_nan=True):
            raise DataError(f"store {store_display(store)}: images of study {study_ids[s]} "
                            f"({split}) disagree on labels")
    present = ~np.isnan(labels)
    keep = present.all(axis=1) if require_all_tasks else present.any(axis=1)
    keep_idx = np.flatnonzero(keep)
    if max_studies:
        keep_idx = keep_idx[:max_studies]
    if len(keep_idx) == 0:
        raise DataError(f"store {store_display(store)}: res{resolution}/{split} has no study "
                        f"labelled for {', '.join(tasks)}")
    img_sel = np.concatenate([np.arange(starts[s], ends[s]) for s in keep_idx])
    counts = ends[keep_idx] - starts[keep_idx]
    offsets, data = _binary_buffers(table.column("image"), order[img_sel])
    return SplitData(
        split=split, resolution=int(resolution), encoding=store.manifest["encoding"],
        tasks=tuple(tasks), study_ids=list(study_ids[starts[keep_idx]]),
        study_offsets=np.r_[0, np.cumsum(counts)].astype(np.int64),
        image_ids=list(image_ids[img_sel]), labels=np.ascontiguousarray(labels[keep_idx]),
        blob_offsets=np.ascontiguousarray(offsets, dtype=np.int64), blob_data=data)


def store_display(store) -> str:
    from common import storage
    return storage.display(getattr(store, "location", "?"))


class StudyBatches(Dataset):
    """Batch ``(epoch, b)`` of a split: ``batch_studies`` whole studies, decoded, with aug params."""

    def __init__(self, data: SplitData, batch_studies: int, *, seed: int,
                 augment: AugmentSettings | None, shuffle: bool = False):
        self.data = data
        self.batch_studies = int(batch_studies)
        self.seed = int(seed)
        self.augment = augment
        self.shuffle = bool(shuffle)

    def __len__(self) -> int:
        return -(-self.data.num_studies // self.batch_studies)

    @lru_cache(maxsize=2)
    def study_order(self, epoch: int) -> np.ndarray:
        """Studies in the order of this epoch: the split's order, or a permutation keyed by
        (seed, epoch) when shuffling is on."""
        if not self.shuffle:
            return np.arange(self.data.num_studies)
        return np.random.default_rng([0x5EED, self.seed, epoch]).permutation(self.data.num_studies)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, b = key
        data = self.data
        studies = self.study_order(epoch)[b * self.batch_studies:(b + 1) * self.batch_studies]
        counts = data.study_offsets[studies + 1] - data.study_offsets[studies]
        images = np.concatenate([np.arange(data.study_offsets[s], data.study_offsets[s + 1])
                                 for s in studies])
        size = data.resolution
        pixels = np.empty((len(images), 1, size, size), dtype=np.uint8)
        from preprocessing.store import decode_image
        for k, i in enumerate(images):
            try:
                arr = decode_image(data.blob(i), data.encoding)
            except Exception as exc:
                raise DataError(f"image {data.image_ids[i]} ({data.split}, res{size}) cannot be "
                                f"decoded: {exc}") from exc
            if arr.shape != (size, size):
                raise DataError(f"image {data.image_ids[i]} ({data.split}) has shape {arr.shape}, "
                                f"expected {(size, size)}")
            pixels[k, 0] = arr
        if self.augment is not None:
            # Keyed by the image's position in the split: independent of batch and worker.
            aug = sample_params(self.augment, self.seed, epoch, images)
        else:
            aug = identity_params(len(images))
        return {
            "images": torch.from_numpy(pixels),
            "study_index": torch.from_numpy(np.repeat(np.arange(len(studies)), counts)),
            "labels": torch.from_numpy(data.labels[studies]),
            "studies": torch.from_numpy(np.asarray(studies, dtype=np.int64)),
            "aug": torch.from_numpy(aug),
        }


class EpochSampler(Sampler):
    """Yields ``(epoch, 0) ... (epoch, n-1)``; set ``.epoch`` before iterating."""

    def __init__(self, num_batches: int):
        self.num_batches = num_batches
        self.epoch = 1

    def __iter__(self):
        return iter([(self.epoch, b) for b in range(self.num_batches)])

    def __len__(self) -> int:
        return self.num_batches


def resolve_workers(workers: int) -> int:
    """-1 = auto: one worker per available core, at most 8, leaving one core to the trainer."""
    if workers >= 0:
        return workers
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(0, min(8, cores - 1))


def make_loader(batches: StudyBatches, workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over batch indices; set ``loader.sampler.epoch`` before each epoch."""
    kwargs = {}
    if workers > 0:
        # fork shares the split's Arrow buffers copy-on-write instead of pickling them per worker.
        import multiprocessing as mp
        if "fork" in mp.get_all_start_methods():
            kwargs["multiprocessing_context"] = "fork"
        kwargs["prefetch_factor"] = 4
        # Workers live for the whole trial: batches are keyed by (epoch, batch) from the sampler,
        # so no per-epoch state has to reach them, and no epoch pays the start-up again.
        kwargs["persistent_workers"] = True
    return DataLoader(batches, batch_size=None, sampler=EpochSampler(len(batches)),
                      num_workers=workers, pin_memory=pin_memory,
                      # A private generator: creating an iterator must not consume the global
                      # torch RNG that drives dropout (exact resume depends on it).
                      generator=torch.Generator().manual_seed(0), **kwargs)


def segment_max(values: torch.Tensor, index: torch.Tensor, segments: int) -> torch.Tensor:
    """Row-wise max of ``values`` (N, T) within each segment of ``index`` (N,) -> (segments, T).

    A study's logit is the max over its images' logits (= max probability, sigmoid is monotone).
    """
    out = torch.full((segments, values.shape[1]), float("-inf"), dtype=values.dtype,
                     device=values.device)
    return out.scatter_reduce(0, index.view(-1, 1).expand_as(values), values, reduce="amax",
                              include_self=True)
