"""The contract between the stages: CheXpert columns, the five tasks, the default uncertainty
policy and the store layout. Every other module imports these names instead of spelling them.

See docs/architecture.md for the store's file layout and the trial records built on top of it.
"""
from __future__ import annotations

# --- CheXpert CSV --------------------------------------------------------------------------
#: Columns a CheXpert-format CSV must have (observation columns beyond the tasks are optional).
META_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")

#: All 14 CheXpert observations, in the official column order.
OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)

#: The five evaluation tasks of the thesis protocol (docs/data.md), as CSV column names, in report order.
TASKS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def task_key(task: str) -> str:
    """Column-safe key of a task: 'Pleural Effusion' -> 'pleural_effusion'."""
    return task.strip().lower().replace(" ", "_").replace("/", "_")


TASK_KEYS = tuple(task_key(t) for t in TASKS)

# --- Uncertainty policy ----------------------------------------------------------------------
#: -1 -> 1 (ones), -1 -> 0 (zeros), -1 -> excluded (ignore). Blank is always excluded.
POLICIES = ("ones", "zeros", "ignore")

#: The thesis protocol: U-Ones for Atelectasis, Edema, Pleural Effusion; U-Zeros for Cardiomegaly;
#: U-Ignore for Consolidation.
DEFAULT_POLICY = {
    "Atelectasis": "ones",
    "Cardiomegaly": "zeros",
    "Consolidation": "ignore",
    "Edema": "ones",
    "Pleural Effusion": "ones",
}

# --- The store -------------------------------------------------------------------------------
DEFAULT_RESOLUTIONS = (160, 240, 320, 400, 480)
SPLITS = ("train", "valid")
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.csv"

#: CheXpert v1.0: 223,414 training images in 187,641 studies (1.19 a study) and 234 validation
#: images; the size a plan assumes before a store exists, and what turns studies into images.
CHEXPERT_TRAIN_IMAGES = 223_414
CHEXPERT_VALID_IMAGES = 234
IMAGES_PER_STUDY = 1.19


def images_per_batch(batch_studies: int) -> int:
    """Images in a batch of ``batch_studies`` CheXpert studies (40 studies -> 48 images)."""
    return round(batch_studies * IMAGES_PER_STUDY)


def raw_column(task: str) -> str:
    """Store column with the CSV value: 1.0, 0.0, -1.0 or null (blank)."""
    return f"raw_{task_key(task)}"


def label_column(task: str) -> str:
    """Store column with the label after the policy: 1.0, 0.0 or null (excluded for the task)."""
    return f"label_{task_key(task)}"


def shard_dir(resolution: int, split: str) -> str:
    """Relative folder of one Parquet dataset: one per resolution and split."""
    return f"res{int(resolution)}/{split}"
