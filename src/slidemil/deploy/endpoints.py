"""A labelled deploy cohort's numbers for a multiclass, survival or regression task (binary: deploy.report).

Per (extractor, model), every fold model and the ensemble (the mean of the folds' outputs) are scored on the
cohort's patients with the task's metrics (``slidemil.tasks``) and percentile-bootstrap 95 % CIs over the
patients (``slidemil.report.endpoints.bootstrap_metrics``); the paired comparison with ``report.reference_model``
is ``slidemil.report.endpoints.paired_difference`` over the folds (and their mean) and between the ensembles.

Figures, as the main report's (``slidemil.report.endpoints``): multiclass, the ensemble's confusion matrix and
one-vs-rest ROC curves; regression, predicted against true values of every fold model and the ensemble;
survival, Kaplan-Meier curves of the patients split at a median risk with the log-rank p-value. The split is the
training cohort's when its prediction files are given: a fold model's at the median risk of that fold's training
patients (as the main report), the ensemble's at the median ensemble risk of the training cohort's held-out test
patients (every fold scored them; none trained on them). Without them, at this cohort's own median risk, and the
page says so.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from slidemil.files import write_csv
from slidemil.files.deploy import ENSEMBLE_NAME, REFIT, fold_names, has_refit, member_column
from slidemil.report.endpoints import (bootstrap_metrics, draw_figure, figure_name, fold_metrics, logrank_p,
                                       metric_title, paired_difference)
from slidemil.tasks import Task

# Which median splits the Kaplan-Meier groups (doc["km_split"]).
KM_TRAINING, KM_COHORT = "training cohort", "this cohort"


def members(patients: pd.DataFrame) -> list[str]:
    """The fold models' names, the refit model's (deploy.refit) and the ensemble's, as the tables list them."""
    return [*fold_names(patients), *([REFIT] if has_refit(patients) else []), ENSEMBLE_NAME]


def member_table(patients: pd.DataFrame, task: Task, member: str) -> pd.DataFrame:
    """One fold model's (or the ensemble's) patients with the task's columns (``label`` a class index for
    multiclass, ``time``, the outputs), as slidemil.tasks' metrics read them."""
    columns = {member_column(o, member): o for o in task.output_columns}
    frame = patients[["patient_id", "label", *task.extra_columns, *columns]].rename(columns=columns)
    frame = frame.dropna(subset=task.output_columns).reset_index(drop=True)
    if task.name == "multiclass":
        index = {str(name): k for k, name in enumerate(task.class_names)}
        frame["label"] = frame["label"].astype(str).map(index)
    return frame


def training_reference(files: list[str | os.PathLike] | None, fold_ids: list[str]) -> dict[str, pd.DataFrame]:
    """The risks the Kaplan-Meier split takes its median from: per fold (``fold_ids`` in the files' order) its
    training patients', and for the ensemble the training cohort's test patients' mean risk over folds."""
    if not files:
        return {}
    reference, tests = {}, []
    for fold, path in zip(fold_ids, files):
        frame = pd.read_csv(path, dtype={"patient_id": str})
        reference[fold] = frame.loc[frame["partition"] == "train", ["patient_id", "risk"]]
        tests.append(frame.loc[frame["partition"] == "test"].set_index("patient_id")["risk"])
    reference[ENSEMBLE_NAME] = pd.concat(tests, axis=1).dropna().mean(axis=1).rename("risk").reset_index()
    return reference


def member_metrics(task: Task, table: pd.DataFrame, n_bootstrap: int, seed: int) -> dict:
    """The task's metrics of one member with their bootstrap CIs: ``<metric>``, ``_ci_low``, ``_ci_high``,
    ``_n_bootstrap_used``."""
    values = fold_metrics(task, table)
    cis = bootstrap_metrics(task, [table], n_bootstrap, seed) if len(table) else {}
    row = {}
    for name, value in values.items():
        low, high, used = cis.get(name, (math.nan, math.nan, 0))
        row |= {name: value, f"{name}_ci_low": low, f"{name}_ci_high": high, f"{name}_n_bootstrap_used": used}
    return row


def model_rows(task: Task, patients: pd.DataFrame, reference: dict, n_bootstrap: int, seed: int) -> list[dict]:
    rows = []
    for member in members(patients):
        table = member_table(patients, task, member)
        row = {"fold": member, "n_patients": len(table)}
        if task.name == "survival":
            train = reference.get(member, table)
            row |= {"n_events": int(table["label"].sum()), "logrank_p": logrank_p(table, train)}
        rows.append(row | member_metrics(task, table, n_bootstrap, seed))
    return rows


def comparison(task: Task, tables: dict, reference_model: str, n_bootstrap: int, seed: int) -> pd.DataFrame:
    """Every model's primary metric against ``reference_model`` on the same patients: per fold, their mean
    (paired bootstrap over folds) and between the ensembles."""
    rows = []
    for (extractor, model), patients in sorted(tables.items()):
        ref = tables.get((extractor, reference_model))
        if model == reference_model or ref is None:
            continue
        folds = [m for m in fold_names(patients) if m in fold_names(ref)]
        diff = paired_difference(task, {f: member_table(patients, task, f) for f in folds},
                                 {f: member_table(ref, task, f) for f in folds}, n_bootstrap, seed)
        ensemble = paired_difference(task, {ENSEMBLE_NAME: member_table(patients, task, ENSEMBLE_NAME)},
                                     {ENSEMBLE_NAME: member_table(ref, task, ENSEMBLE_NAME)}, n_bootstrap, seed)
        rows += [{"extractor": extractor, "model": model, "reference": reference_model, **r}
                 for r in diff + ensemble[:1]]
    frame = pd.DataFrame(rows, columns=["extractor", "model", "reference", "fold", "n_test_patients", "metric_model",
                                        "metric_reference", "difference", "ci_low", "ci_high", "n_bootstrap_used"])
    return frame.rename(columns={"n_test_patients": "n_patients"})


def draw(task: Task, patients: pd.DataFrame, reference: dict, title: str, png: Path) -> None:
    """The task's figure of one model: the ensemble's confusion matrix, or every member's scatter or KM split."""
    if task.name == "multiclass":
        items = [(ENSEMBLE_NAME, member_table(patients, task, ENSEMBLE_NAME), None)]
    else:
        items = []
        for member in members(patients):
            table = member_table(patients, task, member)
            items.append((member, table, reference.get(member, table)))
    draw_figure(task, items, title, png)


def task_section(task: Task, tables: dict, training: dict, out: Path, settings: dict, seed: int) -> dict:
    """metrics.csv, comparison.csv and the task's figure per model; the page's numbers. ``training``: per
    (extractor, model), the training run's prediction files (survival), or nothing."""
    rows, figures = [], []
    for (extractor, model), patients in tables.items():
        survival = task.name == "survival"
        reference = training_reference(training.get((extractor, model)), fold_names(patients)) if survival else {}
        rows += [{"extractor": extractor, "model": model, **r}
                 for r in model_rows(task, patients, reference, settings["n_bootstrap"], seed)]
        name = figure_name(task, extractor, model)
        draw(task, patients, reference, f"{extractor} / {model}", out / name)
        figures.append({"extractor": extractor, "model": model, "file": name})
    metrics = pd.DataFrame(rows)
    compared = comparison(task, tables, settings["reference_model"], settings["n_bootstrap"], seed)
    write_csv(out / "metrics.csv", metrics)
    write_csv(out / "comparison.csv", compared)
    names = list(task.metrics(member_table(next(iter(tables.values())), task, ENSEMBLE_NAME)))
    doc = {"task": task.name, "metric_names": names, "metric_titles": [metric_title(n) for n in names],
           "metrics": _records(metrics),
           "comparison": _records(compared), "figures": figures, "class_names": task.class_names}
    if task.name == "survival":
        doc["km_split"] = KM_TRAINING if all(training.get(k) for k in tables) else KM_COHORT
    return doc


def _records(frame: pd.DataFrame) -> list[dict]:
    return frame.to_dict("records")
