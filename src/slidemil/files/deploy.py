"""predictions_slides.csv and predictions_patients.csv of a deploy cohort: the column names, in one place.

Written by ``slidemil.deploy.predict`` (the predict job, ``slidemil predict``); read by ``slidemil.deploy.report``.

Each model output of the task (``slidemil.tasks``: binary ``prob``, P(class 1); multiclass ``prob_0`` ...
``prob_<K-1>``, class probabilities in the checkpoint's class order; survival ``risk``; regression ``pred``, in
the target's units) gets one column per fold model, ``<output>_fold_<k>``, then the ensemble, the mean over
folds, ``<output>_ensemble`` and its spread, the standard deviation over folds (ddof 0),
``<output>_fold_std``. A binary file therefore has ``prob_fold_<k>``, ``prob_ensemble``, ``prob_fold_std``.
With ``deploy.refit`` the model retrained on all non-test patients (``slidemil.mil.refit``) adds
``<output>_refit`` after the fold columns; it is not part of the ensemble.
Multiclass adds ``predicted_class``, the class name of the ensemble's highest probability.

Before them: slide_id, patient_id, the outcome columns when the cohort is labelled (``label``: 0/1, a class
name, a number, or for survival the event, 1, or censoring, 0, with ``time``), and n_tiles, excluded (slides) or
n_slides (patients).
"""

from __future__ import annotations

import pandas as pd

FOLD = "_fold_"
ENSEMBLE_SUFFIX = "_ensemble"
SPREAD_SUFFIX = "_fold_std"
PREDICTED_CLASS = "predicted_class"
REFIT = "refit"
OUTCOME_COLUMNS = ("label", "time")
# A deploy cohort's report folder, relative to the main report's (results/report/deploy/<cohort>/).
REPORT_DIR = "deploy"
# What the deploy report's tables (metrics.csv, comparison.csv) call the ensemble among the fold models.
ENSEMBLE_NAME = "ensemble"


def fold_column(output: str, fold) -> str:
    return f"{output}{FOLD}{fold}"


def member_column(output: str, member: str) -> str:
    """A fold model's column (``member`` its fold), the refit model's (``refit``) or the ensemble's."""
    if member == REFIT:
        return f"{output}_{REFIT}"
    return ensemble_column(output) if member == ENSEMBLE_NAME else fold_column(output, member)


def has_refit(table: pd.DataFrame) -> bool:
    return any(c.endswith(f"_{REFIT}") for c in table.columns)


def ensemble_column(output: str) -> str:
    return f"{output}{ENSEMBLE_SUFFIX}"


def spread_column(output: str) -> str:
    return f"{output}{SPREAD_SUFFIX}"


def output_names(table: pd.DataFrame) -> list[str]:
    """The task's outputs of a predictions table, in column order (from their ensemble columns)."""
    return [c[: -len(ENSEMBLE_SUFFIX)] for c in table.columns if c.endswith(ENSEMBLE_SUFFIX)]


def fold_columns(table: pd.DataFrame, output: str) -> list[str]:
    """The fold models' columns of one output, in column order."""
    prefix = f"{output}{FOLD}"
    return [c for c in table.columns if c.startswith(prefix) and c != spread_column(output)]


def fold_names(table: pd.DataFrame) -> list[str]:
    """The fold models' names (``0``, ``1``, ...) of a predictions table."""
    first = output_names(table)[0]
    return [c[len(first) + len(FOLD):] for c in fold_columns(table, first)]


def outcome_columns(table: pd.DataFrame, task: str = "survival") -> list[str]:
    """The outcome columns of ``table`` that a predictions file of ``task`` carries (only survival has time)."""
    wanted = OUTCOME_COLUMNS if task == "survival" else OUTCOME_COLUMNS[:1]
    return [c for c in wanted if c in table.columns]


def report_page(cohort: str) -> str:
    """A deploy cohort's report page relative to the main report's folder (the main page links it)."""
    return f"{REPORT_DIR}/{cohort}/report.html"
