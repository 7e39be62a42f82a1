"""MIMIC-CXR-JPG: ``mimic-cxr-2.0.0-chexpert.csv``, ``-metadata.csv`` and ``-split.csv`` (``.gz`` too).

- One row per image of the split table (``dicom_id, study_id, subject_id, split``); its labels are
  its study's row of the ``-chexpert.csv`` table (CheXpert's 14 labels as 1 / 0 / -1 / blank, so the
  same per-task uncertainty policies apply); its view is ``ViewPosition`` of ``-metadata.csv``.
- Image: ``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`` (XX = the subject id's first two digits).
- Split: ``train`` / ``validate`` -> ``valid`` / ``test``.
- Patient = ``pSUBJECT``, study = ``pSUBJECT/sSTUDY``. ``--views PA,AP`` keeps those view positions.
"""
from __future__ import annotations

import posixpath

import numpy as np
import pandas as pd

from common import storage
from common.cli import UserError
from common.schema import OBSERVATIONS, TASKS, raw_column
from preprocessing.datasets.base import Dataset, DatasetOptions, register
from preprocessing.datasets.splits import SPLIT_NAMES
from preprocessing.labels import LabelError, LabelSet, Reject, finish_labels, parse_label_values, read_table, source_names

TABLES = {"chexpert": ("subject_id", "study_id"),
          "metadata": ("dicom_id", "subject_id", "study_id", "ViewPosition"),
          "split": ("dicom_id", "study_id", "subject_id", "split")}
FRONTAL = ("PA", "AP", "AP AXIAL", "PA LLD", "AP LLD", "AP RLD", "PA RLD")
LATERAL = ("LATERAL", "LL", "RL", "LAO", "RAO", "LPO", "SWIMMERS", "XTABLE LATERAL")


def _kind(location: str) -> str | None:
    base = posixpath.basename(storage.display(location).split("?")[0]).lower()
    for suffix in (".gz", ".csv"):
        base = base[: -len(suffix)] if base.endswith(suffix) else base
    return next((k for k in TABLES if base.endswith(f"-{k}")), None)


def image_path(subject: str, study: str, dicom: str) -> str:
    return f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"


def read(tables: list[str], image_root: str | None, tasks: tuple[str, ...], policy,
         options: DatasetOptions) -> LabelSet:
    names = source_names(tables)
    frames, sources = {}, {}
    for location, name in zip(tables, names):
        kind = _kind(location)
        if kind is None:
            raise UserError(f"--dataset mimic-cxr-jpg: {name} is not one of the tables "
                            f"(*-chexpert.csv, *-metadata.csv, *-split.csv)")
        if kind in frames:
            raise UserError(f"--dataset mimic-cxr-jpg: two *-{kind}.csv tables ({frames[kind][0]}, {name})")
        what = f"MIMIC-CXR-JPG's -{kind}.csv has " + ", ".join(TABLES[kind] + (tasks if kind == "chexpert" else ()))
        frame, sources[name] = read_table(location, name, TABLES[kind] + (tasks if kind == "chexpert" else ()), what)
        frames[kind] = (name, frame)
    missing = [f"*-{k}.csv" for k in TABLES if k not in frames]
    if missing:
        raise UserError(f"--dataset mimic-cxr-jpg: missing table(s) {', '.join(missing)}")

    split_name, images = frames["split"]
    labels_name, labels = frames["chexpert"]
    _, meta = frames["metadata"]
    n = len(images)
    ids = images[["dicom_id", "subject_id", "study_id", "split"]].apply(lambda c: c.str.strip())
    raw = {t: parse_label_values(labels[t], labels_name, t) for t in tasks}
    label_rows = pd.DataFrame({"subject_id": labels["subject_id"].str.strip(),
                               "study_id": labels["study_id"].str.strip(), **{raw_column(t): raw[t] for t in tasks}})
    dup = label_rows.duplicated(["subject_id", "study_id"])
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise LabelError(f"{labels_name}: row {i + 1}: study s{label_rows['study_id'].iloc[i]} has a second label row")
    views = meta[["dicom_id", "ViewPosition"]].apply(lambda c: c.str.strip()).drop_duplicates("dicom_id")
    joined = ids.merge(label_rows, on=["subject_id", "study_id"], how="left", indicator=True)
    joined = joined.merge(views, on="dicom_id", how="left")
    assert len(joined) == n  # left joins on unique keys keep one row per image

    reason = np.full(n, "", dtype=object)
    well_formed = (ids["subject_id"].str.fullmatch(r"\d{2,}") & ids["study_id"].str.fullmatch(r"\d+")
                   & ids["dicom_id"].str.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*")).to_numpy()
    reason[~well_formed] = "subject_id, study_id or dicom_id is not a plain id"
    unlabelled = (joined["_merge"] == "left_only").to_numpy() & (reason == "")
    reason[unlabelled] = "study has no row in the -chexpert.csv table"
    dup = ids["dicom_id"].duplicated(keep="first").to_numpy() & (reason == "")
    reason[dup] = "duplicate dicom_id"
    split = ids["split"].str.lower().map(SPLIT_NAMES)
    if split.isna().any():
        i = int(np.flatnonzero(split.isna().to_numpy())[0])
        raise LabelError(f"{split_name}: row {i + 1}, column 'split': {ids['split'].iloc[i]!r} is not "
                         f"train, validate or test")
    position = joined["ViewPosition"].fillna("").str.upper()
    if options.views:
        off = (~position.isin(options.views)).to_numpy() & (reason == "")
        reason[off] = [f"view {v or '(blank)'} not selected (--views {','.join(options.views)})" for v in position[off]]

    keep = reason == ""
    rejects = [Reject(split_name, int(i) + 1, str(ids["dicom_id"].iloc[i]), str(reason[i]))
               for i in np.flatnonzero(~keep)]
    subject, study, dicom = (ids[c].to_numpy(dtype=object) for c in ("subject_id", "study_id", "dicom_id"))
    rows = pd.DataFrame({
        "image_id": [image_path(a, b, c) if k else c for a, b, c, k in zip(subject, study, dicom, keep)],
        "study_id": [f"p{a}/s{b}" for a, b in zip(subject, study)],
        "patient_id": [f"p{a}" for a in subject],
        "split": split.to_numpy(dtype=object),
        "view": np.where(position.isin(FRONTAL), "Frontal",
                         np.where(position.isin(LATERAL), "Lateral", None)).astype(object),
        "ap_pa": position.replace("", None).to_numpy(dtype=object),
        "source_csv": np.full(n, split_name, dtype=object), "source_row": np.arange(1, n + 1, dtype="int64"),
    })
    for t in tasks:
        rows[raw_column(t)] = joined[raw_column(t)].to_numpy(dtype="float32")
    return finish_labels(rows[keep].copy(), tasks, policy, rejects=rejects, sources=sources, rows_in=n)


DATASET = register(Dataset(
    name="mimic-cxr-jpg",
    description="MIMIC-CXR-JPG mimic-cxr-2.0.0-{chexpert,metadata,split}.csv, images files/pXX/pSUBJECT/sSTUDY/",
    labels=lambda options: OBSERVATIONS,
    default_tasks=lambda options: TASKS,
    read=read,
))
