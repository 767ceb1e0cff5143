"""Who is in the study: slides, patients, tiles kept, excluded slides and split sizes.

The report reads them from the sample sheet, the manifests (tiles kept and
the reason a slide cannot be used from the feature manifest, tissue candidates
from the tile manifest; see slidemil.cohort.manifest) and splits.csv, never from
the N per-slide files: the manifests read those once, when they are made.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from slidemil.files.features import read_features_attrs
from slidemil.files.splits import fold_columns, read_splits

COHORT_COLUMNS = ["slide_id", "patient_id", "label", "n_tiles", "n_candidates", "excluded"]
SPLIT_COLUMNS = [
    "fold", "partition", "n_patients", "n_slides", "n_slides_without_tiles",
    "n_patients_negative", "n_patients_positive",
]
NO_TILES = "no tissue tiles"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def feature_file_facts(path: str | os.PathLike) -> tuple[int, str]:
    """(number of tiles, exclusion reason) of a feature file; "" when the slide is usable.

    A file with zero rows and no recorded reason is a slide where tiling found no tissue.
    """
    n, attrs = feature_file_attrs(path)
    return n, exclusion_reason(n, attrs)


def feature_file_attrs(path: str | os.PathLike) -> tuple[int, dict]:
    """(number of tiles, attributes) of a feature file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: feature file not found")
    return read_features_attrs(path)


def exclusion_reason(n: int, attrs: dict) -> str:
    """Why a slide with ``n`` feature rows and these attributes cannot be used; "" when it can."""
    reason = _text(attrs.get("excluded", "")).strip()
    if reason in ("null", "None"):
        reason = ""
    if n == 0 and not reason:
        reason = NO_TILES
    return reason


def cohort_table(sheet: pd.DataFrame, features: pd.DataFrame, tiles: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per slide of the sheet: patient, label, tiles kept (and candidates), exclusion reason.

    ``features`` / ``tiles``: a feature and the tile manifest as read by
    slidemil.cohort.manifest.read_manifest_table.
    """
    feats = features.set_index("slide_id")
    missing = [str(s) for s in sheet["slide_id"] if str(s) not in feats.index]
    if missing:
        raise ValueError(f"the feature manifest lists no file for slide(s) {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    candidates = {} if tiles is None else dict(zip(tiles["slide_id"], tiles["n_candidates"]))
    rows = []
    for row in sheet.itertuples(index=False):
        slide = str(row.slide_id)
        rows.append({"slide_id": slide, "patient_id": str(row.patient_id), "label": row.label,
                     "n_tiles": int(feats.at[slide, "n_tiles"]), "n_candidates": float(candidates.get(slide, np.nan)),
                     "excluded": str(feats.at[slide, "excluded"])})
    return pd.DataFrame(rows, columns=COHORT_COLUMNS)


def excluded_from_manifests(features: list[pd.DataFrame]) -> pd.DataFrame:
    """Slides that cannot be used and why (columns slide_id, reason), once each over the feature manifests."""
    frames = [f.loc[f["excluded"] != "", ["slide_id", "excluded"]] for f in features]
    if not frames:
        return pd.DataFrame(columns=["slide_id", "reason"])
    table = pd.concat(frames).rename(columns={"excluded": "reason"})
    return table.drop_duplicates("slide_id").reset_index(drop=True)


def cohort_facts(table: pd.DataFrame) -> dict:
    """Counts a reader wants first: slides, patients, per label, tiles per usable slide, exclusions."""
    usable = table[table["excluded"] == ""]
    labels = {}
    for label, group in table.groupby(table["label"].astype(str), sort=True):
        labels[label] = {"slides": int(len(group)), "patients": int(group["patient_id"].nunique())}
    tiles = usable["n_tiles"]
    return {
        "n_slides": int(len(table)),
        "n_patients": int(table["patient_id"].nunique()),
        "n_slides_excluded": int(len(table) - len(usable)),
        "labels": labels,
        "tiles_per_slide": {
            "min": int(tiles.min()) if len(tiles) else 0,
            "median": float(tiles.median()) if len(tiles) else 0.0,
            "max": int(tiles.max()) if len(tiles) else 0,
            "total": int(tiles.sum()),
        },
    }


def split_summary(splits_csv: str | os.PathLike, without_tiles: set[str] | None = None) -> pd.DataFrame:
    """Patients and slides per fold and partition, with the patients of each label.

    ``without_tiles``: slides with no usable tiles; they are counted in their
    partition but training skips them, so they are also counted apart.
    """
    table = read_splits(splits_csv)
    folds = fold_columns(table)
    without_tiles = without_tiles or set()
    label = pd.to_numeric(table["label"], errors="coerce")
    rows = []
    for column in folds:
        for partition in ("train", "val", "test", "excluded"):
            part = table[table[column] == partition]
            if part.empty:
                continue
            patients = part.assign(y=label[part.index]).groupby("patient_id")["y"].first()
            rows.append({
                "fold": int(column.split("_")[1]),
                "partition": partition,
                "n_patients": int(len(patients)),
                "n_slides": int(len(part)),
                "n_slides_without_tiles": int(part["slide_id"].isin(without_tiles).sum()),
                "n_patients_negative": int((patients == 0).sum()),
                "n_patients_positive": int((patients == 1).sum()),
            })
    return pd.DataFrame(rows, columns=SPLIT_COLUMNS)


def excluded_slides(feature_files) -> pd.DataFrame:
    """Slides that cannot be used and why (columns slide_id, reason), from their feature files."""
    rows = []
    for path in feature_files:
        n, attrs = feature_file_attrs(path)
        reason = exclusion_reason(n, attrs)
        if reason:
            slide_id = _text(attrs.get("slide_id", os.path.splitext(os.path.basename(path))[0]))
            rows.append({"slide_id": slide_id, "reason": reason})
    return pd.DataFrame(rows, columns=["slide_id", "reason"])
