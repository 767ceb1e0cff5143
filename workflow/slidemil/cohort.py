"""Cohort-level facts gathered from the per-slide files, for the report."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import pandas as pd


def excluded_slides(feature_files) -> pd.DataFrame:
    """Slides marked excluded (file attribute ``excluded``) and why: columns slide_id, reason.

    ``feature_files``: paths of per-slide feature HDF5 files (slide id = attribute or file stem).
    """
    rows = []
    for path in feature_files:
        with h5py.File(os.fspath(path), "r") as f:
            reason = f.attrs.get("excluded", "")
            slide_id = f.attrs.get("slide_id", Path(path).stem)
        reason = reason.decode() if isinstance(reason, bytes) else str(reason)
        if reason:
            slide_id = slide_id.decode() if isinstance(slide_id, bytes) else str(slide_id)
            rows.append({"slide_id": slide_id, "reason": reason})
    return pd.DataFrame(rows, columns=["slide_id", "reason"])
