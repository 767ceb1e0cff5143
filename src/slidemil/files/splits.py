"""splits.csv, the patient-level splits: one row per slide with slide_id, patient_id, label (0/1),
label_value, and one column fold_k per fold holding train, val, test or excluded; a ``format_version``
column (the same value on every row) says which format the file follows.

Written by ``slidemil.cohort.splits``; read by MIL training and the tile-supervised baseline (one fold,
``read_fold``), SimCLR (the never-test slides), the cohort facts and the report (``read_splits``).
A splits file made by hand (predefined splits) needs no ``format_version`` column: it is version 1.

Endpoints beyond binary (slidemil.tasks) add a ``task`` column (the same value on every row): multiclass labels
are class indices 0..K-1 with the class names in ``label_value``; a regression label is the target; a survival
label is the event (1) or censoring (0), with the follow-up time in a ``time`` column. Without the column the
task is binary.
"""

from __future__ import annotations

import os

import pandas as pd

from slidemil.errors import SplitError
from slidemil.files import FORMAT_VERSION, check_format, write_csv
from slidemil.names import BINARY, TASKS

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
    task, _ = split_task(table, path)
    extra = ["time"] if task == "survival" else []
    missing = [c for c in extra if c not in table.columns]
    if missing:
        raise SplitError(f"{path}: a survival splits file needs a time column")
    split = table.loc[table[column] != "excluded", ["slide_id", "patient_id", "label", *extra, column]]
    split = split.rename(columns={column: "partition"}).reset_index(drop=True)
    split["label"] = _labels(split, task, path, column)
    if extra:
        split["time"] = _numbers(split["time"], path, f"times of the slides used in {column}")
    shared = split.groupby("patient_id")["partition"].nunique()
    if (shared > 1).any():
        raise SplitError(f"{path}: patient(s) in two partitions of {column}: {', '.join(shared.index[shared > 1][:20])}")
    for part in ("train", "val"):
        if not (split["partition"] == part).any():
            raise SplitError(f"{path}: {column} has no {part} slides")
    return split


def split_task(table: pd.DataFrame, path: str | os.PathLike = "splits.csv") -> tuple[str, list[str] | None]:
    """The task a splits table was drawn for and, for multiclass, its class names in index order."""
    tasks = table["task"].dropna().unique() if "task" in table.columns else [BINARY]
    if len(tasks) != 1 or tasks[0] not in TASKS:
        raise SplitError(f"{path}: the task column must hold one of {', '.join(TASKS)} on every row")
    task = str(tasks[0])
    if task != "multiclass":
        return task, None
    pairs = table.dropna(subset=["label"]).drop_duplicates("label")
    names = dict(zip(pd.to_numeric(pairs["label"]).astype(int), pairs["label_value"].astype(str)))
    if sorted(names) != list(range(len(names))):
        raise SplitError(f"{path}: multiclass labels must number the classes 0..K-1; found {sorted(names)}")
    return task, [names[k] for k in range(len(names))]


def _labels(split: pd.DataFrame, task: str, path, column: str) -> pd.Series:
    labels = _numbers(split["label"], path, f"labels of the slides used in {column}")
    if task == "regression":
        return labels.astype(float)
    allowed = "0 or 1" if task in (BINARY, "survival") else "class indices 0..K-1"
    if (labels != labels.round()).any() or (labels < 0).any() or (task != "multiclass" and (labels > 1).any()):
        raise SplitError(f"{path}: labels of the slides used in {column} must be {allowed}")
    return labels.astype(int)


def _numbers(values: pd.Series, path, what: str) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.isna().any():
        raise SplitError(f"{path}: {what} must be numbers; found {sorted(map(str, set(values[numbers.isna()])))[:5]}")
    return numbers


def never_test_slides(path: str | os.PathLike) -> list[str]:
    """Slides that are not ``test`` in any fold (training, validation and unlabelled slides)."""
    table = read_splits(path)
    ever_test = (table[fold_columns(table)] == "test").any(axis=1)
    return table.loc[~ever_test, "slide_id"].tolist()
