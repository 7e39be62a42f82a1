"""A generic table: a path column, label columns, and optional study, patient, split and view columns.

The columns are named by flags (``--path-column``, ``--labels-column``, ...) or a small YAML file
(``--columns``; flags win), e.g.::

    path: file
    labels: [Pneumothorax, Effusion]
    patient: subject
    split: fold          # values train / valid (or validate, val) / test

Labels are 1 / 0 / -1 / blank like CheXpert's. Without a study column every image is its own study;
without a patient column the study is the patient; without a split column patients are divided into
train / valid by a hash of their id. Paths are relative to the image root: an absolute path or one
with ``..`` is refused (it would leave the root), an empty or repeated one is a reject.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from common.cli import UserError
from common.schema import raw_column
from preprocessing.datasets.base import Dataset, DatasetOptions, register
from preprocessing.datasets.splits import SPLIT_NAMES, patient_split
from preprocessing.labels import (ESCAPE_REASONS, LabelError, LabelSet, Reject, finish_labels,
                                  parse_label_values, read_table, source_names)

ROLES = ("path", "labels", "study", "patient", "split", "view")


def columns_from(yaml_path: str | None, flags: dict) -> dict:
    """The column mapping: the YAML file's keys, overridden by the flags that were given."""
    columns: dict = {}
    if yaml_path:
        import yaml
        try:
            with open(yaml_path) as f:
                loaded = yaml.safe_load(f)
        except OSError as exc:
            raise UserError(f"--columns: cannot read {yaml_path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise UserError(f"--columns: {yaml_path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"--columns: {yaml_path} must hold a mapping with keys {', '.join(ROLES)}")
        unknown = sorted(set(map(str, loaded)) - set(ROLES))
        if unknown:
            raise UserError(f"--columns: {yaml_path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(ROLES)})")
        columns.update({str(k): v for k, v in loaded.items() if v is not None})
    for role, value in flags.items():
        if value:
            columns[role] = value
    if isinstance(columns.get("labels"), str):
        columns["labels"] = [c.strip() for c in columns["labels"].split(",") if c.strip()]
    if "labels" in columns and (not isinstance(columns["labels"], list)
                                or not all(isinstance(c, str) and c for c in columns["labels"])):
        raise UserError("--columns: labels must be a list of column names")
    return columns


def _labels(options: DatasetOptions) -> tuple[str, ...]:
    columns = options.columns or {}
    if not columns.get("path") or not columns.get("labels"):
        raise UserError("--dataset csv: name the path column and the label columns "
                        "(--path-column, --labels-column, or --columns FILE.yaml)")
    return tuple(columns["labels"])


def read(tables: list[str], image_root: str | None, tasks: tuple[str, ...], policy,
         options: DatasetOptions) -> LabelSet:
    columns = dict(options.columns)
    _labels(options)
    optional = {r: columns[r] for r in ("study", "patient", "split", "view") if columns.get(r)}
    required = [columns["path"], *tasks, *optional.values()]
    what = "columns named by --*-column / --columns: " + ", ".join(dict.fromkeys(required))
    parts, sources, rows_in = [], {}, 0
    for location, name in zip(tables, source_names(tables)):
        frame, sources[name] = read_table(location, name, required, what)
        frame = frame.assign(_csv=name, _row=np.arange(1, len(frame) + 1))
        for t in tasks:
            frame[raw_column(t)] = parse_label_values(frame[t], name, t)
        parts.append(frame)
        rows_in += len(frame)
    table = pd.concat(parts, ignore_index=True)
    path = table[columns["path"]].str.strip().str.replace("\\", "/", regex=False)

    reason = np.full(len(table), "", dtype=object)
    reason[path.str.contains(r"(?:^|/)\.\.(?:/|$)", regex=True).to_numpy()] = ESCAPE_REASONS[0]
    reason[path.str.contains(r"^(?:/|[A-Za-z]:|[A-Za-z][A-Za-z0-9+.-]*://)", regex=True).to_numpy()] = ESCAPE_REASONS[1]
    reason[(path == "").to_numpy()] = "empty path"
    ok = reason == ""
    dup = (path.duplicated(keep="first") & pd.Series(ok)).to_numpy()
    reason[dup] = "duplicate path"
    study = table[optional["study"]].str.strip() if "study" in optional else path
    patient = table[optional["patient"]].str.strip() if "patient" in optional else study
    for role, values in (("study", study), ("patient", patient)):
        blank = (values == "").to_numpy() & (reason == "")
        reason[blank] = f"blank {role} id"
    if "split" in optional:
        split = table[optional["split"]].str.strip().str.lower().map(SPLIT_NAMES)
        if split.isna().any():
            i = int(np.flatnonzero(split.isna().to_numpy())[0])
            raise LabelError(f"{table['_csv'].iloc[i]}: row {table['_row'].iloc[i]}, column {optional['split']!r}: "
                             f"{table[optional['split']].iloc[i]!r} is not train, valid or test")
        split = split.to_numpy(dtype=object)
    else:
        split = patient_split(patient, options.valid_fraction)
    view = table[optional["view"]].str.strip().replace("", None) if "view" in optional else None

    keep = reason == ""
    rejects = [Reject(str(table["_csv"].iloc[i]), int(table["_row"].iloc[i]), str(path.iloc[i]), str(reason[i]))
               for i in np.flatnonzero(~keep)]
    rows = pd.DataFrame({
        "image_id": path.to_numpy(dtype=object), "study_id": study.to_numpy(dtype=object),
        "patient_id": patient.to_numpy(dtype=object), "split": split,
        "view": view.to_numpy(dtype=object) if view is not None else np.full(len(table), None, dtype=object),
        "ap_pa": np.full(len(table), None, dtype=object),
        "source_csv": table["_csv"].to_numpy(dtype=object), "source_row": table["_row"].to_numpy(dtype="int64"),
    })
    for t in tasks:
        rows[raw_column(t)] = table[raw_column(t)].to_numpy(dtype="float32")
    return finish_labels(rows[keep].copy(), tasks, policy, rejects=rejects, sources=sources, rows_in=rows_in)


DATASET = register(Dataset(
    name="csv",
    description="any table: a path column, label columns, optional study/patient/split/view columns",
    labels=_labels,
    default_tasks=_labels,
    read=read,
))
