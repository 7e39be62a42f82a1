"""CheXpert-format CSVs -> one row per accepted image with study-level labels, plus what was refused.

The rules (docs/data.md has the reasoning):

- The header must hold ``schema.META_COLUMNS`` and every requested task column; a missing column is a
  ``LabelError`` that names them all. Other observation columns are optional and ignored.
- A task cell is ``1.0``, ``0.0``, ``-1.0`` (``1``, ``0``, ``-1`` too) or blank; anything else is a
  ``LabelError`` naming the file, the 1-based data row and the column. Only the task columns are read.
- Rows are refused (a ``Reject`` with a reason, never dropped silently) when ``Path`` is empty,
  absolute, contains a ``..`` component, does not end in ``patientX/studyY/FILE``, or repeats a
  ``Path`` seen earlier (the first one is kept).
- Study-level labels: all images of a study (``split`` + ``patientX/studyY``) must carry the same raw
  value per task. Where they disagree the study gets the most informative value in the order
  ``1.0 > -1.0 > 0.0 > blank`` and the disagreement is recorded in ``LabelSet.conflicts``.
- The policy then maps the raw value per task: ``ones`` (-1 -> 1), ``zeros`` (-1 -> 0), ``ignore``
  (-1 -> excluded); blank is always excluded (null).

Everything is vectorised pandas: the 223,414-row CheXpert ``train.csv`` loads in about a second.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import posixpath
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs

from common import storage
from common.cli import UserError
from common.schema import DEFAULT_POLICY, META_COLUMNS, POLICIES, TASKS, label_column, raw_column, task_key


class LabelError(UserError):
    """A CSV that cannot be read as CheXpert-format labels (missing column, bad value, no rows)."""


@dataclass
class Reject:
    csv: str
    row: int  # 1-based data row (the header is row 0)
    path: str
    reason: str


@dataclass
class LabelSet:
    frame: pd.DataFrame  # one row per accepted image, columns in FRAME_COLUMNS order + raw_/label_ per task
    rejects: list[Reject] = field(default_factory=list)
    conflicts: list[dict] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    rows_in: int = 0
    policy: dict[str, str] = field(default_factory=dict)
    tasks: tuple[str, ...] = TASKS


#: Reasons of the rows whose Path would leave the image root (refused outright by the build).
ESCAPE_REASONS = ("Path contains '..' (escapes the image root)", "Path is absolute (escapes the image root)")

#: Identity and view columns of ``LabelSet.frame``; ``raw_<key>``/``label_<key>`` follow per task.
FRAME_COLUMNS = ("image_id", "study_id", "patient_id", "split", "view", "ap_pa", "source_csv", "source_row")

#: Raw values ordered from least to most informative; a disagreeing study takes the highest present.
#: A positive mention anywhere in a report wins, then an uncertain one, then an explicit negative.
CONFLICT_ORDER = (np.nan, 0.0, -1.0, 1.0)

_VALUE_TEXT = {"1.0": 1.0, "1": 1.0, "1.": 1.0, "0.0": 0.0, "0": 0.0, "0.": 0.0, "-0.0": 0.0,
               "-1.0": -1.0, "-1": -1.0, "-1.": -1.0, "": np.nan}
_VALUE_SET = pa.array(list(_VALUE_TEXT), type=pa.string())
_VALUE_OF = np.array(list(_VALUE_TEXT.values()), dtype="float32")

_STUDY_RE = r"(?:^|/)(?P<patient>patient[^/]+)/(?P<study>study[^/]+)/[^/]+$"
_SPLIT_RE = r"(?:^|/)(?P<split>train|valid)/"  # the first train/valid folder of Path


# --- policy ----------------------------------------------------------------------------------------
def _task_by_name(name: str, tasks: Iterable[str]) -> str | None:
    wanted = task_key(name)
    for t in tasks:
        if task_key(t) == wanted:
            return t
    return None


def parse_policy(text: str | None, tasks: Iterable[str] = TASKS) -> dict[str, str]:
    """``"Atelectasis=ones,Cardiomegaly=zeros"`` -> the full policy, merged over ``DEFAULT_POLICY``.

    Task names match case-insensitively and by key (``pleural_effusion``); ``all=ones`` sets every
    task. Later items win. An unknown task or policy is a ``UserError`` naming it.
    """
    tasks = tuple(tasks)
    policy = {t: DEFAULT_POLICY.get(t, "ignore") for t in tasks}
    for item in str(text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip().lower()
        if not sep or not name:
            raise UserError(f"--policy: {item!r} is not TASK=POLICY (e.g. Atelectasis=ones)")
        if value not in POLICIES:
            raise UserError(f"--policy: {value!r} for {name!r} is not one of {', '.join(POLICIES)}")
        if name.lower() == "all":
            policy = {t: value for t in tasks}
            continue
        task = _task_by_name(name, tasks)
        if task is None:
            raise UserError(f"--policy: unknown task {name!r}; tasks are {', '.join(tasks)}")
        policy[task] = value
    return policy


def _resolve_policy(policy: Mapping[str, str] | str | None, tasks: tuple[str, ...]) -> dict[str, str]:
    if policy is None or isinstance(policy, str):
        return parse_policy(policy, tasks)
    resolved = {t: DEFAULT_POLICY.get(t, "ignore") for t in tasks}
    for name, value in policy.items():
        task = _task_by_name(name, tasks)
        if task is None:
            raise UserError(f"policy: unknown task {name!r}; tasks are {', '.join(tasks)}")
        if value not in POLICIES:
            raise UserError(f"policy: {value!r} for {task!r} is not one of {', '.join(POLICIES)}")
        resolved[task] = value
    return resolved


def apply_policy(raw: pd.Series, policy: str) -> pd.Series:
    """Raw 1/0/-1/NaN -> label 1/0/NaN under one task's policy (blank always NaN)."""
    uncertain = {"ones": 1.0, "zeros": 0.0, "ignore": np.nan}[policy]
    return raw.replace(-1.0, uncertain).astype("float32")


# --- reading one CSV ---------------------------------------------------------------------------------
def _read_source(location: str) -> tuple[bytes, str]:
    try:
        # Not storage.read_bytes: pyarrow's streams un-gzip '.gz' by default, and the manifest must
        # hash the file's own bytes. compression=None keeps them as stored; _text() un-gzips.
        fs, path = storage.resolve(location)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(location)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            raise IsADirectoryError(location)
        with fs.open_input_stream(path, compression=None) as f:
            data = f.read()
    except FileNotFoundError:
        raise LabelError(f"{storage.display(location)}: file not found") from None
    except IsADirectoryError:
        raise LabelError(f"{storage.display(location)}: is a folder, not a CSV file") from None
    except (OSError, storage.StorageError) as exc:
        raise LabelError(f"{storage.display(location)}: cannot read: {exc}") from None
    return data, hashlib.sha256(data).hexdigest()


def _text(data: bytes, name: str) -> str:
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise LabelError(f"{name}: not a readable gzip file: {exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LabelError(f"{name}: not UTF-8 text: {exc}") from None


def _check_header(text: str, name: str, tasks: tuple[str, ...]) -> list[str]:
    first = text.split("\n", 1)[0].rstrip("\r")
    if not first.strip():
        raise LabelError(f"{name}: empty CSV (no header row)")
    header = [h.strip() for h in next(csv.reader([first]))]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise LabelError(f"{name}: header repeats column(s) {', '.join(map(repr, dupes))}")
    missing = [c for c in (*META_COLUMNS, *tasks) if c not in header]
    if missing:
        raise LabelError(f"{name}: header is missing column(s) {', '.join(map(repr, missing))} "
                         f"(a CheXpert-format CSV has {', '.join(META_COLUMNS)} and the observation columns)")
    return header


def _parse_task(values: pa.ChunkedArray, name: str, column: str) -> np.ndarray:
    values = pc.utf8_trim_whitespace(values)
    index = pc.index_in(values, value_set=_VALUE_SET)
    if index.null_count:
        bad = np.flatnonzero(index.is_null().to_numpy(zero_copy_only=False))
        i = int(bad[0])
        more = f" ({len(bad)} bad values in that column)" if len(bad) > 1 else ""
        raise LabelError(f"{name}: row {i + 1} (line {i + 2}), column {column!r}: value "
                         f"{values[i].as_py()!r} is not 1.0, 0.0, -1.0 or blank{more}")
    return _VALUE_OF[index.to_numpy(zero_copy_only=False)]


def _path_problems(path: pa.ChunkedArray) -> np.ndarray:
    """Reason a Path cannot be used ('' when fine): empty, absolute, '..', not patient/study/file."""
    def hits(pattern):
        return pc.match_substring_regex(path, pattern).to_numpy(zero_copy_only=False)
    reason = np.full(len(path), "", dtype=object)
    reason[~hits(_STUDY_RE)] = "Path does not end in patientX/studyY/FILE"
    reason[hits(r"(?:^|[/\\])\.\.(?:[/\\]|$)")] = "Path contains '..' (escapes the image root)"
    reason[hits(r"^(?:[/\\]|[A-Za-z]:|[A-Za-z][A-Za-z0-9+.-]*://)")] = "Path is absolute (escapes the image root)"
    reason[pc.equal(path, "").to_numpy(zero_copy_only=False)] = "empty Path"
    return reason


def _read_one(location: str, tasks: tuple[str, ...], name: str) -> tuple[pa.Table, str]:
    data, digest = _read_source(location)
    text = _text(data, name)
    header = _check_header(text, name, tasks)
    wanted = list(dict.fromkeys((*META_COLUMNS, *tasks)))
    try:
        table = pacsv.read_csv(
            io.BytesIO(text.encode("utf-8")),
            read_options=pacsv.ReadOptions(column_names=header, skip_rows=1),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                                 include_columns=wanted, strings_can_be_null=False))
    except pa.ArrowInvalid as exc:
        raise LabelError(f"{name}: not a readable CSV: {str(exc).splitlines()[0]}") from None
    if table.num_rows == 0:
        raise LabelError(f"{name}: empty CSV (a header but no data rows)")
    return table, digest


# --- the whole label stage -----------------------------------------------------------------------------
def _source_names(csv_paths: list[str]) -> list[str]:
    names = [posixpath.basename(storage.display(p).rstrip("/")) or str(p) for p in csv_paths]
    return [storage.display(p) if names.count(n) > 1 else n for p, n in zip(csv_paths, names)]


def _split_from_stem(name: str) -> str:
    base = posixpath.basename(name)
    for suffix in (".gz", ".csv"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base


def read_labels(csv_paths, policy: Mapping[str, str] | str | None = None, tasks: Iterable[str] = TASKS) -> LabelSet:
    """Read CheXpert-format CSVs (``.gz`` too, any storage location) into study-level labels.

    ``csv_paths`` is one location or a list; rows keep their CSV order. Raises ``LabelError`` for a
    missing file, a bad header, a bad label value or a CSV without data rows.
    """
    if isinstance(csv_paths, (str, os.PathLike)):
        csv_paths = [csv_paths]
    csv_paths = [str(p) for p in csv_paths]
    if not csv_paths:
        raise LabelError("no CSV given")
    tasks = tuple(tasks)
    if not tasks:
        raise LabelError("no tasks given")
    policy = _resolve_policy(policy, tasks)
    names = _source_names(csv_paths)

    paths, views, ap_pas, csv_names, csv_rows, stem_splits, raws = [], [], [], [], [], [], []
    sources = {}
    for location, name in zip(csv_paths, names):
        table, digest = _read_one(location, tasks, name)
        sources[name] = digest
        n = table.num_rows
        paths.append(pc.utf8_trim_whitespace(table["Path"]))
        views.append(pc.utf8_trim_whitespace(table["Frontal/Lateral"]))
        ap_pas.append(pc.utf8_trim_whitespace(table["AP/PA"]))
        csv_names.append(np.full(n, name, dtype=object))
        csv_rows.append(np.arange(1, n + 1, dtype="int64"))
        stem_splits.append(np.full(n, _split_from_stem(name), dtype=object))
        raws.append({t: _parse_task(table[t], name, t) for t in tasks})
    path = pa.chunked_array([c for p in paths for c in p.chunks], type=pa.string())
    rows_in = len(path)

    # Rows that cannot be placed under the image root or grouped into a study are refused, with why.
    reason = _path_problems(path)
    image_id = path.to_numpy(zero_copy_only=False).astype(object)
    source_csv, source_row = np.concatenate(csv_names), np.concatenate(csv_rows)
    ok = reason == ""
    ids = pd.Series(np.where(ok, image_id, None), dtype=object)
    dup = (ids.duplicated(keep="first") & ok).to_numpy()
    if dup.any():
        first = pd.DataFrame({"csv": source_csv, "row": source_row}, index=image_id)[ok & ~dup]
        at = first.loc[image_id[dup]]
        reason[dup] = [f"duplicate Path (first seen in {c} row {r})" for c, r in zip(at["csv"], at["row"])]
    rejected = reason != ""
    rejects = [Reject(str(c), int(r), str(p), str(why)) for c, r, p, why in zip(
        source_csv[rejected], source_row[rejected], image_id[rejected], reason[rejected])]
    keep = ~rejected

    def strings(chunks):
        return pa.chunked_array([c for p in chunks for c in p.chunks], type=pa.string()).filter(pa.array(keep))

    kept = path.filter(pa.array(keep))
    parts = pc.extract_regex(kept, _STUDY_RE)
    patient = pc.struct_field(parts, "patient")
    study = pc.binary_join_element_wise(patient, pc.struct_field(parts, "study"), "/")
    split = pc.struct_field(pc.extract_regex(kept, _SPLIT_RE), "split")  # null: no train/valid folder
    stem_split = np.concatenate(stem_splits)[keep]
    split = np.where(split.is_null().to_numpy(zero_copy_only=False), stem_split,
                     split.fill_null("").to_numpy(zero_copy_only=False))

    def blank_to_none(values):
        arr = values.to_numpy(zero_copy_only=False).astype(object)
        arr[arr == ""] = None
        return arr

    rows = pd.DataFrame({
        "image_id": image_id[keep],
        "study_id": study.to_numpy(zero_copy_only=False),
        "patient_id": patient.to_numpy(zero_copy_only=False),
        "split": split.astype(object),
        "view": blank_to_none(strings(views)),
        "ap_pa": blank_to_none(strings(ap_pas)),
        "source_csv": source_csv[keep],
        "source_row": source_row[keep],
    })
    for t in tasks:
        rows[raw_column(t)] = np.concatenate([r[t] for r in raws])[keep]
    return finish_labels(rows, tasks, policy, rejects=rejects, sources=sources, rows_in=rows_in)


def finish_labels(rows: pd.DataFrame, tasks: tuple[str, ...], policy: Mapping[str, str] | str | None,
                  rejects: list[Reject], sources: dict[str, str], rows_in: int) -> LabelSet:
    """What every dataset adapter ends with: study-level raw values, then the policy per task.

    ``rows`` holds ``FRAME_COLUMNS`` (plus ``image_path`` when the file is not at ``image_id``) and
    ``raw_<key>`` per task; it is changed in place.
    """
    tasks = tuple(tasks)
    policy = _resolve_policy(policy, tasks)
    conflicts = _unify_studies(rows, tasks)
    for t in tasks:
        rows[label_column(t)] = apply_policy(rows[raw_column(t)], policy[t])
    extra = ["image_path"] if "image_path" in rows.columns else []
    columns = [*FRAME_COLUMNS, *extra, *[raw_column(t) for t in tasks], *[label_column(t) for t in tasks]]
    return LabelSet(frame=rows[columns].reset_index(drop=True), rejects=rejects, conflicts=conflicts,
                    sources=sources, rows_in=rows_in, policy=policy, tasks=tasks)


def parse_label_values(values: pd.Series, name: str, column: str, first_row: int = 1) -> np.ndarray:
    """Label cells (text) -> float32 1/0/-1/NaN, the CheXpert convention every adapter shares.

    A value outside it is a ``LabelError`` naming the file, the 1-based data row and the column.
    """
    text = values.fillna("").astype(str).str.strip()
    known = text.isin(list(_VALUE_TEXT))
    if not known.all():
        bad = np.flatnonzero(~known.to_numpy())
        i = int(bad[0])
        more = f" ({len(bad)} bad values in that column)" if len(bad) > 1 else ""
        raise LabelError(f"{name}: row {i + first_row}, column {column!r}: value {text.iloc[i]!r} "
                         f"is not 1.0, 0.0, -1.0 or blank{more}")
    return text.map(_VALUE_TEXT).to_numpy(dtype="float32")


def read_table(location: str, name: str, required: Iterable[str], what: str) -> tuple[pd.DataFrame, str]:
    """A CSV (``.gz`` too, any storage location) as text columns, and the sha256 of its bytes.

    ``required`` columns must all be present; a missing one is a ``LabelError`` naming them all and
    ``what`` (the layout the adapter expects). Blank cells read as ''.
    """
    data, digest = _read_source(location)
    text = _text(data, name)
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise LabelError(f"{name}: not a readable CSV: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise LabelError(f"{name}: missing column(s) {', '.join(map(repr, missing))} ({what})")
    if frame.empty:
        raise LabelError(f"{name}: empty table (a header but no data rows)")
    return frame, digest


def read_source(location: str, name: str) -> tuple[str, str]:
    """Any text file of a dataset (a split list): its text and the sha256 of its bytes."""
    data, digest = _read_source(location)
    return _text(data, name), digest


def source_names(locations) -> list[str]:
    """Short names for the manifest and reject rows: the file name, the full location when two clash."""
    return _source_names([str(p) for p in locations])


def _unify_studies(rows: pd.DataFrame, tasks: tuple[str, ...]) -> list[dict]:
    """Give every image of a study the same raw value per task (in place); return the disagreements.

    Vectorised over all rows: each raw value gets its rank in ``CONFLICT_ORDER`` and a study takes
    its maximum rank; a study whose max and min rank differ is a conflict. Only the (few) conflicting
    studies are then walked in Python to build their records.
    """
    if rows.empty:
        return []
    group = pd.factorize(rows["split"] + "|" + rows["study_id"])[0]
    value_of = np.array(CONFLICT_ORDER, dtype="float32")
    rank_of = {v: i for i, v in enumerate(CONFLICT_ORDER) if not np.isnan(v)}
    original, differs = {}, {}
    for t in tasks:
        col = raw_column(t)
        ranks = pd.Series(rows[col].map(rank_of).fillna(0).astype("int8").to_numpy()).groupby(group)
        hi, lo = ranks.transform("max").to_numpy(), ranks.transform("min").to_numpy()
        if (hi != lo).any():
            original[t], differs[t] = rows[col].to_numpy().copy(), hi != lo
            rows[col] = value_of[hi]
    if not differs:
        return []
    positions = np.flatnonzero(np.logical_or.reduce(list(differs.values())))
    sub = rows.iloc[positions]
    image_ids = sub["image_id"].to_numpy(dtype=object)
    resolved_of = {t: rows[raw_column(t)].to_numpy() for t in differs}
    conflicts = []
    for (split, study), idx in sub.groupby(["split", "study_id"], sort=False).indices.items():
        where = positions[idx]
        record = {"split": split, "study_id": study, "images": [str(i) for i in image_ids[idx]], "tasks": {}}
        for t in tasks:
            if t in differs and differs[t][where[0]]:
                resolved = resolved_of[t][where[0]]
                record["tasks"][t] = {"values": [None if np.isnan(v) else float(v) for v in original[t][where]],
                                      "resolved": None if np.isnan(resolved) else float(resolved)}
        conflicts.append(record)
    return conflicts


def rejects_frame(rejects: list[Reject]) -> pd.DataFrame:
    """The rejects as a table with the columns of the store's ``rejects.csv``: csv, row, path, reason."""
    return pd.DataFrame([r.__dict__ for r in rejects], columns=["csv", "row", "path", "reason"])
