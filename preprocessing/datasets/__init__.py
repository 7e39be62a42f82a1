"""Dataset adapters: one module per label-table layout (chexpert, nih, mimic, csv_table), one
registry (base.py), one way in (``load_labels``), and the flags ``build`` and ``stats`` share.
Importing this package registers every adapter."""
from __future__ import annotations

from preprocessing.datasets import chexpert, csv_table, mimic, nih  # noqa: F401  (adapters register themselves)
from preprocessing.datasets.base import (Dataset, DatasetOptions, check_patient_splits,  # noqa: F401
                                         get_dataset, list_datasets, load_labels, register,
                                         resolve_tasks)
from preprocessing.datasets.csv_table import columns_from


def add_dataset_arguments(parser) -> None:
    """The flags ``build`` and ``stats`` share to pick and read a dataset."""
    parser.add_argument("--dataset", default="chexpert", metavar="NAME",
                        help=f"label-table layout: {', '.join(list_datasets())} (docs/data.md)")
    parser.add_argument("--tasks", default=None,
                        help="labels to keep, by the dataset's own names, comma separated, or 'all' "
                             "(default: the dataset's default tasks: CheXpert/MIMIC the five protocol "
                             "tasks, NIH its 14 findings, csv every label column)")
    parser.add_argument("--views", default=None,
                        help="nih, mimic-cxr-jpg: keep only these view positions, e.g. PA or PA,AP "
                             "(other rows are rejected with the reason, never dropped silently)")
    parser.add_argument("--valid-fraction", type=float, default=0.2,
                        help="share of patients put in 'valid' when the data names no split (by a hash "
                             "of the patient id: deterministic, patient-level)")
    group = parser.add_argument_group("csv dataset columns (or --columns FILE.yaml with the same keys)")
    group.add_argument("--columns", default=None, metavar="YAML",
                       help="YAML file with keys path, labels (list), study, patient, split, view")
    for role, text in (("path", "image path relative to --image-root (required)"),
                       ("labels", "label columns, comma separated (required)"),
                       ("study", "study id (default: one study per image)"),
                       ("patient", "patient id (default: the study)"),
                       ("split", "split: train / valid / test (default: patient-level split)"),
                       ("view", "view, e.g. Frontal / Lateral (default: blank)")):
        group.add_argument(f"--{role}-column", dest=f"{role}_column", default=None, help=text)


def options_from_args(args) -> DatasetOptions:
    views = tuple(v.strip().upper() for v in args.views.split(",") if v.strip()) if args.views else None
    columns = columns_from(args.columns, {r: getattr(args, f"{r}_column") for r in
                                          ("path", "labels", "study", "patient", "split", "view")})
    return DatasetOptions(views=views or None, valid_fraction=args.valid_fraction, columns=columns)


