"""The adapter registry and the checks every dataset shares (one way in: ``load_labels``).

An adapter reads its dataset's label table(s) and returns a ``LabelSet`` (preprocessing.labels):
one row per image with its path under the image root, study, patient, split, view and the raw
1 / 0 / -1 / blank value of each requested label. Everything after it (the study-label rule, the
uncertainty policy, the checks below, the store) is shared:

    dataset = get_dataset("nih")
    labels = load_labels("nih", ["Data_Entry_2017_v2020.csv"], image_root="/data/nih")

``load_labels`` refuses, in one line each: an unknown dataset, a task the dataset does not have, an
image path that leaves the image root, and a patient found in two splits.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from common.cli import UserError
from common.schema import task_key
from preprocessing.labels import ESCAPE_REASONS, LabelSet


@dataclass(frozen=True)
class DatasetOptions:
    """Layout settings beyond the tables; each adapter reads the ones it knows (docs/data.md)."""
    views: tuple[str, ...] | None = None     # keep only these view positions (nih, mimic-cxr-jpg: PA, AP, ...)
    valid_fraction: float = 0.2              # share of patients in 'valid' when the data has no split
    columns: Mapping[str, object] = field(default_factory=dict)   # csv: path, labels, study, patient, split, view

    def as_dict(self) -> dict:
        return {"views": list(self.views) if self.views else None, "valid_fraction": self.valid_fraction,
                "columns": dict(self.columns)}


@dataclass(frozen=True)
class Dataset:
    name: str
    description: str
    labels: Callable[[DatasetOptions], tuple[str, ...]]          # every label name it has
    default_tasks: Callable[[DatasetOptions], tuple[str, ...]]   # what a store holds unless told
    read: Callable[..., LabelSet]   # (tables, image_root, tasks, policy, options) -> LabelSet


DATASETS: dict[str, Dataset] = {}


def register(dataset: Dataset) -> Dataset:
    if dataset.name in DATASETS:
        raise ValueError(f"dataset {dataset.name!r} is registered twice")
    DATASETS[dataset.name] = dataset
    return dataset


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def get_dataset(name: str) -> Dataset:
    """The registered adapter ``name``; a ``UserError`` naming the known ones (and close names)."""
    if name in DATASETS:
        return DATASETS[name]
    close = difflib.get_close_matches(str(name), list(DATASETS), n=2, cutoff=0.5)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise UserError(f"--dataset: unknown dataset {name!r}{hint}; known: {', '.join(list_datasets())}")


def resolve_tasks(dataset: Dataset, tasks, options: DatasetOptions) -> tuple[str, ...]:
    """``tasks`` (None: the dataset's defaults; 'all'; names or keys, any case) -> its own label names."""
    labels = dataset.labels(options)
    if tasks is None or (isinstance(tasks, str) and not tasks.strip()):
        return tuple(dataset.default_tasks(options))
    if isinstance(tasks, str):
        if tasks.strip().lower() == "all":
            return tuple(labels)
        tasks = [t for t in tasks.split(",") if t.strip()]
    by_key = {task_key(label): label for label in labels}
    out = []
    for t in tasks:
        label = by_key.get(task_key(str(t)))
        if label is None:
            close = difflib.get_close_matches(str(t), list(labels), n=2, cutoff=0.6)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise UserError(f"--tasks: {str(t).strip()!r} is not a label of dataset {dataset.name}{hint}; "
                            f"its labels: {', '.join(labels)}")
        if label not in out:
            out.append(label)
    if not out:
        raise UserError("--tasks: no task given")
    return tuple(out)


def load_labels(name: str, tables: Iterable[str], image_root: str | None = None, tasks=None,
                policy: Mapping[str, str] | str | None = None,
                options: DatasetOptions | None = None) -> tuple[Dataset, LabelSet]:
    """Read a dataset's tables with its adapter and apply the shared checks (module docstring)."""
    dataset = get_dataset(name)
    options = options or DatasetOptions()
    if not 0 < float(options.valid_fraction) < 1:
        raise UserError(f"--valid-fraction: {options.valid_fraction} is not between 0 and 1")
    tables = [str(t) for t in tables]
    if not tables:
        raise UserError("no label table given (--csv)")
    chosen = resolve_tasks(dataset, tasks, options)
    labels = dataset.read(tables, image_root, chosen, policy, options)
    for r in labels.rejects:
        if r.reason in ESCAPE_REASONS:
            raise UserError(f"{r.csv} row {r.row}: image path {r.path!r} is outside the image root "
                            f"({r.reason.split(' (')[0]}); nothing written")
    check_patient_splits(labels)
    if "image_path" not in labels.frame.columns:
        labels.frame.insert(labels.frame.columns.get_loc("image_id") + 1, "image_path", labels.frame["image_id"])
    return dataset, labels


def check_patient_splits(labels: LabelSet) -> None:
    """A patient in two splits leaks their anatomy from training into evaluation: refuse the data."""
    frame = labels.frame
    if frame.empty:
        return
    splits = frame.groupby("patient_id")["split"].nunique()
    both = splits[splits > 1]
    if len(both):
        patient = both.index[0]
        where = sorted(frame.loc[frame["patient_id"] == patient, "split"].unique())
        more = f" (and {len(both) - 1} more patients)" if len(both) > 1 else ""
        raise UserError(f"patient {patient!r} is in more than one split ({', '.join(where)}){more}: "
                        f"a patient's images must all be in one split")
