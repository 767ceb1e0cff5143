"""splits.csv, the patient-level splits: one row per slide with slide_id, patient_id, label (0/1),
label_value, and one column fold_k per fold holding train, val, test or excluded; a ``format_version``
column (the same value on every row) says which format the file follows.

Written by ``slidemil.cohort.splits``; read by MIL training and the tile-supervised baseline (one fold,
``read_fold``), SimCLR (the never-test slides), the cohort facts and the report (``read_splits``).
A splits file made by hand (predefined splits) needs no ``format_version`` column: it is version 1.
"""

from __future__ import annotations

import os

import pandas as pd

from slidemil.errors import SplitError
from slidemil.files import FORMAT_VERSION, check_format, write_csv

VERSION = 1
PARTITIONS = ("train", "val", "test", "excluded")
REQUIRED = ("slide_id", "patient_id", "label")


def fold_column_name(fold) -> str:
    """The column of fold ``fold``."""
    return f"fold_{fold}"


def fold_columns(splits: pd.DataFrame) -> list[str]:
    """The fold_k columns, in fold order."""
    return sorted((c for c in splits.columns if c.startswith("fold_")), key=lambda c: int(c.split("_")[1]))


def write_splits_csv(path: str | os.PathLike, splits: pd.DataFrame) -> None:
    write_csv(path, splits.assign(**{FORMAT_VERSION: VERSION}))


def read_splits(path: str | os.PathLike) -> pd.DataFrame:
    """The whole table (without the version column); its slide_id, patient_id, label and fold columns checked."""
    table = pd.read_csv(path, dtype={"slide_id": str, "patient_id": str})
    if FORMAT_VERSION in table.columns:
        versions = table[FORMAT_VERSION].dropna().unique()
        try:
            check_format(max(versions) if len(versions) else None, VERSION, path, "splits")
        except ValueError as err:
            raise SplitError(str(err)) from None
        table = table.drop(columns=FORMAT_VERSION)
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing or not fold_columns(table):
        raise SplitError(f"{path}: expected slide_id, patient_id, label and fold_0.. columns; "
                         f"missing {', '.join(missing + ([] if fold_columns(table) else ['fold_k']))}")
    return table


def read_fold(path: str | os.PathLike, fold: int) -> pd.DataFrame:
    """Slides of ``fold`` outside ``excluded``: slide_id, patient_id, label (int 0/1), partition."""
    table = read_splits(path)
    column = fold_column_name(fold)
    if column not in table.columns:
        raise SplitError(f"{path}: missing column(s) {column}")
    bad = sorted(set(table[column].dropna()) - set(PARTITIONS))
    if bad or table[column].isna().any():
        raise SplitError(f"{path}: {column} must be one of {', '.join(PARTITIONS)}; found {bad or 'empty cells'}")
    split = table.loc[table[column] != "excluded", ["slide_id", "patient_id", "label", column]]
    split = split.rename(columns={column: "partition"}).reset_index(drop=True)
    labels = pd.to_numeric(split["label"], errors="coerce")
    if not labels.isin([0, 1]).all():
        raise SplitError(f"{path}: labels of the slides used in {column} must be 0 or 1")
    split["label"] = labels.astype(int)
    shared = split.groupby("patient_id")["partition"].nunique()
    if (shared > 1).any():
        raise SplitError(f"{path}: patient(s) in two partitions of {column}: {', '.join(shared.index[shared > 1][:20])}")
    for part in ("train", "val"):
        if not (split["partition"] == part).any():
            raise SplitError(f"{path}: {column} has no {part} slides")
    return split


def never_test_slides(path: str | os.PathLike) -> list[str]:
    """Slides that are not ``test`` in any fold (training, validation and unlabelled slides)."""
    table = read_splits(path)
    ever_test = (table[fold_columns(table)] == "test").any(axis=1)
    return table.loc[~ever_test, "slide_id"].tolist()
