"""Refit (``deploy.refit``): one model per (extractor, model) retrained on all non-test patients of the training
cohort, for the epoch count its fold models chose, and deployed beside the folds and their ensemble.

The epoch count is the median of the fold checkpoints' selected epochs (``model.pt``'s ``epoch``), rounded half
up: the median, not the mean, because one fold that stopped on an early plateau (or ran to the last epoch)
would pull a mean away from what the other folds agreed on. Training runs that many epochs with no early
stopping (``selection: last``), with the same settings, seed and cosine schedule (annealed over those epochs).

Its split (``splits_refit.csv`` in its folder) has one fold: every patient that is not a test patient trains;
the held-out test patients are its validation partition, so its history and predictions show how it scores
them, but nothing is selected on them (a fixed epoch count). Its checkpoint records fold 0, so that MHIM-MIL's
refit starts from its baseline's refit as its fold models start from their baselines'.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from slidemil.files.checkpoint import read_checkpoint
from slidemil.files.splits import fold_columns, read_splits, write_splits_csv
from slidemil.mil.train import Recipe, train_fold

logger = logging.getLogger(__name__)

SPLITS_NAME = "splits_refit.csv"


def refit_epochs(fold_checkpoints: list[str | os.PathLike]) -> int:
    """The median of the fold models' selected epochs (1-based), rounded half up."""
    epochs = [int(read_checkpoint(p).get("epoch") or 0) for p in fold_checkpoints]
    if not epochs or min(epochs) < 1:
        raise ValueError(f"{fold_checkpoints[0] if fold_checkpoints else 'refit'}: the fold checkpoints do not "
                         "record their selected epoch; retrain the folds")
    return int(math.floor(float(np.median(epochs)) + 0.5))


def refit_split(splits: pd.DataFrame) -> pd.DataFrame:
    """``splits`` with one fold column: test patients (test in any fold) val, the rest of the usable ones train."""
    columns = fold_columns(splits)
    parts = splits[columns]
    test = (parts == "test").any(axis=1)
    used = parts.isin(["train", "val"]).any(axis=1)
    if not used[~test].any():
        raise ValueError("refit: every patient is a test patient in some fold (splits.fold_column); there are no "
                         "non-test patients to retrain on")
    fold = np.where(test, "val", np.where(used, "train", "excluded"))
    return splits.drop(columns=columns).assign(fold_0=fold)


def refit_model(features: dict[str, str], splits_csv: str, fold_checkpoints: list[str], recipe: Recipe,
                out_dir: str, **train_kwargs) -> dict:
    """Train the refit model (``recipe``, trained for the refit epochs) into ``out_dir`` (the four training
    outputs plus its split); ``train_kwargs`` go to ``slidemil.mil.train.train_fold`` (device, num_threads,
    init_checkpoint)."""
    epochs = refit_epochs(fold_checkpoints)
    split_csv = Path(out_dir) / SPLITS_NAME
    write_splits_csv(split_csv, refit_split(read_splits(splits_csv)))
    settings = {**recipe.training, "epochs": epochs, "selection": "last", "patience": epochs}
    logger.info("refit %s: %d epochs (the median of its %d folds' selected epochs), all non-test patients",
                recipe.model, epochs, len(fold_checkpoints))
    summary = train_fold(features, str(split_csv), 0, replace(recipe, training=settings), out_dir, **train_kwargs)
    return {**summary, "refit_epochs": epochs}
