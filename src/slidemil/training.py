"""What every stage that trains a network shares: tile subsets, class weights, the weighted loss,
patient-level metrics, the optimiser step and the epoch loop with early stopping.

MIL training (``slidemil.mil.train``), the tile-supervised baseline (``slidemil.pretrain.tile_supervised``),
SimCLR (``slidemil.pretrain.simclr``) and the tile pool of the pixel stages use these, so that none of them
imports another stage. All three train through ``Stepper`` and ``fit_epochs``; SimCLR runs it without
validation (nothing to select or stop on), from the epoch after its checkpoint, with a checkpoint after each.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from slidemil.files import write_csv
from slidemil.files.checkpoint import write_checkpoint

logger = logging.getLogger(__name__)

N_CLASSES = 2
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_auc", "lr"]


# --------------------------------------------------------------------------- data


def subsample_indices(n_tiles: int, max_tiles: int | None, seed: int, slide_id: str) -> np.ndarray | None:
    """Tile indices kept for a slide, or None to keep all.

    Drawn from the seed and the slide id alone, so a slide keeps the same subset
    in every epoch, in every model trained with that seed, and whatever the
    order in which slides are loaded. Sorted to keep the tiles' stored order.
    """
    if max_tiles is None or n_tiles <= max_tiles:
        return None
    rng = np.random.default_rng([seed, zlib.crc32(slide_id.encode())])
    return np.sort(rng.choice(n_tiles, size=max_tiles, replace=False))


# --------------------------------------------------------------------------- losses


def class_weights(labels: np.ndarray, enabled: bool, n_classes: int = N_CLASSES) -> torch.Tensor:
    """Per-class loss weights n / (n_classes * n_c): each class weighs the same in total."""
    counts = np.bincount(labels, minlength=n_classes)
    if (counts == 0).any():
        which = "both classes" if n_classes == 2 else f"all {n_classes} classes"
        raise ValueError(f"the training slides must contain {which}; class counts: {counts.tolist()}")
    if not enabled:
        return torch.ones(n_classes)
    return torch.tensor(len(labels) / (n_classes * counts), dtype=torch.float32)


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    # Per-bag weight times loss, averaged over bags. PyTorch's weighted "mean"
    # divides by the summed weights instead, which cancels the weighting
    # entirely at batch size 1.
    losses = F.cross_entropy(logits.float(), labels, weight=weights, reduction="none")
    return losses.mean() if reduction == "mean" else losses.sum()


# --------------------------------------------------------------------------- metrics


def patient_predictions(slides: pd.DataFrame) -> pd.DataFrame:
    """Patient probability = mean of its slides' probabilities (DeepSMILE section 3.2)."""
    grouped = slides.groupby(["partition", "patient_id"], sort=False)
    patients = grouped.agg(label=("label", "first"), n_slides=("slide_id", "size"), prob=("prob", "mean"))
    return patients.reset_index()[["patient_id", "label", "partition", "n_slides", "prob"]]


def auc_or_none(labels, probs) -> float | None:
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, probs))


def patient_auc(slides: pd.DataFrame) -> float | None:
    """AUC of the patients' probabilities (slides: slide_id, patient_id, label, partition, prob)."""
    if slides["patient_id"].is_unique:
        # One slide per patient (MIL benchmarks): no grouping needed, and this runs every epoch.
        return auc_or_none(slides["label"], slides["prob"])
    patients = patient_predictions(slides)
    return auc_or_none(patients["label"], patients["prob"])


def validation_has_both_classes(val: pd.DataFrame) -> bool:
    """Whether the validation patients (val: patient_id, label) can give an AUC to select on."""
    return val.groupby("patient_id")["label"].first().nunique() == 2


# --------------------------------------------------------------------------- optimisation


@dataclass
class Stepper:
    """One optimiser step: gradients (scaled when the precision needs it), the step, the schedule."""

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        # Disabled (fp32, bf16) the scaler passes the loss and the step through unchanged.
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()


@dataclass
class Selection:
    """The checkpoint kept so far, by ``policy`` (one of ``slidemil.names.SELECTIONS``):

    - ``val_auc``: highest validation AUC, ties (or no AUC: one-class validation) by lowest loss;
    - ``val_loss``: lowest validation loss, ties by highest AUC;
    - ``last``: the latest epoch (a fixed number of epochs; patience never stops it).

    On validation sets of 10-20 patients the AUC moves in steps of 1/(n_pos n_neg) and often ties or
    peaks by chance early; the loss is continuous (docs/benchmarks.md, "Model selection").
    """

    use_auc: bool
    policy: str = "val_auc"
    epoch: int = 0
    auc: float | None = None
    loss: float = math.inf
    state: dict = field(default_factory=dict)

    def improves(self, auc: float | None, loss: float) -> bool:
        if self.epoch == 0 or self.policy == "last":
            return True
        if self.policy == "val_loss" or not self.use_auc:
            return loss < self.loss or (loss == self.loss and self.use_auc and auc > self.auc)
        return auc > self.auc or (auc == self.auc and loss < self.loss)

    def update(self, epoch: int, auc: float | None, loss: float, model: torch.nn.Module) -> None:
        self.epoch, self.auc, self.loss = epoch, auc, loss
        self.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@dataclass
class Loop:
    """How ``fit_epochs`` runs: ``train(epoch)`` -> (train loss, lr), ``validate()`` -> (AUC or None, loss).

    ``validate`` None: no validation set (SimCLR), so every epoch runs and the last one is kept.
    ``first_epoch``: where a resumed run continues; ``after_epoch(epoch)``: e.g. a resumable checkpoint.
    """

    train: Callable[[int], tuple[float, float]]
    validate: Callable[[], tuple[float | None, float]] | None
    epochs: int
    patience: int
    desc: str
    progress: bool = True  # an epoch progress bar (off where the epoch shows its own, per batch)
    selection: str = "val_auc"  # Selection.policy
    first_epoch: int = 1
    after_epoch: Callable[[int], None] | None = None


def fit_epochs(model: torch.nn.Module, loop: Loop, use_auc: bool) -> tuple[Selection, list[dict]]:
    """Epochs of training and validation with early stopping; returns the best Selection and history rows.

    The model's state at the best epoch by ``loop.selection`` (see ``Selection``; without ``use_auc`` the AUC
    never decides) is kept; training stops once ``patience`` epochs have not improved on it. Without
    ``loop.validate`` every epoch runs and the last one is the Selection.
    """
    validated = loop.validate is not None
    if validated and not use_auc and loop.selection != "last":
        logger.warning("%s: validation patients are all of one class; selecting on validation loss alone", loop.desc)
    best, history = Selection(use_auc, loop.selection if validated else "last"), []
    epochs = range(loop.first_epoch, loop.epochs + 1)
    progress = tqdm(epochs, desc=loop.desc, unit="epoch", file=sys.stderr) if loop.progress else None
    for epoch in progress if progress is not None else epochs:
        train_loss, lr = loop.train(epoch)
        val_auc, val_loss = loop.validate() if validated else (None, math.nan)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_auc": val_auc, "lr": lr})
        improved = best.improves(val_auc, val_loss)
        if improved:
            best.update(epoch, val_auc, val_loss, model)
        validation = f" val_loss {val_loss:.4f} val_auc {fmt_metric(val_auc)}" if validated else ""
        logger.info("%s epoch %d/%d train_loss %.4f%s lr %.3g%s", loop.desc, epoch, loop.epochs, train_loss,
                    validation, lr, " (best)" if improved and validated else "")
        if loop.after_epoch is not None:
            loop.after_epoch(epoch)
        if progress is not None:
            progress.set_postfix(val_auc=fmt_metric(val_auc), best_epoch=best.epoch)
        if epoch - best.epoch >= loop.patience:
            logger.info("%s: early stop after epoch %d, no improvement for %d epochs", loop.desc, epoch, loop.patience)
            break
    if progress is not None:
        progress.close()
    return best, history


def write_outputs(out_dir: str | os.PathLike, ckpt: dict, history: list[dict], slides: pd.DataFrame,
                  patients: pd.DataFrame, metric_column: str = "val_auc") -> None:
    """The four outputs of every trained classifier (MIL models, the tile-supervised baseline): model.pt,
    history.csv, predictions_slides.csv and predictions_patients.csv. ``metric_column``: the history's name of
    the validation metric (``val_auc``; another task's, slidemil.tasks)."""
    out = Path(out_dir)
    write_checkpoint(out / "model.pt", ckpt)
    frame = pd.DataFrame(history, columns=HISTORY_COLUMNS).rename(columns={"val_auc": metric_column})
    write_csv(out / "history.csv", frame)
    write_csv(out / "predictions_slides.csv", slides)
    write_csv(out / "predictions_patients.csv", patients)


def fmt_metric(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
