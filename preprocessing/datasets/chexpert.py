"""CheXpert (and any CSV in its format): ``train.csv`` / ``valid.csv`` with a ``Path`` column.

The rules are preprocessing.labels's (docs/data.md): study = ``patientX/studyY`` from ``Path``, the
split is the ``train``/``valid`` folder of ``Path`` (else the CSV's stem), 1 / 0 / -1 / blank labels.
"""
from __future__ import annotations

from common.schema import OBSERVATIONS, TASKS
from preprocessing.datasets.base import Dataset, DatasetOptions, register
from preprocessing.labels import LabelSet, read_labels


def read(tables: list[str], image_root: str | None, tasks: tuple[str, ...], policy,
         options: DatasetOptions) -> LabelSet:
    return read_labels(tables, policy=policy, tasks=tasks)


DATASET = register(Dataset(
    name="chexpert",
    description="CheXpert train.csv / valid.csv (Path, Sex, Age, Frontal/Lateral, AP/PA, 14 observations)",
    labels=lambda options: OBSERVATIONS,
    default_tasks=lambda options: TASKS,
    read=read,
))
