"""Deploy stage: every trained fold model scores the slides of a new cohort; the ensemble is their mean.

Each model is rebuilt from its model.pt (``slidemil.files.checkpoint``) and sees the features standardised with
the statistics recorded there (the training cohort's); its outputs are those of the task it was trained for
(``slidemil.tasks.task_from_checkpoint``): binary P(class 1), multiclass class probabilities, survival
risk, regression the prediction in the target's units (de-standardised with that checkpoint's target mean
and std). A
patient's outputs are the mean of its slides' (as in training); the ensemble is the mean of the fold models'
outputs and its spread their standard deviation (ddof 0), for slides and patients alike; multiclass adds the
ensemble's predicted class.

Outputs: predictions_slides.csv and predictions_patients.csv, whose columns ``slidemil.files.deploy`` names.
Slides without tiles stay in the slide table with their reason and no output.

Command line (no Snakemake)::

    slidemil predict --checkpoints run/fold_*/model.pt --features feats/ --out predictions.csv [--sheet S.csv]
    slidemil predict --checkpoints run/fold_*/model.pt --slides a.svs b.svs --like features/E/S1.h5 --out p.csv
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from slidemil.cohort.facts import exclusion_reason
from slidemil.cohort.manifest import read_manifest, read_manifest_table
from slidemil.errors import CheckpointError, FeatureFileError
from slidemil.files import write_csv
from slidemil.files.deploy import (PREDICTED_CLASS, REFIT, ensemble_column, fold_column, fold_columns, member_column,
                                   outcome_columns, output_names, spread_column)
from slidemil.files.features import read_features
from slidemil.names import BINARY, EVENT_COLUMN, TIME_COLUMN
from slidemil.tasks import Task, task_from_checkpoint

logger = logging.getLogger(__name__)

# The binary task's columns (its only output is ``prob``).
FOLD_PREFIX = fold_column("prob", "")
ENSEMBLE = ensemble_column("prob")
SPREAD = spread_column("prob")


@dataclass
class FoldModel:
    """One checkpoint, ready to score: its fold's name, the model in eval mode, the checkpoint and its task."""

    name: str
    model: object
    ckpt: dict
    task: Task


def fold_labels(ckpts: list[dict]) -> list[str]:
    """A name per checkpoint: its fold (``0``), else its position."""
    folds = [c.get("fold") for c in ckpts]
    if None in folds or len(set(folds)) < len(folds):
        return [str(i) for i in range(len(ckpts))]
    return [str(f) for f in folds]


def load_models(checkpoints: list[str], device) -> list[FoldModel]:
    """A FoldModel per checkpoint; all must take the same features and be trained for the same task."""
    from slidemil.report.heatmap import load_checkpoint

    if not checkpoints:
        raise FileNotFoundError("no checkpoint given: pass the trained model.pt files")
    loaded = [load_checkpoint(p, device) for p in checkpoints]
    dims = {int(c["in_dim"]) for _, c in loaded}
    if len(dims) > 1:
        raise FeatureFileError(f"the checkpoints take features of different sizes ({sorted(dims)}): deploy the "
                               "models of one extractor together")
    tasks = [task_from_checkpoint(c) for _, c in loaded]
    kinds = {(t.name, tuple(t.class_names or ())) for t in tasks}
    if len(kinds) > 1:
        shown = "; ".join(f"{p}: {t.name}{' ' + ', '.join(t.class_names) if t.class_names else ''}"
                          for p, t in zip(checkpoints, tasks))
        raise CheckpointError(f"the checkpoints were trained for different tasks or classes ({shown}): deploy "
                              "the folds of one run together")
    names = fold_labels([c for _, c in loaded])
    return [FoldModel(n, m, c, t) for n, (m, c), t in zip(names, loaded, tasks)]


def load_refit(checkpoint: str, fold: FoldModel, device) -> FoldModel:
    """The refit model (slidemil.mil.refit), named ``refit``; it must fit the folds' features and task."""
    refit = load_models([checkpoint], device)[0]
    if int(refit.ckpt["in_dim"]) != int(fold.ckpt["in_dim"]) or refit.task.name != fold.task.name:
        raise CheckpointError(f"{checkpoint}: the refit model takes other features or another task than its folds")
    refit.name = REFIT
    return refit


def slide_probabilities(models: list[FoldModel], features: dict[str, str], device="cpu") -> pd.DataFrame:
    """One row per slide: slide_id, n_tiles, excluded and each model's outputs, their ensemble and spread.
    A bag's outputs come from the heatmaps' forward pass (the checkpoint's standardisation, the task's outputs)."""
    from slidemil.report.heatmap import bag_forward

    in_dim = int(models[0].ckpt["in_dim"])
    outputs = models[0].task.output_columns
    columns = [member_column(o, m.name) for o in outputs for m in models]
    rows = []
    for slide_id, path in features.items():
        data, attrs = read_features(path, ("features",))
        feats = data["features"]
        row = {"slide_id": slide_id, "n_tiles": len(feats), "excluded": exclusion_reason(len(feats), attrs)}
        if len(feats) == 0:
            rows.append(row)
            continue
        if feats.ndim != 2 or feats.shape[1] != in_dim:
            raise FeatureFileError(f"{path}: features of shape {feats.shape}, but the models were trained on "
                                   f"{in_dim}-d features; extract this cohort with the training cohort's extractor")
        for m in models:
            values = bag_forward(m.model, m.ckpt, feats, device)[1]
            row |= {member_column(o, m.name): float(v) for o, v in zip(outputs, values)}
        rows.append(row)
    table = pd.DataFrame(rows, columns=["slide_id", "n_tiles", "excluded", *columns])
    return with_ensemble(table, outputs, models[0].task.class_names)


def with_ensemble(table: pd.DataFrame, outputs: list[str], class_names: list | None = None) -> pd.DataFrame:
    """``table`` with, per output, the mean of its fold columns (the ensemble) and their standard deviation
    (ddof 0); multiclass (``class_names``) also the ensemble's predicted class."""
    added = {}
    for output in outputs:
        values = table[fold_columns(table, output)].to_numpy(float)
        usable = ~np.isnan(values).all(axis=1)
        ensemble, spread = np.full(len(table), np.nan), np.full(len(table), np.nan)
        ensemble[usable], spread[usable] = values[usable].mean(axis=1), values[usable].std(axis=1)
        added |= {ensemble_column(output): ensemble, spread_column(output): spread}
    if class_names:
        probs = np.column_stack([added[ensemble_column(o)] for o in outputs])
        usable = ~np.isnan(probs).any(axis=1)
        added[PREDICTED_CLASS] = [class_names[k] if ok else None
                                  for k, ok in zip(np.nan_to_num(probs, nan=-1).argmax(axis=1), usable)]
    return table.assign(**added)


def patient_probabilities(slides: pd.DataFrame, class_names: list | None = None) -> pd.DataFrame:
    """Per patient: the mean of its usable slides' outputs per model, then ensemble and spread over models."""
    outputs = output_names(slides)
    folds = [c for o in outputs for c in fold_columns(slides, o) + ([member_column(o, REFIT)] if
                                                                    member_column(o, REFIT) in slides else [])]
    usable = slides[slides[ensemble_column(outputs[0])].notna()]
    keys = ["patient_id", *outcome_columns(slides)]
    patients = usable.groupby(keys, sort=True)[folds].mean().reset_index()
    patients.insert(len(keys), "n_slides", usable.groupby(keys, sort=True).size().to_numpy())
    return with_ensemble(patients, outputs, class_names)


def check_same_features(training_manifest: str | os.PathLike, deploy_manifest: str | os.PathLike) -> None:
    """The deploy cohort's features must be the training cohort's kind: same extractor and weights digest."""
    train, deploy = read_manifest_table(training_manifest), read_manifest_table(deploy_manifest)
    for column in ("extractor", "weights_digest"):
        have = set(deploy.loc[deploy[column] != "", column])
        want = set(train.loc[train[column] != "", column])
        if have and want and have != want:
            raise FeatureFileError(
                f"{deploy_manifest}: features made with {column} {', '.join(sorted(have))}, but the models were "
                f"trained on {', '.join(sorted(want))} ({training_manifest}); extract the cohort with the training "
                "settings (delete its feature files to redo them)")


def predict_cohort(checkpoints: list[str], features_manifest: str, sheet_csv: str, out_slides: str,
                   out_patients: str, training_manifest: str | None = None, positive_class=None,
                   device: str = "auto", threads: int | None = None, endpoint: dict | None = None,
                   refit_checkpoint: str | None = None) -> pd.DataFrame:
    """The workflow's predict job: one model's folds on one cohort's feature manifest; writes both tables.

    ``sheet_csv`` is the cohort's sheet (binary labels follow the training cohort's ``positive_class``);
    ``endpoint`` the config's task and survival column names (``slidemil.cohort.sheet.Endpoint``'s fields; the
    checkpoints must be trained for that task); ``training_manifest`` the training cohort's feature manifest,
    whose extractor and weights the cohort's features must share; ``refit_checkpoint`` the model retrained on
    all non-test patients (deploy.refit), scored beside the folds and left out of their ensemble."""
    import torch

    from slidemil.cohort.deploy import load_deploy_sheet
    from slidemil.cohort.sheet import Endpoint
    from slidemil.runtime import resolve_device

    if threads:
        torch.set_num_threads(threads)
    if training_manifest:
        check_same_features(training_manifest, features_manifest)
    dev = resolve_device(device)
    models = load_models(checkpoints, dev)
    if refit_checkpoint:
        models.append(load_refit(refit_checkpoint, models[0], dev))
    task, endpoint = models[0].task, Endpoint(**(endpoint or {}))
    if task.name != endpoint.task:
        raise CheckpointError(f"{checkpoints[0]}: trained for task {task.name}, but task is {endpoint.task}; "
                              "deploy the checkpoints of this configuration's run")
    sheet = load_deploy_sheet(sheet_csv, check_files=False, positive_class=positive_class, endpoint=endpoint,
                              class_names=task.class_names)
    slides = attach_sheet(slide_probabilities(models, read_manifest(features_manifest), dev), sheet, task.name)
    write_csv(out_slides, slides)
    write_csv(out_patients, patient_probabilities(slides, task.class_names))
    usable = slides[ensemble_column(task.output_columns[0])].notna().sum()
    logger.info("%d slides (%d usable) of %d patients scored by %d %s models", len(slides), usable,
                slides["patient_id"].nunique(), len(checkpoints), task.name)
    return slides


def attach_sheet(slides: pd.DataFrame, sheet: pd.DataFrame | None, task: str = BINARY) -> pd.DataFrame:
    """Slides with patient_id (and the outcome) from the sheet; without a sheet each slide is its own patient."""
    if sheet is None:
        return slides.assign(patient_id=slides["slide_id"])[["slide_id", "patient_id", *slides.columns[1:]]]
    keep = ["slide_id", "patient_id", *outcome_columns(sheet, task)]
    missing = sorted(set(slides["slide_id"]) - set(sheet["slide_id"]))
    if missing:
        raise FeatureFileError(f"slide(s) {', '.join(missing[:10])} have features but no row in the sample sheet")
    return sheet[keep].merge(slides, on="slide_id", how="inner")


# --------------------------------------------------------------------------- CLI


def feature_files(paths: list[str]) -> dict[str, str]:
    """slide_id -> feature file, from files and folders of ``{slide_id}.h5``."""
    files: dict[str, str] = {}
    for given in map(Path, paths):
        if given.is_dir():
            found = sorted(given.glob("*.h5"))
            if not found:
                raise FileNotFoundError(f"{given}: no .h5 feature files in this folder")
            files.update({p.stem: str(p) for p in found})
        elif given.is_file():
            files[given.stem] = str(given)
        else:
            raise FileNotFoundError(f"{given}: feature file or folder not found")
    return files


def _parse_args(argv, prog):
    parser = argparse.ArgumentParser(prog=prog, description="Score slides with trained MIL models (each fold and "
                                     "their ensemble, the mean of the folds' probabilities).")
    parser.add_argument("--checkpoints", nargs="+", required=True, help="model.pt files (e.g. every fold's)")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--features", nargs="+",
                       help="feature files ({slide_id}.h5) or folders of them, made with the training extractor")
    given.add_argument("--slides", nargs="+", help="slide files: tiled and extracted as --like says")
    parser.add_argument("--like", default=None, help="with --slides: a feature file of the training cohort, whose "
                        "recorded extractor, weights, input size, precision, mpp and tile size the slides get")
    parser.add_argument("--work-dir", default=None, help="with --slides: where their tiles and features go "
                        "(default: beside --out)")
    parser.add_argument("--seed", type=int, default=0, help="with --slides and random weights: the training seed")
    parser.add_argument("--out", required=True, help="per-slide predictions CSV")
    parser.add_argument("--sheet", default=None, help="sample sheet (slide_id, patient_id[, label, or the "
                        "survival columns]): adds the "
                        "per-patient table --out-patients")
    parser.add_argument("--out-patients", default=None, help="per-patient predictions CSV (needs --sheet)")
    parser.add_argument("--time-column", default=TIME_COLUMN, help="survival: the sheet's follow-up column")
    parser.add_argument("--event-column", default=EVENT_COLUMN, help="survival: the sheet's event column (1/0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--log", default=None, help="log file (default: stderr)")
    return parser.parse_args(argv)


def _features(args) -> dict[str, str]:
    if args.features:
        return feature_files(args.features)
    from slidemil.deploy.slides import features_from_slides

    if not args.like:
        raise FileNotFoundError("--slides needs --like: a feature file of the training cohort (its settings)")
    work = args.work_dir or str(Path(args.out).with_suffix("")) + "_work"
    return features_from_slides(args.slides, args.like, work, args.device, args.seed)


def cli_sheet(path: str, task: Task, time_column: str, event_column: str) -> pd.DataFrame:
    """The --sheet table: as read for a binary task (its labels as given), with the task's outcome otherwise."""
    from slidemil.cohort.deploy import class_problems, outcomes, sheet_is_labelled
    from slidemil.cohort.sheet import Endpoint, endpoint_problems, read_table
    from slidemil.errors import SheetError

    sheet = read_table(path)
    endpoint = Endpoint(task.name, time_column=time_column, event_column=event_column)
    if task.name == BINARY or not sheet_is_labelled(sheet, endpoint):
        return sheet
    missing = [c for c in endpoint.required[3:] if c not in sheet.columns]
    problems = [f"missing column(s) {', '.join(missing)}"] if missing else endpoint_problems(sheet, endpoint)
    if task.name == "multiclass" and not missing:
        problems += class_problems(sheet["label"], task.class_names)
    if problems:
        raise SheetError(path, problems)
    return outcomes(sheet, endpoint)


def main(argv: list[str] | None = None, prog: str = "python -m slidemil.deploy.predict") -> int:
    from slidemil.logs import setup_logging
    from slidemil.runtime import resolve_device

    args = _parse_args(argv, prog)
    setup_logging(args.log)
    dev = resolve_device(args.device)
    models = load_models(args.checkpoints, dev)  # a wrong checkpoint fails before any slide is read
    task = models[0].task
    sheet = cli_sheet(args.sheet, task, args.time_column, args.event_column) if args.sheet else None
    slides = attach_sheet(slide_probabilities(models, _features(args), dev), sheet, task.name)
    write_csv(args.out, slides)
    if args.out_patients:
        write_csv(args.out_patients, patient_probabilities(slides, task.class_names))
    scored = slides[ensemble_column(task.output_columns[0])].notna().sum()
    print(f"{args.out}: {scored} of {len(slides)} slides scored by {len(args.checkpoints)} model(s)")
    return 0
