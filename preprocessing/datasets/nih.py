"""NIH ChestX-ray14: ``Data_Entry_2017*.csv`` plus, optionally, ``train_val_list.txt`` / ``test_list.txt``.

- Labels: the 14 findings of ``Finding Labels`` split on ``|``; "No Finding" = all negative. The
  data set has no uncertain and no blank labels, so the uncertainty policy never applies.
- Study = (``Patient ID``, ``Follow-up #``): one image each.
- Images are found by ``Image Index`` anywhere under the image root (NIH ships them as
  ``images_001/images/`` .. ``images_012/images/``).
- Split: with the official lists, ``test_list.txt`` -> ``test`` and the patients of
  ``train_val_list.txt`` are divided into ``train`` / ``valid`` by a hash of the patient id; without
  them every patient is divided that way. ``--views PA`` keeps one view position.
"""
from __future__ import annotations

import posixpath

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from common import storage
from common.cli import UserError
from preprocessing.datasets.base import Dataset, DatasetOptions, register
from preprocessing.datasets.splits import patient_split
from preprocessing.labels import LabelError, LabelSet, Reject, finish_labels, read_source, read_table, source_names
from common.schema import raw_column

#: The 14 findings, in the order of NIH's own papers.
FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
            "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
NO_FINDING = "No Finding"
COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "View Position")
LIST_NAMES = {"train_val_list": "train_val", "test_list": "test"}
WHAT = "an NIH Data_Entry_2017 table has Image Index, Finding Labels, Follow-up #, Patient ID, View Position"


def _list_kind(location: str) -> str | None:
    base = posixpath.basename(storage.display(location).split("?")[0])
    for stem, kind in LIST_NAMES.items():
        if base.startswith(stem):
            return kind
    return None


def index_images(image_root: str) -> dict[str, list[str]]:
    """File name -> its relative paths under ``image_root`` (every depth; local or s3://)."""
    fs, root = storage.resolve(image_root)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    found: dict[str, list[str]] = {}
    prefix = root.rstrip("/") + "/"
    for info in infos:
        if info.type == pafs.FileType.File:
            rel = info.path[len(prefix):] if info.path.startswith(prefix) else info.path
            found.setdefault(posixpath.basename(rel), []).append(rel)
    return found


def read(tables: list[str], image_root: str | None, tasks: tuple[str, ...], policy,
         options: DatasetOptions) -> LabelSet:
    names = source_names(tables)
    entries, lists, sources = [], {}, {}
    for location, name in zip(tables, names):
        kind = _list_kind(location)
        if kind:
            text, sources[name] = read_source(location, name)
            lists[kind] = {line.strip() for line in text.splitlines() if line.strip()}
        else:
            frame, sources[name] = read_table(location, name, COLUMNS, WHAT)
            entries.append((name, frame))
    if len(entries) != 1:
        raise UserError(f"--dataset nih: give exactly one Data_Entry_2017 table (got {len(entries)}: "
                        f"{', '.join(n for n, _ in entries) or 'none'}) plus optional train_val_list.txt / test_list.txt")
    if len(lists) == 1:
        raise UserError(f"--dataset nih: give both train_val_list.txt and test_list.txt, or neither "
                        f"(got only {next(iter(lists))})")
    name, table = entries[0]
    n = len(table)
    index = table["Image Index"].str.strip()
    patient = table["Patient ID"].str.strip()
    follow_up = table["Follow-up #"].str.strip()
    for column, values in (("Patient ID", patient), ("Follow-up #", follow_up)):
        bad = ~values.str.fullmatch(r"\d+")
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise LabelError(f"{name}: row {i + 1}, column {column!r}: {values.iloc[i]!r} is not a whole number")

    # Findings: one indicator column per name; an unknown name is an error, not a silent negative.
    dummies = table["Finding Labels"].str.strip().str.get_dummies(sep="|")
    dummies.columns = [c.strip() for c in dummies.columns]
    unknown = sorted(set(dummies.columns) - set(FINDINGS) - {NO_FINDING, ""})
    if unknown:
        i = int(np.flatnonzero(dummies[unknown[0]].to_numpy())[0])
        raise LabelError(f"{name}: row {i + 1}, column 'Finding Labels': unknown finding {unknown[0]!r} "
                         f"(NIH's are {', '.join(FINDINGS)} or {NO_FINDING!r})")
    if NO_FINDING in dummies.columns:
        both = (dummies[NO_FINDING] > 0) & (dummies.drop(columns=[NO_FINDING]).sum(axis=1) > 0)
        if both.any():
            i = int(np.flatnonzero(both.to_numpy())[0])
            raise LabelError(f"{name}: row {i + 1}, column 'Finding Labels': {NO_FINDING!r} together with findings")

    reason = np.full(n, "", dtype=object)
    reason[(index == "").to_numpy()] = "empty Image Index"
    dup = (index.duplicated(keep="first") & (index != "")).to_numpy()
    if dup.any():
        first = pd.Series(np.arange(1, n + 1), index=index)[~index.duplicated(keep="first")]
        reason[dup] = [f"duplicate Image Index (first seen in {name} row {first[i]})" for i in index[dup]]
    view = table["View Position"].str.strip().str.upper()
    if options.views:
        off = (~view.isin(options.views)).to_numpy() & (reason == "")
        reason[off] = [f"view {v or '(blank)'} not selected (--views {','.join(options.views)})" for v in view[off]]

    split = patient_split(patient, options.valid_fraction)
    if lists:
        in_test, in_train = index.isin(lists["test"]).to_numpy(), index.isin(lists["train_val"]).to_numpy()
        split = np.where(in_test, "test", split).astype(object)
        neither = ~in_test & ~in_train & (reason == "")
        reason[neither] = "in neither train_val_list.txt nor test_list.txt"
        both = in_test & in_train & (reason == "")
        reason[both] = "in both train_val_list.txt and test_list.txt"

    image_path = index.to_numpy(dtype=object).copy()
    if image_root is not None:
        found = index_images(image_root)
        for i in np.flatnonzero(reason == ""):
            paths = found.get(index.iloc[i])
            if not paths:
                reason[i] = "missing image file"
            elif len(paths) > 1:
                reason[i] = f"image file found {len(paths)} times under the image root"
            else:
                image_path[i] = paths[0]

    keep = reason == ""
    rejects = [Reject(name, int(i) + 1, str(index.iloc[i]), str(reason[i])) for i in np.flatnonzero(~keep)]
    rows = pd.DataFrame({
        "image_id": index.to_numpy(dtype=object), "image_path": image_path,
        "study_id": (patient + "/" + follow_up).to_numpy(dtype=object),
        "patient_id": patient.to_numpy(dtype=object), "split": split,
        "view": np.full(n, "Frontal", dtype=object),   # ChestX-ray14 holds frontal films only
        "ap_pa": view.replace("", None).to_numpy(dtype=object),
        "source_csv": np.full(n, name, dtype=object), "source_row": np.arange(1, n + 1, dtype="int64"),
    })
    for t in tasks:
        rows[raw_column(t)] = (dummies[t].to_numpy() > 0).astype("float32") if t in dummies.columns \
            else np.zeros(n, dtype="float32")
    return finish_labels(rows[keep].copy(), tasks, policy, rejects=rejects, sources=sources, rows_in=n)


DATASET = register(Dataset(
    name="nih",
    description="NIH ChestX-ray14 Data_Entry_2017*.csv (+ train_val_list.txt, test_list.txt)",
    labels=lambda options: FINDINGS,
    default_tasks=lambda options: FINDINGS,
    read=read,
))
