"""Deploy stage: every trained fold model scores the slides of a new cohort; the ensemble is their mean.

Each model is rebuilt from its model.pt (``slidemil.files.checkpoint``) and sees the features standardised with
the statistics recorded there (the training cohort's), through the same forward pass as the heatmaps
(``slidemil.report.heatmap.tile_attention``). A slide's probability is P(class 1); a patient's is the mean of
its slides' (as in training); the ensemble is the mean of the fold models' probabilities and its spread their
standard deviation (ddof 0), for slides and patients alike.

Outputs: predictions_slides.csv (slide_id, patient_id, [label], n_tiles, excluded, prob_fold_<k>...,
prob_ensemble, prob_fold_std) and predictions_patients.csv (patient_id, [label], n_slides, the same
probability columns). Slides without tiles stay in the slide table with their reason and no probability.

Command line (no Snakemake)::

    slidemil predict --checkpoints run/fold_*/model.pt --features feats/ --out predictions.csv [--sheet S.csv]
    slidemil predict --checkpoints run/fold_*/model.pt --slides a.svs b.svs --like features/E/S1.h5 --out p.csv
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from slidemil.cohort.facts import exclusion_reason
from slidemil.cohort.manifest import read_manifest, read_manifest_table
from slidemil.errors import FeatureFileError
from slidemil.files import write_csv
from slidemil.files.features import read_features

logger = logging.getLogger(__name__)

FOLD_PREFIX = "prob_fold_"
ENSEMBLE = "prob_ensemble"
SPREAD = "prob_fold_std"


def model_names(ckpts: list[dict], paths: list[str]) -> list[str]:
    """A column name per checkpoint: its fold (``fold_0``), else its position."""
    folds = [c.get("fold") for c in ckpts]
    if None in folds or len(set(folds)) < len(folds):
        return [f"{FOLD_PREFIX}{i}" for i in range(len(paths))]
    return [f"{FOLD_PREFIX}{f}" for f in folds]


def load_models(checkpoints: list[str], device) -> list[tuple[str, object, dict]]:
    """(column name, model in eval mode, checkpoint dict) per checkpoint; all must take the same features."""
    from slidemil.report.heatmap import load_checkpoint

    if not checkpoints:
        raise FileNotFoundError("no checkpoint given: pass the trained model.pt files")
    loaded = [load_checkpoint(p, device) for p in checkpoints]
    dims = {int(c["in_dim"]) for _, c in loaded}
    if len(dims) > 1:
        raise FeatureFileError(f"the checkpoints take features of different sizes ({sorted(dims)}): deploy the "
                               "models of one extractor together")
    names = model_names([c for _, c in loaded], list(checkpoints))
    return [(n, m, c) for n, (m, c) in zip(names, loaded)]


def slide_probabilities(models: list[tuple[str, object, dict]], features: dict[str, str], device="cpu") -> pd.DataFrame:
    """One row per slide: slide_id, n_tiles, excluded and each model's probability, ensemble and spread."""
    from slidemil.report.heatmap import tile_attention

    in_dim = int(models[0][2]["in_dim"])
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
        for name, model, ckpt in models:
            row[name] = tile_attention(model, ckpt, feats, device)[1]
        rows.append(row)
    table = pd.DataFrame(rows, columns=["slide_id", "n_tiles", "excluded", *[n for n, *_ in models]])
    return with_ensemble(table, [n for n, *_ in models])


def with_ensemble(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``table`` with the mean of the fold columns (the ensemble) and their standard deviation (ddof 0)."""
    probs = table[columns].to_numpy(float)
    usable = ~np.isnan(probs).all(axis=1)
    ensemble, spread = np.full(len(table), np.nan), np.full(len(table), np.nan)
    ensemble[usable], spread[usable] = probs[usable].mean(axis=1), probs[usable].std(axis=1)
    return table.assign(**{ENSEMBLE: ensemble, SPREAD: spread})


def fold_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c.startswith(FOLD_PREFIX) and c != SPREAD]


def patient_probabilities(slides: pd.DataFrame) -> pd.DataFrame:
    """Per patient: the mean of its usable slides' probabilities per model, then ensemble and spread over models."""
    folds = fold_columns(slides)
    usable = slides[slides[ENSEMBLE].notna()]
    keys = ["patient_id"] + (["label"] if "label" in slides.columns else [])
    patients = usable.groupby(keys, sort=True)[folds].mean().reset_index()
    patients.insert(len(keys), "n_slides", usable.groupby(keys, sort=True).size().to_numpy())
    return with_ensemble(patients, folds)


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
                   device: str = "auto", threads: int | None = None) -> pd.DataFrame:
    """The workflow's predict job: one model's folds on one cohort's feature manifest; writes both tables.

    ``sheet_csv`` is the cohort's sheet (labels, when given, follow the training cohort's ``positive_class``);
    ``training_manifest`` the training cohort's feature manifest, whose extractor and weights the cohort's
    features must share."""
    import torch

    from slidemil.cohort.deploy import load_deploy_sheet
    from slidemil.runtime import resolve_device

    if threads:
        torch.set_num_threads(threads)
    if training_manifest:
        check_same_features(training_manifest, features_manifest)
    dev = resolve_device(device)
    features = read_manifest(features_manifest)
    slides = slide_probabilities(load_models(checkpoints, dev), features, dev)
    slides = attach_sheet(slides, load_deploy_sheet(sheet_csv, check_files=False, positive_class=positive_class))
    write_csv(out_slides, slides)
    write_csv(out_patients, patient_probabilities(slides))
    logger.info("%d slides (%d usable) of %d patients scored by %d models", len(slides),
                slides[ENSEMBLE].notna().sum(), slides["patient_id"].nunique(), len(checkpoints))
    return slides


def attach_sheet(slides: pd.DataFrame, sheet: pd.DataFrame | None) -> pd.DataFrame:
    """Slides with patient_id (and label) from the sheet; without a sheet each slide is its own patient."""
    if sheet is None:
        return slides.assign(patient_id=slides["slide_id"])[["slide_id", "patient_id", *slides.columns[1:]]]
    keep = [c for c in ("slide_id", "patient_id", "label") if c in sheet.columns]
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
    parser.add_argument("--sheet", default=None, help="sample sheet (slide_id, patient_id[, label]): adds the "
                        "per-patient table --out-patients")
    parser.add_argument("--out-patients", default=None, help="per-patient predictions CSV (needs --sheet)")
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


def main(argv: list[str] | None = None, prog: str = "python -m slidemil.deploy.predict") -> int:
    from slidemil.cohort.sheet import read_table
    from slidemil.logs import setup_logging
    from slidemil.runtime import resolve_device

    args = _parse_args(argv, prog)
    setup_logging(args.log)
    sheet = read_table(args.sheet) if args.sheet else None
    dev = resolve_device(args.device)
    models = load_models(args.checkpoints, dev)  # a wrong checkpoint fails before any slide is read
    slides = attach_sheet(slide_probabilities(models, _features(args), dev), sheet)
    write_csv(args.out, slides)
    if args.out_patients:
        write_csv(args.out_patients, patient_probabilities(slides))
    print(f"{args.out}: {slides[ENSEMBLE].notna().sum()} of {len(slides)} slides scored by "
          f"{len(args.checkpoints)} model(s)")
    return 0
