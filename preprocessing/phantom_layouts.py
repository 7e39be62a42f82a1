"""The phantom in every layout the store reads: the same planned studies, named and tabled the way
CheXpert, NIH ChestX-ray14, MIMIC-CXR-JPG or a generic CSV names them (docs/data.md).

``plan_phantom`` plans in CheXpert terms (rows of ``Path``, meta columns and 14 observations);
``layout_files`` maps each planned image to the file the layout would hold (or drops it: NIH has one
frontal image per study) and ``layout_tables`` writes the layout's label tables. The images are the
same pixels in every layout, so a store built from any of them has the same answer.
"""
from __future__ import annotations

import csv
import hashlib
import io
import re

from common.schema import META_COLUMNS, OBSERVATIONS, TASKS

LAYOUTS = ("chexpert", "nih", "mimic-cxr-jpg", "csv")
#: What the layout's tables are called; pass them all as --csv (``phantom.json`` lists them too).
TABLES = {
    "chexpert": ("train.csv", "valid.csv"),
    "nih": ("Data_Entry_2017_v2020.csv", "train_val_list.txt", "test_list.txt"),
    "mimic-cxr-jpg": ("mimic-cxr-2.0.0-chexpert.csv", "mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-split.csv"),
    "csv": ("labels.csv",),
}
#: The csv layout's column file (``--columns``).
CSV_COLUMNS_FILE = "columns.yaml"
#: CheXpert observation -> NIH finding where the two name one thing.
NIH_NAME = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Pleural Effusion": "Effusion",
            "Consolidation": "Consolidation", "Edema": "Edema", "Pneumonia": "Pneumonia",
            "Pneumothorax": "Pneumothorax", "Lung Lesion": "Nodule", "Lung Opacity": "Infiltration",
            "Pleural Other": "Pleural_Thickening"}
NIH_PER_FOLDER = 40      # images per images_NNN/images/ folder (NIH: ~10,000): small tests see several
_PATH = re.compile(r"^[^/]+/(?P<split>train|valid)/patient(?P<patient>\d+)/study(?P<study>\d+)/view(?P<view>\d+)_")


def _parts(path: str) -> dict:
    m = _PATH.match(path)
    return {"split": m["split"], "patient": int(m["patient"]), "study": int(m["study"]), "view": int(m["view"])}


def _dicom_id(path: str) -> str:
    h = hashlib.sha256(path.encode()).hexdigest()[:40]
    return "-".join(h[i:i + 8] for i in range(0, 40, 8))


def layout_files(layout: str, specs) -> list[tuple[object, str, str]]:
    """(spec, path under the root, 'JPEG' or 'PNG') of each image the layout holds."""
    out, n_nih = [], 0
    for spec in specs:
        p = _parts(spec.path)
        if layout == "chexpert":
            out.append((spec, spec.path, "JPEG"))
        elif layout == "nih":
            if p["view"] != 1:       # NIH: one frontal film per study (planned view 1 is frontal)
                continue
            folder = f"images_{n_nih // NIH_PER_FOLDER + 1:03d}/images"
            out.append((spec, f"{folder}/{p['patient']:08d}_{p['study'] - 1:03d}.png", "PNG"))
            n_nih += 1
        elif layout == "mimic-cxr-jpg":
            sub, study = 10_000_000 + p["patient"], 50_000_000 + p["patient"] * 10 + p["study"]
            out.append((spec, f"files/p{str(sub)[:2]}/p{sub}/s{study}/{_dicom_id(spec.path)}.jpg", "JPEG"))
        elif layout == "csv":
            out.append((spec, f"images/{p['split']}/p{p['patient']}_s{p['study']}_v{p['view']}.jpg", "JPEG"))
        else:
            raise ValueError(f"unknown phantom layout {layout!r}")
    return out


def _csv(header, rows) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


def layout_tables(layout: str, rows: dict, specs) -> dict[str, bytes]:
    """File name (at the root) -> bytes of every label table of the layout."""
    header = [*META_COLUMNS, *OBSERVATIONS]
    if layout == "chexpert":
        return {f"{split}.csv": _csv(header, rows[split]) for split in ("train", "valid")}
    by_path = {r[0]: dict(zip(header, r)) for split in ("train", "valid") for r in rows[split]}
    files = layout_files(layout, specs)
    if layout == "nih":
        table, lists = [], {"train": [], "valid": []}
        for spec, path, _ in files:
            row, p = by_path[spec.path], _parts(spec.path)
            # NIH labels are certain: a planted finding is positive, everything else negative.
            found = [NIH_NAME[t] for t in TASKS if t in spec.findings]
            found += [NIH_NAME[o] for o in OBSERVATIONS if o in NIH_NAME and o not in TASKS and row[o] == "1.0"]
            index = path.rsplit("/", 1)[1]
            table.append([index, "|".join(sorted(set(found))) or "No Finding", p["study"] - 1, p["patient"],
                          row["Age"], row["Sex"][0], row["AP/PA"] or "PA", spec.width, spec.height, 0.143, 0.143])
            lists[p["split"]].append(index)
        return {"Data_Entry_2017_v2020.csv": _csv(
                    ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                     "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"], table),
                "train_val_list.txt": "".join(f"{i}\n" for i in lists["train"]).encode(),
                "test_list.txt": "".join(f"{i}\n" for i in lists["valid"]).encode()}
    if layout == "mimic-cxr-jpg":
        labels, meta, split = {}, [], []
        for spec, path, _ in files:
            row, p = by_path[spec.path], _parts(spec.path)
            _, sub, study, name = path.rsplit("/", 3)
            sub, study, dicom = sub[1:], study[1:], name[:-4]
            labels[(sub, study)] = [sub, study, *[row[o] for o in OBSERVATIONS]]
            position = (row["AP/PA"] or "PA") if row["Frontal/Lateral"] == "Frontal" else "LATERAL"
            meta.append([dicom, sub, study, "CHEST (PA AND LAT)", position, spec.height, spec.width])
            split.append([dicom, study, sub, "validate" if p["split"] == "valid" else "train"])
        return {"mimic-cxr-2.0.0-chexpert.csv": _csv(["subject_id", "study_id", *OBSERVATIONS], labels.values()),
                "mimic-cxr-2.0.0-metadata.csv": _csv(["dicom_id", "subject_id", "study_id",
                                                      "PerformedProcedureStepDescription", "ViewPosition",
                                                      "Rows", "Columns"], meta),
                "mimic-cxr-2.0.0-split.csv": _csv(["dicom_id", "study_id", "subject_id", "split"], split)}
    table = []
    for spec, path, _ in files:
        row, p = by_path[spec.path], _parts(spec.path)
        table.append([path, f"P{p['patient']}", f"P{p['patient']}-E{p['study']}", p["split"],
                      row["Frontal/Lateral"], *[row[t] for t in TASKS]])
    columns = ("path: file\nlabels: [" + ", ".join(TASKS) + "]\nstudy: exam\npatient: subject\n"
               "split: fold\nview: projection\n")
    return {"labels.csv": _csv(["file", "subject", "exam", "fold", "projection", *TASKS], table),
            CSV_COLUMNS_FILE: columns.encode()}
