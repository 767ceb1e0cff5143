"""A deploy cohort's sample sheet: slides the trained models score, never train on.

Its sheet has the training sheet's columns (``slide_id``, ``patient_id``, ``path``, optional ``mpp``) with the
outcome optional: a labelled cohort is an external validation, an unlabelled one gets predictions only. The
outcome is the task's (``slidemil.cohort.sheet.Endpoint``): ``label`` 0/1 or two classes (binary), class names
among the training classes (multiclass), a number (regression), or the columns ``splits.time_column`` and
``splits.event_column`` (survival). A cohort that shares a slide file or a patient with the training cohort would
score the models on what they were fitted to: ``leakage_problems`` lists every overlap, and the workflow refuses
the cohort before any job runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from slidemil.cohort.sheet import Endpoint, check_sheet, read_sheet_table, resolve_path
from slidemil.cohort.splits import binary_labels
from slidemil.errors import SheetError
from slidemil.names import BINARY

LABEL = "label"
TIME = "time"


def load_deploy_sheet(path: str | os.PathLike, check_files: bool = True, positive_class=None,
                      endpoint: Endpoint | None = None, class_names: list | None = None) -> pd.DataFrame:
    """The checked sheet with absolute paths and, when labelled, the outcome as the predictions carry it
    (``outcomes``); SheetError lists all problems.

    An outcome column is all or nothing: a partly labelled cohort is refused (its metrics would silently leave
    patients out). Binary labels follow the training cohort's ``positive_class``; a label the training cohort
    binarised by its own quantiles (splits.binarize) must come binarised (0/1) here. Multiclass labels must be
    among ``class_names`` (the training classes) when given.
    """
    path, endpoint = Path(path), endpoint or Endpoint()
    sheet = read_sheet_table(path)
    labelled = sheet_is_labelled(sheet, endpoint)
    # The sheet check wants an outcome; an unlabelled cohort is checked as binary with a placeholder class.
    checked = sheet if labelled else sheet.assign(**{LABEL: 0})
    problems = check_sheet(checked, base_dir=path.parent, check_files=check_files,
                           positive_class=positive_class if labelled else None,
                           endpoint=endpoint if labelled else None)
    if labelled and endpoint.task == "multiclass" and LABEL in sheet.columns:
        problems += class_problems(sheet[LABEL], class_names)
    if problems:
        raise SheetError(path, problems)
    sheet = sheet.copy()
    sheet["path"] = [str(resolve_path(p, path.parent)) for p in sheet["path"]]
    return outcomes(sheet, endpoint, positive_class) if labelled else sheet.drop(columns=[LABEL], errors="ignore")


def sheet_is_labelled(sheet: pd.DataFrame, endpoint: Endpoint) -> bool:
    columns = [endpoint.time_column, endpoint.event_column] if endpoint.task == "survival" else [LABEL]
    return any(c in sheet.columns and sheet[c].notna().any() for c in columns)


def class_problems(labels: pd.Series, class_names: list | None) -> list[str]:
    """Multiclass labels the models were not trained on (they could never be predicted)."""
    unknown = sorted(set(labels.dropna().astype(str)) - set(map(str, class_names))) if class_names else []
    if not unknown:
        return []
    return [f"label(s) {', '.join(unknown)} are not among the training classes ({', '.join(map(str, class_names))}); "
            "rename them to the training class names or leave those rows out"]


def outcomes(sheet: pd.DataFrame, endpoint: Endpoint, positive_class=None) -> pd.DataFrame:
    """``label`` (and ``time``) as the predictions carry them: binary 0/1, multiclass the class name, regression
    a number, survival ``label`` the event (1) or censoring (0) and ``time`` the follow-up."""
    sheet = sheet.copy()
    if endpoint.task == BINARY:
        sheet[LABEL] = binary_labels(sheet[LABEL], positive_class).astype(int)
    elif endpoint.task == "multiclass":
        sheet[LABEL] = sheet[LABEL].astype(str)
    elif endpoint.task == "regression":
        sheet[LABEL] = sheet[LABEL].astype(float)
    else:
        times, events = sheet[endpoint.time_column].astype(float), sheet[endpoint.event_column].astype(int)
        sheet[LABEL], sheet[TIME] = events, times
    return sheet


def is_labelled(sheet: pd.DataFrame) -> bool:
    return LABEL in sheet.columns


def leakage_problems(training: pd.DataFrame, deploy: pd.DataFrame) -> list[str]:
    """Slide files and patient ids the deploy sheet shares with the training sheet (both with absolute paths)."""
    train_files = {os.path.realpath(p): s for p, s in zip(training["path"], training["slide_id"])}
    shared_files = [(s, p, train_files[os.path.realpath(p)]) for s, p in zip(deploy["slide_id"], deploy["path"])
                    if os.path.realpath(p) in train_files]
    shared_patients = sorted(set(deploy["patient_id"].astype(str)) & set(training["patient_id"].astype(str)))
    problems = [f"slide {s}: its file {p} is training slide {t}'s" for s, p, t in shared_files[:20]]
    if len(shared_files) > 20:
        problems.append(f"... and {len(shared_files) - 20} more shared slide files")
    if shared_patients:
        more = f" and {len(shared_patients) - 20} more" if len(shared_patients) > 20 else ""
        problems.append(f"patient id(s) also in the training cohort: {', '.join(shared_patients[:20])}{more}")
    if problems:
        problems.append("a deploy cohort must be new to the models (leakage); remove these rows, or rename the "
                        "patients if they are different people")
    return problems


def check_no_leakage(training: pd.DataFrame, deploy: pd.DataFrame, sheet_path: str | os.PathLike) -> None:
    problems = leakage_problems(training, deploy)
    if problems:
        raise SheetError(sheet_path, problems)
