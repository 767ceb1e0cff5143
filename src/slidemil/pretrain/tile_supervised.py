"""Tile-supervised baseline (DeepSMILE section 4.2.1): every tile carries its slide's label.

A CNN (a registered extractor architecture, ShuffleNetV2 or ResNet-18,
initialised from ImageNet weights in a local file, the cohort's SimCLR backbone
or at random) gets a new He-initialised linear layer with one output per class
and is fine-tuned end to end on a fixed subsample of each training slide's tiles
with cross-entropy weighted by the classes' tile counts (Adam, betas 0.9/0.99,
no schedule). Tasks ``binary`` and ``multiclass`` (slidemil.names.TILE_MODEL_TASKS):
a slide's probability of class k is the fraction of its tiles whose argmax is k
(DeepSMILE eq. 4, where binary ``prob`` is the fraction predicted positive), a
patient's the mean of its slides'. The epoch with the best validation metric of
the task (patient AUC; multiclass macro one-vs-rest AUC) is kept, as in the MIL
training, and the same four outputs are written in the same form
(slidemil.tasks): model.pt, history.csv, predictions_slides.csv,
predictions_patients.csv.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm import tqdm

from slidemil.config import TileSupervised, field_defaults, resolve
from slidemil.names import BINARY, TILE_ARCHITECTURES, TILE_MODEL, TILE_MODEL_TASKS
from slidemil.runtime import Precision, resolve_device, resolve_precision, warn_if_bf16_emulated
from slidemil.features.extractors import create_extractor, get_spec
from slidemil.files.splits import read_fold, read_splits, split_task
from slidemil.slides.reader import one_opencv_thread
from slidemil.pretrain.tilepool import (SlideTiles, TilePool, add_cli_arguments, cli_cohort, epoch_generator,
                       normalizer, sample_slide_tiles)
from slidemil.tasks import Task, make_task
from slidemil.training import (N_CLASSES, Loop, Selection, Stepper, class_weights, fit_epochs, fmt_metric,
                               weighted_loss, write_outputs)

logger = logging.getLogger(__name__)

# The defaults and checks are slidemil.config.TileSupervised's (one home for the workflow and this CLI).
DEFAULT_SETTINGS = field_defaults(TileSupervised)
ARCHITECTURES = TILE_ARCHITECTURES


def resolve_settings(settings: dict | None) -> dict:
    """``settings`` completed with the defaults; unknown keys and bad values are errors (one line)."""
    return resolve(TileSupervised, settings, "tile_supervised")


class TileClassifier(nn.Module):
    """Extractor backbone + a fresh linear layer: tile -> class logits."""

    def __init__(self, arch: str, init: str, seed: int = 0, n_classes: int = N_CLASSES):
        super().__init__()
        self.backbone, self.init_digest = create_extractor(arch, init, seed)
        self.fc = nn.Linear(get_spec(arch).dim, n_classes)
        nn.init.kaiming_normal_(self.fc.weight, nonlinearity="relu")  # He, as the paper's re-initialised layers
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))


def tile_task(splits_csv: str) -> Task:
    """The task of the splits file, if the baseline can learn it (a classification); else one line."""
    name, class_names = split_task(read_splits(splits_csv), splits_csv)
    if name not in TILE_MODEL_TASKS:
        raise ValueError(f"{splits_csv}: task {name}: {TILE_MODEL} classifies tiles, so it learns "
                         f"{' or '.join(TILE_MODEL_TASKS)} tasks only; train a MIL model for {name}")
    return make_task(name, class_names)


def slide_outputs(task: Task, tile_slides: list[str], tile_logits: torch.Tensor) -> pd.DataFrame:
    """Each slide's outputs (index: slide id; the task's output columns): the fraction of its tiles whose
    argmax is each class (DeepSMILE eq. 4; binary ``prob``: the fraction predicted class 1)."""
    votes = F.one_hot(tile_logits.argmax(dim=1), task.head_size).double().cpu().numpy()
    fractions = pd.DataFrame(votes).groupby(pd.Series(tile_slides)).mean()
    kept = fractions[[1]] if task.name == BINARY else fractions  # binary: as Task.outputs, class 1 alone
    return kept.set_axis(task.output_columns, axis=1)


class _Augment:
    """Random flips and 90-degree turns: orientation carries no meaning in a tile."""

    def __init__(self):
        self.flip = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()])

    def __call__(self, tile: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, ()))
        return self.flip(torch.rot90(tile, k, dims=(1, 2)))


@dataclass
class Run:
    """What the epochs of one fold share: the model, where and how it computes, the loss weights."""

    model: TileClassifier
    device: torch.device
    amp: Precision
    weights: torch.Tensor
    labels: dict[str, int]
    cfg: dict
    task: Task
    workers: int = 0


@torch.inference_mode()
def predict_tiles(run: Run, pool: TilePool) -> tuple[pd.DataFrame, float]:
    """Slide outputs over the pool's slides (``slide_outputs``) and the mean weighted tile loss."""
    run.model.eval()
    normalize = normalizer(run.device)
    loader = DataLoader(pool, batch_size=run.cfg["batch_size"], shuffle=False, num_workers=run.workers)
    item_slides = pool.item_slide_ids()
    labels, weights = run.labels, run.weights
    logits = []
    for tiles, _ in loader:
        with run.amp.autocast(run.device):
            logits.append(run.model(normalize(tiles)).float().cpu())
    logits = torch.cat(logits)
    y = torch.tensor([labels[s] for s in item_slides], dtype=torch.long)
    loss = weighted_loss(logits, y, weights.cpu(), reduction="sum").item() / max(len(y), 1)
    return slide_outputs(run.task, item_slides, logits), loss


def train_epoch(run: Run, pool: TilePool, epoch: int, stepper: Stepper, seed: int, desc: str) -> float:
    """One pass over the training tiles in an order drawn from (seed, epoch); the mean weighted tile loss."""
    pool.epoch = epoch
    loader = DataLoader(pool, batch_size=run.cfg["batch_size"], shuffle=True, generator=epoch_generator(seed, epoch),
                        num_workers=run.workers, pin_memory=run.device.type == "cuda")
    normalize = normalizer(run.device)
    y_all = torch.tensor([run.labels[s] for s in pool.item_slide_ids()])
    run.model.train()
    total, n = 0.0, 0
    for x, idx in tqdm(loader, desc=f"{desc} epoch {epoch}", mininterval=2, file=sys.stderr):
        with run.amp.autocast(run.device):
            logits = run.model(normalize(x))
        loss = weighted_loss(logits, y_all[idx].to(run.device), run.weights)
        stepper.step(loss)
        total, n = total + loss.item() * len(idx), n + len(idx)
    return total / max(n, 1)


def sample_fold(split: pd.DataFrame, slides: dict[str, str], tiles: dict[str, str], cfg: dict, seed: int, fold: int):
    """Each slide's fixed tile subset; returns (subsets, split without tileless slides, skipped slides)."""
    missing = [s for s in split["slide_id"] if s not in slides or s not in tiles]
    if missing:
        raise ValueError(f"no slide or tiles file for slide(s) {', '.join(missing[:20])}")
    sampled: dict[str, SlideTiles] = {}
    for row in split.itertuples():
        limit = cfg["tiles_per_slide"] if row.partition == "train" else cfg["eval_tiles_per_slide"]
        sampled[row.slide_id] = sample_slide_tiles(row.slide_id, slides[row.slide_id], tiles[row.slide_id], limit, seed)
    skipped = [s for s, t in sampled.items() if len(t.coords) == 0]
    if skipped:
        logger.warning("fold %d: %d slide(s) without tiles skipped: %s", fold, len(skipped), ", ".join(skipped[:20]))
    split = split[~split["slide_id"].isin(skipped)].reset_index(drop=True)
    for part in ("train", "val"):
        if not (split["partition"] == part).any():
            raise ValueError(f"fold {fold}: no {part} slide has tiles")
    return sampled, split, skipped


def fit(run: Run, sampled: dict[str, SlideTiles], split: pd.DataFrame, seed: int, fold: int):
    """Train with early stopping on the validation patients' metric of the task (AUC, macro AUC); returns
    (Selection, history, train tiles)."""
    cfg = run.cfg
    train_pool = TilePool([sampled[s] for s in split.loc[split["partition"] == "train", "slide_id"]], _Augment(), seed,
                          resize_px=cfg["input_px"])
    val = split[split["partition"] == "val"]
    val_pool = TilePool([sampled[s] for s in val["slide_id"]], None, seed, resize_px=cfg["input_px"])
    logger.info("fold %d: %d train tiles, %d val tiles; %s init %s; device %s",
                fold, len(train_pool), len(val_pool), cfg["arch"], cfg["init"], run.device)
    optimizer = torch.optim.Adam(run.model.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]),
                                 weight_decay=cfg["weight_decay"])
    stepper = Stepper(optimizer, run.amp.grad_scaler(run.device))
    desc = f"tile_supervised fold {fold}"

    def train(epoch: int) -> tuple[float, float]:
        return train_epoch(run, train_pool, epoch, stepper, seed, desc), cfg["lr"]  # no schedule: lr is constant

    def validate() -> tuple[float | None, float]:
        outputs, val_loss = predict_tiles(run, val_pool)
        return run.task.score(with_outputs(val, outputs)), val_loss

    # The epoch's tiles show a progress bar of their own.
    loop = Loop(train, validate, cfg["epochs"], cfg["patience"], desc, progress=False)
    best, history = fit_epochs(run.model, loop, run.task.can_select(val))
    return best, history, len(train_pool)


def with_outputs(slides: pd.DataFrame, outputs: pd.DataFrame) -> pd.DataFrame:
    """``slides`` with each slide's outputs (``slide_outputs``) as columns."""
    return slides.assign(**{c: slides["slide_id"].map(outputs[c]) for c in outputs.columns})


@one_opencv_thread()  # the loader workers are the parallelism (see slides.one_opencv_thread)
def train_tile_supervised(
    slides: dict[str, str],
    tiles: dict[str, str],
    splits_csv: str,
    fold: int,
    settings: dict | None,
    seed: int,
    out_dir: str,
    device: str = "auto",
    workers: int = 0,
    num_threads: int | None = None,
) -> dict:
    """Train the tile-supervised baseline on fold ``fold``; write the four standard training outputs."""
    started = time.monotonic()
    cfg = resolve_settings(settings)
    if num_threads:
        torch.set_num_threads(num_threads)
    dev = resolve_device(device)
    warn_if_bf16_emulated(dev, cfg["precision"], "tile_supervised.precision")

    task = tile_task(splits_csv)
    sampled, split, skipped = sample_fold(read_fold(splits_csv, fold), slides, tiles, cfg, seed, fold)
    ids = {p: split.loc[split["partition"] == p, "slide_id"].tolist() for p in ("train", "val", "test")}
    labels = task.targets(split)
    # Weighted by tiles, as the loss is: slides of one class may have more tiles than another's.
    tile_labels = np.array([labels[s] for s in ids["train"] for _ in range(len(sampled[s].coords))])
    weights = class_weights(tile_labels, cfg["class_weighted"], n_classes=task.head_size).to(dev)

    torch.manual_seed(seed)
    model = TileClassifier(cfg["arch"], cfg["init"], seed, task.head_size).to(dev, memory_format=torch.channels_last)
    amp = resolve_precision(dev, cfg["precision"], need="training")
    run = Run(model, dev, amp, weights, labels, cfg, task, workers)
    best, history, n_train_tiles = fit(run, sampled, split, seed, fold)

    model.load_state_dict(best.state)
    slides_out = final_predictions(run, sampled, split, seed)
    write_outputs(out_dir, checkpoint(run, best, seed, fold), history, slides_out, task.patients(slides_out),
                  metric_column=task.history_column)
    test = slides_out[slides_out["partition"] == "test"]
    metric = "auc" if task.name == BINARY else task.metric  # binary keeps its summary keys, as MIL training does
    summary = {
        "model": TILE_MODEL, "fold": fold, "seed": seed, "best_epoch": best.epoch,
        "epochs_run": len(history), f"val_{metric}": best.auc,
        f"test_{metric}": task.score(test) if len(test) else None,
        "n_slides": {p: len(v) for p, v in ids.items()}, "skipped_slides": skipped,
        "train_tiles": n_train_tiles, "device": str(dev), "seconds": round(time.monotonic() - started, 2),
    }
    logger.info("fold %d done: best epoch %d, val %s %s, test %s %s", fold, best.epoch, metric, fmt_metric(best.auc),
                metric, fmt_metric(summary[f"test_{metric}"]))
    return summary


def final_predictions(run: Run, sampled: dict[str, SlideTiles], split: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The validation and test slides with the model's outputs: slide_id, patient_id, label, partition and the
    task's output columns (predictions_slides.csv, as MIL training writes it)."""
    evaluated = split[split["partition"].isin(["val", "test"])].reset_index(drop=True)
    eval_pool = TilePool([sampled[s] for s in evaluated["slide_id"]], None, seed, resize_px=run.cfg["input_px"])
    outputs, _ = predict_tiles(run, eval_pool)
    columns = ["slide_id", "patient_id", "label", "partition", *run.task.output_columns]
    return with_outputs(evaluated, outputs)[columns]


def checkpoint(run: Run, best: Selection, seed: int, fold: int) -> dict:
    """The model.pt content: the keys every training checkpoint has (slidemil.files.checkpoint), the task's
    record (slidemil.tasks.Task.state, which task_from_checkpoint reads), the settings and the init digest."""
    return {"state_dict": best.state, "model": TILE_MODEL, "settings": run.cfg, "init_digest": run.model.init_digest,
            "epoch": best.epoch, "val_auc": best.auc, "seed": seed, "fold": fold, "n_classes": run.task.head_size,
            **run.task.state()}


def main(argv=None, prog: str = "python -m slidemil.pretrain.tile_supervised") -> None:
    from slidemil.logs import setup_logging

    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_arguments(ap, DEFAULT_SETTINGS)
    ap.add_argument("--fold", type=int, required=True)
    args = ap.parse_args(argv)
    setup_logging(args.log)
    slides, tiles = cli_cohort(args)
    summary = train_tile_supervised(slides, tiles, args.splits, args.fold, args.settings, args.seed, args.out,
                                    args.device, args.workers, args.num_threads)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
