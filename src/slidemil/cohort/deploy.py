"""A deploy cohort's sample sheet: slides the trained models score, never train on.

Its sheet has the training sheet's columns (``slide_id``, ``patient_id``, ``path``, optional ``mpp``) with the
label optional: a labelled cohort is an external validation, an unlabelled one gets predictions only. A cohort
that shares a slide file or a patient with the training cohort would score the models on what they were fitted
to: ``leakage_problems`` lists every overlap, and the workflow refuses the cohort before any job runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from slidemil.cohort.sheet import check_sheet, read_sheet_table, resolve_path
from slidemil.cohort.splits import binary_labels
from slidemil.errors import SheetError

LABEL = "label"


def load_deploy_sheet(path: str | os.PathLike, check_files: bool = True, positive_class=None) -> pd.DataFrame:
    """The checked sheet with absolute paths and, when labelled, ``label`` as 0/1; SheetError lists all problems.

    A label column is all or nothing: a partly labelled cohort is refused (its AUC would silently leave
    patients out). Labels follow the training cohort's ``positive_class``; a label the training cohort binarised
    by its own quantiles (splits.binarize) must come binarised (0/1) here.
    """
    path = Path(path)
    sheet = read_sheet_table(path)
    labelled = LABEL in sheet.columns and sheet[LABEL].notna().any()
    # The sheet check wants a label column; an unlabelled cohort is checked with a placeholder class.
    checked = sheet if labelled else sheet.assign(**{LABEL: 0})
    problems = check_sheet(checked, base_dir=path.parent, check_files=check_files,
                           positive_class=positive_class if labelled else None)
    if problems:
        raise SheetError(path, problems)
    sheet = sheet.copy()
    sheet["path"] = [str(resolve_path(p, path.parent)) for p in sheet["path"]]
    if labelled:
        sheet[LABEL] = binary_labels(sheet[LABEL], positive_class).astype(int)
    else:
        sheet = sheet.drop(columns=[LABEL], errors="ignore")
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
