"""Sample sheet: one row per slide with slide_id, patient_id, path, label (optional mpp).

The label column's meaning is the task's (``Endpoint``): 0/1 or two classes (binary), class names or numbers
(multiclass), a number (regression); a survival sheet carries a time and an event column instead.

The sheet is checked as a whole and every problem is reported at once, so a
user fixes a 1,000-row sheet in one go instead of one error per run.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from slidemil.errors import SheetError
from slidemil.names import BINARY, EVENT_COLUMN, SLIDE_ID_CHARS, SLIDE_ID_PATTERN, TIME_COLUMN

REQUIRED_COLUMNS = ("slide_id", "patient_id", "path", "label")


@dataclass(frozen=True)
class Endpoint:
    """What the sheet's outcome columns must hold: the config's ``task``, ``splits.folds`` (each class of a
    multiclass task needs a patient per fold) and the survival columns' names."""

    task: str = BINARY
    folds: int | None = None
    time_column: str = TIME_COLUMN
    event_column: str = EVENT_COLUMN

    @property
    def required(self) -> tuple[str, ...]:
        if self.task == "survival":
            return (*REQUIRED_COLUMNS[:3], self.time_column, self.event_column)
        return REQUIRED_COLUMNS


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a CSV or TSV table with ids kept as strings; the separator is the header's."""
    return pd.read_csv(path, sep=table_separator(path), dtype={"slide_id": str, "patient_id": str})


def table_separator(path: str | os.PathLike) -> str:
    """Tab, comma or semicolon, whichever splits the header line into the most columns.

    The file's name does not decide: a spreadsheet saves a comma-separated ``.txt`` or a semicolon ``.csv``,
    and read with the wrong separator it is one column that the sheet check reports as missing columns.
    """
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        header = f.readline()
    default = "\t" if str(path).endswith((".tsv", ".txt")) else ","
    counts = {sep: header.count(sep) for sep in (default, "\t", ",", ";")}
    return max(counts, key=counts.get)  # ties keep the name's separator (listed first)


def load_sheet(path: str | os.PathLike, check_files: bool = True, binarize: str | None = None,
               positive_class=None, both_classes: bool = False, endpoint: Endpoint | None = None) -> pd.DataFrame:
    """Read and check a sample sheet; relative slide paths resolve against the sheet's folder.

    ``binarize`` / ``positive_class`` are the split settings the label column must fit; ``both_classes``: a
    sheet to split and train on must hold both classes (a sheet for SimCLR or a report need not).

    Returns the sheet with ``path`` made absolute. Raises SheetError listing all problems.
    """
    path = Path(path)
    sheet = read_sheet_table(path)
    problems = check_sheet(sheet, base_dir=path.parent, check_files=check_files, binarize=binarize,
                           positive_class=positive_class, both_classes=both_classes, endpoint=endpoint)
    if problems:
        raise SheetError(path, problems)
    sheet = sheet.copy()
    if endpoint is not None and endpoint.task == "survival" and "label" not in sheet.columns:
        sheet["label"] = sheet[endpoint.event_column]
    sheet["path"] = [str(resolve_path(p, path.parent)) for p in sheet["path"]]
    return sheet


def read_sheet_table(path: Path) -> pd.DataFrame:
    """The sheet as read, unchecked; SheetError when it is missing or not a table."""
    if not path.is_file():
        raise SheetError(path, [f"file not found: {path}"])
    try:
        return read_table(path)
    except Exception as err:  # pandas raises many types for unreadable tables
        raise SheetError(path, [f"cannot be read as a table: {err}"]) from err


def resolve_path(value: str, base_dir: str | os.PathLike) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else (Path(base_dir) / p).resolve()


def check_sheet(sheet: pd.DataFrame, base_dir: str | os.PathLike = ".", check_files: bool = True,
                binarize: str | None = None, positive_class=None, both_classes: bool = False,
                endpoint: Endpoint | None = None) -> list[str]:
    """Every problem of the sheet as a readable line; empty when the sheet is fine.

    Binary task (the default): the label column must be binary (0/1, true/false, or two classes one of which
    is ``positive_class``) unless ``binarize`` names how to binarise a numeric label. Other tasks: see
    :func:`endpoint_problems`.
    """
    endpoint = endpoint or Endpoint()
    problems = []
    missing = [c for c in endpoint.required if c not in sheet.columns]
    if missing:
        problems.append(f"missing column(s) {', '.join(missing)} (found: {', '.join(map(str, sheet.columns))})")
        return problems
    if sheet.empty:
        return ["has no rows"]
    for col in ("slide_id", "patient_id", "path"):
        empty = sheet.index[sheet[col].isna() | (sheet[col].astype(str).str.strip() == "")]
        if len(empty):
            problems.append(f"empty {col} in row(s) {_rows(empty)}")
    dup = sheet["slide_id"][sheet["slide_id"].duplicated(keep=False)].dropna().unique()
    if len(dup):
        problems.append(f"duplicate slide_id(s): {', '.join(map(str, dup[:20]))}")
    problems += _slide_id_problems(sheet["slide_id"])
    if check_files:
        # Without files on this machine (a planned demo, a report's copy of the sheet) there is nothing to resolve.
        problems += _shared_file_problems(sheet, base_dir)
    if endpoint.task != BINARY:
        problems += endpoint_problems(sheet, endpoint)
    else:
        problems += _binary_problems(sheet, binarize, positive_class, both_classes)
    if "mpp" in sheet.columns:
        mpp = pd.to_numeric(sheet["mpp"], errors="coerce")
        bad = sheet.index[sheet["mpp"].notna() & ~(mpp > 0)]
        if len(bad):
            problems.append(f"mpp must be a positive number (row(s) {_rows(bad)})")
    if check_files:
        # One resolve per row: on a 1,000-slide sheet this check runs at every DAG build.
        unreadable = [str(p) for p in sheet["path"].dropna() if not _readable_file(resolve_path(p, base_dir))]
        if unreadable:
            more = f" and {len(unreadable) - 10} more" if len(unreadable) > 10 else ""
            problems.append(f"slide file(s) missing or unreadable: {', '.join(unreadable[:10])}{more}")
    return problems


def _binary_problems(sheet: pd.DataFrame, binarize: str | None, positive_class, both_classes: bool) -> list[str]:
    problems = _outcome_column_problems(sheet, "label")
    label_problem = _label_problem(sheet["label"].dropna(), binarize, positive_class)
    if label_problem:
        problems.append(label_problem)
    elif both_classes:
        problems += _one_class_problem(sheet["label"].dropna())
    return problems


def _outcome_column_problems(sheet: pd.DataFrame, column: str) -> list[str]:
    """Empty cells, and patients whose slides disagree, in an outcome column."""
    problems = []
    empty = sheet.index[sheet[column].isna()]
    if len(empty):
        problems.append(f"missing {column} in row(s) {_rows(empty)}")
    values = sheet.dropna(subset=[column]).groupby("patient_id")[column].nunique()
    conflicting = values.index[values > 1].tolist()
    if conflicting:
        what = "labels" if column == "label" else f"{column} values"
        problems.append(f"patient(s) with different {what} on their slides: {', '.join(map(str, conflicting[:20]))}")
    return problems


def endpoint_problems(sheet: pd.DataFrame, endpoint: Endpoint) -> list[str]:
    """Every way the outcome columns do not fit a multiclass, survival or regression task."""
    if endpoint.task == "survival":
        return _survival_problems(sheet, endpoint)
    problems = _outcome_column_problems(sheet, "label")
    labels = sheet.dropna(subset=["label"])
    if endpoint.task == "regression":
        numeric = pd.to_numeric(labels["label"], errors="coerce")
        bad = labels.index[numeric.isna() | ~np.isfinite(numeric.fillna(0))]
        if len(bad):
            shown = ", ".join(map(str, labels.loc[bad, "label"].astype(str).unique()[:10]))
            problems.append(f"task regression needs a numeric label; non-numeric value(s) {shown} in row(s) "
                            f"{_rows(bad)}")
        elif numeric.nunique() < 2:
            problems.append("task regression needs at least two distinct label values")
        return problems
    patients = labels.groupby("patient_id")["label"].first().astype(str)
    counts = patients.value_counts()
    if len(counts) < 2:
        problems.append(f"task multiclass needs at least two classes; the label column holds {len(counts)}")
    few = counts[counts < (endpoint.folds or 1)]
    if len(few):
        shown = ", ".join(f"{c!r} ({n})" for c, n in few.items())
        problems.append(f"class(es) with fewer patients than the {endpoint.folds} folds (splits.folds): {shown}; "
                        "add patients, merge classes or ask for fewer folds")
    return problems


def _survival_problems(sheet: pd.DataFrame, endpoint: Endpoint) -> list[str]:
    time_col, event_col = endpoint.time_column, endpoint.event_column
    problems = _outcome_column_problems(sheet, time_col) + _outcome_column_problems(sheet, event_col)
    times = pd.to_numeric(sheet[time_col], errors="coerce")
    bad = sheet.index[sheet[time_col].notna() & ~(times >= 0)]
    if len(bad):
        problems.append(f"{time_col} must be a number >= 0 (splits.time_column); row(s) {_rows(bad)} hold "
                        f"{', '.join(map(str, sheet.loc[bad, time_col].astype(str).unique()[:10]))}")
    events = pd.to_numeric(sheet[event_col], errors="coerce")
    bad = sheet.index[sheet[event_col].notna() & ~events.isin([0, 1])]
    if len(bad):
        problems.append(f"{event_col} must be 1 (event) or 0 (censored) (splits.event_column); row(s) {_rows(bad)} "
                        f"hold {', '.join(map(str, sheet.loc[bad, event_col].astype(str).unique()[:10]))}")
    elif events.notna().any() and not (events == 1).any():
        problems.append(f"no patient has an event ({event_col} = 1): survival needs events to learn from")
    return problems


def _slide_id_problems(ids: pd.Series) -> list[str]:
    # Ids become file names and Snakemake wildcards: "s{x}" would end the DAG with a WildcardError.
    bad = ids.index[ids.notna() & ~ids.astype(str).map(lambda s: bool(re.fullmatch(SLIDE_ID_PATTERN, s)))]
    if not len(bad):
        return []
    shown = ", ".join(repr(str(ids[i])) for i in list(bad)[:10])
    return [f"slide_id(s) {shown} in row(s) {_rows(bad)} unusable as file names; use only {SLIDE_ID_CHARS}"]


def _shared_file_problems(sheet: pd.DataFrame, base_dir) -> list[str]:
    """One slide file under two slide ids: its tiles could land in training and test (leakage)."""
    rows = sheet.dropna(subset=["path"])
    real = rows["path"].map(lambda p: os.path.realpath(resolve_path(p, base_dir)))
    problems = []
    for file, group in rows.groupby(real, sort=False):
        if group["slide_id"].nunique() > 1:
            ids = ", ".join(map(str, group["slide_id"].unique()[:5]))
            patients = ", ".join(map(str, group["patient_id"].unique()[:5]))
            problems.append(f"slide file {file} is listed under slide_ids {ids} (patients {patients}) in rows "
                            f"{_rows(group.index)}: one slide, one row, or it may sit in training and test")
    return problems[:20]


def _label_problem(labels: pd.Series, binarize: str | None, positive_class) -> str | None:
    # The same rules the splits stage applies, checked before any job runs.
    if labels.empty:
        return None
    distinct = sorted(labels.astype(str).unique())
    shown = ", ".join(distinct[:10]) + (" ..." if len(distinct) > 10 else "")
    if binarize is not None:
        text = labels[pd.to_numeric(labels, errors="coerce").isna()].astype(str).unique()
        if len(text):
            return (f"splits.binarize: {binarize} needs a numeric label; non-numeric value(s): "
                    f"{', '.join(text[:10])}")
        return None
    if positive_class is not None:
        if str(positive_class) not in distinct or len(distinct) != 2:
            return (f"label values ({shown}) must be two classes including splits.positive_class "
                    f"{str(positive_class)!r}")
        return None
    numeric = pd.to_numeric(labels, errors="coerce")
    binary = (numeric.notna().all() and set(numeric.unique()) <= {0, 1}) or \
        set(labels.astype(str).str.lower().unique()) <= {"true", "false"}
    if not binary:
        return (f"the label column is not binary (values: {shown}); use 0/1 labels, name the positive class "
                "(splits.positive_class), or binarise a numeric label (splits.binarize: median or tertiles)")
    return None


def _one_class_problem(labels: pd.Series) -> list[str]:
    # Every split would hold one class: no AUC, and training would fail only after tiling and features.
    numeric = pd.to_numeric(labels, errors="coerce")
    # "1" and "1.0", "true" and "True" are one class.
    classes = labels.astype(str).str.lower().unique() if numeric.isna().any() else numeric.unique()
    if len(classes) != 1:
        return []
    value = labels.iloc[0]
    return [f"every label is {str(value)!r}: a classifier needs slides of both classes; "
            "add the other class's slides to the sheet"]


def _readable_file(path: Path) -> bool:
    # A folder is a DICOM WSI series (slidemil.slides.reader.open_slide picks its file).
    return (path.is_file() or path.is_dir()) and os.access(path, os.R_OK)


def _rows(index) -> str:
    # Rows as a user sees them in a spreadsheet: header is line 1.
    return ", ".join(str(i + 2) for i in list(index)[:20])
