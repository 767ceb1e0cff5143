"""Tile-supervised baseline (DeepSMILE section 4.2.1): every tile carries its slide's label.

A CNN (a registered extractor architecture, ShuffleNetV2 or ResNet-18,
initialised from ImageNet weights in a local file, the cohort's SimCLR backbone
or at random) gets a new He-initialised linear layer and is fine-tuned
end to end on a fixed subsample of each training slide's tiles with
class-weighted cross-entropy (Adam, betas 0.9/0.99, no schedule). A slide's
score is the fraction of its tiles predicted positive (DeepSMILE eq. 4), a
patient's the mean of its slides'. The epoch with the best validation patient
AUC is kept, as in the MIL training, and the same four outputs are written:
model.pt, history.csv, predictions_slides.csv, predictions_patients.csv.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm import tqdm

from slidemil.runtime import check_train_precision, resolve_device, warn_if_bf16_emulated
from slidemil.features.extractors import create_extractor, get_spec
from slidemil.files import atomic_output, write_csv
from slidemil.slides.reader import one_opencv_thread
from slidemil.pretrain.tilepool import (SlideTiles, TilePool, add_cli_arguments, cli_cohort, epoch_generator, merge_settings,
                       normalizer, sample_slide_tiles)
from slidemil.mil.train import (
    N_CLASSES, Selection, auc_or_none, autocast, class_weights, patient_predictions, read_split, weighted_loss,
)

logger = logging.getLogger(__name__)

DEFAULT_SETTINGS = {
    "arch": "shufflenet_v2",
    "init": "random",           # imagenet, random, or a path to a state dict (the workflow's "simclr" is one)
    "input_px": 128,
    "tiles_per_slide": 32,      # training tiles per slide, fixed once by the seed
    "eval_tiles_per_slide": 64,  # validation/test tiles per slide (null: all)
    "epochs": 4,                # DeepSMILE (TCGA-BC, after Kather et al. 2020): 4 epochs, lr 5e-5, batch 512
    "patience": 4,
    "lr": 5e-5,
    "betas": [0.9, 0.99],
    "weight_decay": 0.0,
    "batch_size": 64,
    "class_weighted": True,
    "precision": "auto",        # as simclr.precision: auto is bf16 on CUDA, float32 on CPU
}
ARCHITECTURES = ("shufflenet_v2", "resnet18")


def resolve_settings(settings: dict | None) -> dict:
    cfg = merge_settings("tile_supervised", settings, DEFAULT_SETTINGS,
                         positive=("input_px", "epochs", "patience", "batch_size"),
                         optional_positive=("tiles_per_slide", "eval_tiles_per_slide"), floats=("lr", "weight_decay"))
    if cfg["arch"] not in ARCHITECTURES:
        raise ValueError(f"tile_supervised.arch must be one of {', '.join(ARCHITECTURES)}, got {cfg['arch']!r}")
    check_train_precision(cfg["precision"], "tile_supervised.precision")
    return cfg


class TileClassifier(nn.Module):
    """Extractor backbone + a fresh linear layer: tile -> class logits."""

    def __init__(self, arch: str, init: str, seed: int = 0):
        super().__init__()
        self.backbone, self.init_digest = create_extractor(arch, init, seed)
        self.fc = nn.Linear(get_spec(arch).dim, N_CLASSES)
        nn.init.kaiming_normal_(self.fc.weight, nonlinearity="relu")  # He, as the paper's re-initialised layers
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))


def slide_scores(tile_slides: list[str], tile_logits: torch.Tensor) -> pd.Series:
    """Fraction of each slide's tiles whose argmax is the positive class (DeepSMILE eq. 4)."""
    positive = (tile_logits.argmax(dim=1) == 1).double().cpu().numpy()
    return pd.Series(positive).groupby(pd.Series(tile_slides)).mean()


class _Augment:
    """Random flips and 90-degree turns: orientation carries no meaning in a tile."""

    def __init__(self):
        self.flip = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()])

    def __call__(self, tile: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, ()))
        return self.flip(torch.rot90(tile, k, dims=(1, 2)))


@torch.inference_mode()
def predict_tiles(model, pool: TilePool, labels: dict[str, int], weights, device, batch_size, workers,
                  precision: str = "auto") -> tuple[pd.Series, float]:
    """Slide scores over the pool's slides and the mean weighted tile loss."""
    model.eval()
    normalize = normalizer(device)
    loader = DataLoader(pool, batch_size=batch_size, shuffle=False, num_workers=workers)
    item_slides = pool.item_slide_ids()
    logits = []
    for tiles, _ in loader:
        with autocast(device, precision):
            logits.append(model(normalize(tiles)).float().cpu())
    logits = torch.cat(logits)
    y = torch.tensor([labels[s] for s in item_slides], dtype=torch.long)
    loss = weighted_loss(logits, y, weights.cpu(), reduction="sum").item() / max(len(y), 1)
    return slide_scores(item_slides, logits), loss


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

    split = read_split(splits_csv, fold)
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
    ids = {p: split.loc[split["partition"] == p, "slide_id"].tolist() for p in ("train", "val", "test")}
    for part in ("train", "val"):
        if not ids[part]:
            raise ValueError(f"fold {fold}: no {part} slide has tiles")
    labels = dict(zip(split["slide_id"], split["label"]))

    train_pool = TilePool([sampled[s] for s in ids["train"]], _Augment(), seed, resize_px=cfg["input_px"])
    val_pool = TilePool([sampled[s] for s in ids["val"]], None, seed, resize_px=cfg["input_px"])
    tile_labels = np.array([labels[s] for s in train_pool.item_slide_ids()])
    weights = class_weights(tile_labels, cfg["class_weighted"]).to(dev)
    logger.info("fold %d: %d train tiles from %d slides, %d val tiles; %s init %s; device %s",
                fold, len(train_pool), len(ids["train"]), len(val_pool), cfg["arch"], cfg["init"], dev)

    torch.manual_seed(seed)
    model = TileClassifier(cfg["arch"], cfg["init"], seed).to(dev, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]),
                                 weight_decay=cfg["weight_decay"])
    normalize = normalizer(dev)
    y_all = torch.from_numpy(tile_labels)
    val = split[split["partition"] == "val"]
    best = Selection(use_auc=val.groupby("patient_id")["label"].first().nunique() == 2)
    history = []
    for epoch in range(1, cfg["epochs"] + 1):
        train_pool.epoch = epoch
        loader = DataLoader(train_pool, batch_size=cfg["batch_size"], shuffle=True,
                            generator=epoch_generator(seed, epoch), num_workers=workers,
                            pin_memory=dev.type == "cuda")
        model.train()
        total, n = 0.0, 0
        for x, idx in tqdm(loader, desc=f"tile_supervised fold {fold} epoch {epoch}", mininterval=2, file=sys.stderr):
            with autocast(dev, cfg["precision"]):
                logits = model(normalize(x))
            loss = weighted_loss(logits, y_all[idx].to(dev), weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, n = total + loss.item() * len(idx), n + len(idx)
        scores, val_loss = predict_tiles(model, val_pool, labels, weights, dev, cfg["batch_size"], workers,
                                        cfg["precision"])
        patients = patient_predictions(val.assign(prob=val["slide_id"].map(scores)))
        val_auc = auc_or_none(patients["label"], patients["prob"])
        history.append({"epoch": epoch, "train_loss": total / max(n, 1), "val_loss": val_loss,
                        "val_auc": val_auc, "lr": cfg["lr"]})
        improved = best.improves(val_auc, val_loss)
        if improved:
            best.update(epoch, val_auc, val_loss, model)
        logger.info("fold %d epoch %d/%d train_loss %.4f val_loss %.4f val_auc %s%s", fold, epoch, cfg["epochs"],
                    history[-1]["train_loss"], val_loss, "n/a" if val_auc is None else f"{val_auc:.4f}",
                    " (best)" if improved else "")
        if epoch - best.epoch >= cfg["patience"]:
            logger.info("fold %d: early stop after epoch %d", fold, epoch)
            break

    model.load_state_dict(best.state)
    evaluated = split[split["partition"].isin(["val", "test"])].reset_index(drop=True)
    eval_pool = TilePool([sampled[s] for s in evaluated["slide_id"]], None, seed, resize_px=cfg["input_px"])
    scores, _ = predict_tiles(model, eval_pool, labels, weights, dev, cfg["batch_size"], workers, cfg["precision"])
    slides_out = evaluated.assign(prob=evaluated["slide_id"].map(scores))[
        ["slide_id", "patient_id", "label", "partition", "prob"]]
    patients = patient_predictions(slides_out)
    test = patients[patients["partition"] == "test"]

    out = Path(out_dir)
    with atomic_output(out / "model.pt") as tmp:
        torch.save({"state_dict": best.state, "model": "tile_supervised", "settings": cfg,
                    "init_digest": model.init_digest, "epoch": best.epoch, "val_auc": best.auc,
                    "seed": seed, "fold": fold, "n_classes": N_CLASSES}, tmp)
    write_csv(out / "history.csv", pd.DataFrame(history, columns=["epoch", "train_loss", "val_loss", "val_auc", "lr"]))
    write_csv(out / "predictions_slides.csv", slides_out)
    write_csv(out / "predictions_patients.csv", patients)
    summary = {
        "model": "tile_supervised", "fold": fold, "seed": seed, "best_epoch": best.epoch,
        "epochs_run": len(history), "val_auc": best.auc,
        "test_auc": auc_or_none(test["label"], test["prob"]) if len(test) else None,
        "n_slides": {p: len(v) for p, v in ids.items()}, "skipped_slides": skipped,
        "train_tiles": len(train_pool), "device": str(dev), "seconds": round(time.monotonic() - started, 2),
    }
    logger.info("fold %d done: best epoch %d, val auc %s, test auc %s", fold, best.epoch, best.auc, summary["test_auc"])
    return summary


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
