"""Splits for data that names none: patient-level, from a hash of the patient id.

A hash (not a random draw) gives every patient the same split whatever the row order, whichever
other patients are present and on every machine, so adding data never moves a patient.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

#: Split names a table may use, mapped onto the store's (MIMIC says 'validate').
SPLIT_NAMES = {"train": "train", "valid": "valid", "validate": "valid", "validation": "valid",
               "val": "valid", "test": "test"}


def patient_split(patients: pd.Series, valid_fraction: float) -> np.ndarray:
    """'train' / 'valid' per row: a patient is 'valid' when sha256(id) falls in the first fraction."""
    unique = pd.unique(patients.astype(str))
    cut = int(valid_fraction * 2 ** 32)
    valid = {p for p in unique if int.from_bytes(hashlib.sha256(p.encode()).digest()[:4], "big") < cut}
    return np.where(patients.astype(str).isin(valid), "valid", "train").astype(object)
