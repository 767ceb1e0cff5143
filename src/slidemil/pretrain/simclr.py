"""SimCLR pre-training of a tile encoder on the cohort's own training tiles (DeepSMILE section 4.1.1).

The encoder is a registered extractor architecture (ShuffleNetV2 x1.0 by
default, or ResNet-18 / truncated ResNet-50) with He initialisation. Each
sampled tile gives two views (random resized crop, horizontal flip, colour
jitter of strength s applied with p=0.8, random grayscale p=0.2, as Chen et
al. 2020); a projection head (dim -> dim -> ReLU -> 128) maps the encoder
output to the space where the NT-Xent loss is computed. Adam (lr 3e-4, betas
0.9/0.99, no weight decay, no schedule), as the paper.

Only slides that are never ``test`` in any fold of the splits are sampled:
the held-out test patients' tiles are never read.

Outputs in ``out_dir``: backbone.pt (the encoder without the head, a state dict
the extractors load), loss.csv and loss.png (the loss curve), checkpoint.pt
(after every epoch; a run that finds one with the same settings resumes from it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm import tqdm

from slidemil.config import Simclr, field_defaults, resolve
from slidemil.names import SIMCLR_ARCHITECTURES
from slidemil.runtime import Precision, resolve_device, resolve_precision, warn_if_bf16_emulated
from slidemil.features.extractors import get_spec, variance_preserving_init, weights_digest
from slidemil.files import atomic_output, save_png, write_csv
from slidemil.slides.reader import one_opencv_thread
from slidemil.errors import SplitError
from slidemil.files.splits import never_test_slides
from slidemil.pretrain.tilepool import (TilePool, add_cli_arguments, cli_cohort, epoch_generator, normalizer,
                       sample_slide_tiles)
from slidemil.training import Loop, Stepper, fit_epochs

logger = logging.getLogger(__name__)

# The defaults and checks are slidemil.config.Simclr's (one home for the workflow and this CLI).
DEFAULT_SETTINGS = field_defaults(Simclr)
ARCHITECTURES = SIMCLR_ARCHITECTURES
CHECKPOINT = "checkpoint.pt"


def resolve_settings(settings: dict | None) -> dict:
    """``settings`` completed with the defaults; unknown keys and bad values are errors (one line)."""
    return resolve(Simclr, settings, "simclr")


# --------------------------------------------------------------------------- data


def pretraining_slides(splits_csv: str) -> list[str]:
    """Slides that are never ``test`` in any fold (training, validation and unlabelled slides)."""
    slides = never_test_slides(splits_csv)
    if not slides:
        raise SplitError(
            f"{splits_csv}: every slide is a test slide in some fold (predefined folds rotate the test set), "
            "so SimCLR pre-training would see test tiles. Use a held-out test set (splits.test_fraction or "
            "splits.test_column) or give the extractor a weights file pre-trained elsewhere."
        )
    return slides


class TwoViews:
    """Two independent SimCLR augmentations of one uint8 CHW tile -> uint8 [2, 3, px, px]."""

    def __init__(self, input_px: int, color_strength: float = 1.0, min_crop_scale: float = 0.08):
        s = color_strength
        self.augment = v2.Compose([
            v2.RandomResizedCrop(input_px, scale=(min_crop_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ])

    def __call__(self, tile: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.augment(tile), self.augment(tile)])


# --------------------------------------------------------------------------- model and loss


class SimCLRModel(nn.Module):
    """Encoder (a truncated extractor architecture) + projection head, He-initialised."""

    def __init__(self, arch: str = "shufflenet_v2", proj_dim: int = 128):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown SimCLR architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
        spec = get_spec(arch)
        self.backbone = spec.truncate(variance_preserving_init(spec.build_full()))
        self.head = variance_preserving_init(nn.Sequential(
            nn.Linear(spec.dim, spec.dim), nn.ReLU(inplace=True), nn.Linear(spec.dim, proj_dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (Chen et al. 2020): each view's positive is the other view of its tile, all 2B-2 others negatives."""
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


# --------------------------------------------------------------------------- stage


@dataclass(frozen=True)
class _Run:
    """What the epochs of one pre-training share: the model, how it steps, where and how it computes, its tiles."""

    model: SimCLRModel
    optimizer: torch.optim.Optimizer
    stepper: Stepper
    amp: Precision
    device: torch.device
    normalize: Callable[[torch.Tensor], torch.Tensor]
    pool: TilePool
    batch_size: int
    workers: int
    seed: int
    cfg: dict


@one_opencv_thread()  # the loader workers are the parallelism (see slides.one_opencv_thread)
def pretrain_simclr(
    slides: dict[str, str],
    tiles: dict[str, str],
    splits_csv: str,
    out_dir: str,
    arch: str = "shufflenet_v2",
    settings: dict | None = None,
    seed: int = 0,
    device: str = "auto",
    workers: int = 0,
    num_threads: int | None = None,
) -> dict:
    """Pre-train ``arch`` with SimCLR on the non-test slides; write backbone.pt, loss.csv/png, checkpoint.pt.

    ``slides`` and ``tiles`` map slide_id to the slide file and its tiling HDF5.
    """
    started = time.monotonic()
    cfg = resolve_settings(settings)
    if num_threads:
        torch.set_num_threads(num_threads)
    dev = resolve_device(device)
    out = Path(out_dir)

    pool, n_ids = _pretraining_pool(slides, tiles, splits_csv, cfg, seed)
    batch_size = min(cfg["batch_size"], len(pool))
    logger.info("SimCLR %s: %d tiles from %d non-test slides (%d without tiles), batch %d, %d epochs, device %s",
                arch, len(pool), len(pool.slide_ids), n_ids - len(pool.slide_ids), batch_size, cfg["epochs"], dev)
    run = _setup_run(arch, cfg, seed, dev, pool, batch_size, workers)
    first_epoch, history = _train(run, arch, out / CHECKPOINT)
    curve = pd.DataFrame(history, columns=["epoch", "step", "loss"])
    digest = _write_outputs(out, run.model, arch, cfg, seed, pool.slide_ids, curve, batch_size)
    summary = {
        "arch": arch, "first_epoch": first_epoch, "epochs": cfg["epochs"], "n_tiles": len(pool),
        "slides": pool.slide_ids, "weights_digest": digest, "device": str(dev),
        "epoch_loss": curve.groupby("epoch")["loss"].mean().round(6).tolist(),
        "seconds": round(time.monotonic() - started, 2),
    }
    logger.info("SimCLR done: %s, digest %s, %.1f s", out / "backbone.pt", digest, summary["seconds"])
    return summary


def _pretraining_pool(slides: dict[str, str], tiles: dict[str, str], splits_csv: str, cfg: dict,
                      seed: int) -> tuple[TilePool, int]:
    """The sampled tiles of the non-test slides, each giving two views, and the number of non-test slides."""
    ids = pretraining_slides(splits_csv)
    missing = [s for s in ids if s not in slides or s not in tiles]
    if missing:
        raise ValueError(f"no slide or tiles file for slide(s) {', '.join(missing[:20])}")
    sampled = [sample_slide_tiles(s, slides[s], tiles[s], cfg["tiles_per_slide"], seed) for s in ids]
    pool = TilePool(sampled, TwoViews(cfg["input_px"], cfg["color_strength"], cfg["min_crop_scale"]), seed)
    if len(pool) < 2:
        raise ValueError(f"SimCLR needs at least 2 tiles; the {len(ids)} non-test slides have {len(pool)}")
    return pool, len(ids)


def _setup_run(arch: str, cfg: dict, seed: int, dev: torch.device, pool: TilePool, batch_size: int,
               workers: int) -> _Run:
    """The seeded, He-initialised model and its optimizer, in the precision ``cfg`` asks for on ``dev``."""
    torch.manual_seed(seed)
    model = SimCLRModel(arch, cfg["proj_dim"]).to(dev, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]),
                                 weight_decay=cfg["weight_decay"])
    warn_if_bf16_emulated(dev, cfg["precision"], "simclr.precision")
    amp = resolve_precision(dev, cfg["precision"], need="training")
    stepper = Stepper(optimizer, amp.grad_scaler(dev))
    return _Run(model, optimizer, stepper, amp, dev, normalizer(dev), pool, batch_size, workers, seed, cfg)


def _signature(arch: str, seed: int, pool: TilePool, cfg: dict) -> dict:
    """What must match for a checkpoint to be continued: everything but the number of epochs.

    precision joins only when set, so checkpoints written before the setting existed still continue.
    """
    return {"arch": arch, "seed": seed, "slides": pool.slide_ids, "n_tiles": len(pool),
            **{k: v for k, v in cfg.items() if k != "epochs" and (k, v) != ("precision", "auto")}}


def _train(run: _Run, arch: str, checkpoint: Path) -> tuple[int, list[dict]]:
    """Train from after a matching ``checkpoint`` (or from scratch) to the last epoch; returns the first epoch
    run and the loss of every step, those before the checkpoint included."""
    signature = _signature(arch, run.seed, run.pool, run.cfg)
    epochs = run.cfg["epochs"]
    first_epoch, history = _resume(checkpoint, signature, epochs, run.model, run.optimizer, run.stepper.scaler)

    def save_checkpoint(epoch: int) -> None:
        _save_checkpoint(checkpoint, epoch, signature, run.model, run.optimizer, run.stepper.scaler, history)

    # The shared loop without validation: SimCLR has no labels to select or stop on, so every epoch runs (patience
    # never stops it), from the one after the checkpoint, and each epoch ends with a checkpoint to continue from.
    fit_epochs(run.model, Loop(partial(_train_epoch, run, history), None, epochs, epochs, f"SimCLR {arch}",
                               progress=False, first_epoch=first_epoch, after_epoch=save_checkpoint), use_auc=False)
    return first_epoch, history


def _train_epoch(run: _Run, history: list[dict], epoch: int) -> tuple[float, float]:
    """One pass over the pool in an order drawn from (seed, epoch); appends every step's loss to ``history``
    and returns the epoch's mean loss and the learning rate."""
    run.pool.epoch = epoch
    loader = DataLoader(run.pool, batch_size=run.batch_size, shuffle=True, generator=epoch_generator(run.seed, epoch),
                        drop_last=True, num_workers=run.workers, pin_memory=run.device.type == "cuda",
                        prefetch_factor=4 if run.workers else None)
    run.model.train()
    batches = tqdm(loader, desc=f"simclr epoch {epoch}", mininterval=2, file=sys.stderr)
    for step, (views, _) in enumerate(batches, 1):
        x = run.normalize(views.flatten(0, 1))  # [2B, 3, px, px]: tile k's views at 2k and 2k+1
        with run.amp.autocast(run.device):
            z = run.model(x).view(-1, 2, run.cfg["proj_dim"])
        loss = nt_xent(z[:, 0], z[:, 1], run.cfg["temperature"])
        run.stepper.step(loss)
        history.append({"epoch": epoch, "step": step, "loss": loss.item()})  # loss.csv keeps every step
    return float(np.mean([h["loss"] for h in history if h["epoch"] == epoch])), run.stepper.lr


def _write_outputs(out: Path, model: SimCLRModel, arch: str, cfg: dict, seed: int, slide_ids: list[str],
                   curve: pd.DataFrame, batch_size: int) -> str:
    """backbone.pt (the encoder the extractors load), loss.csv and loss.png; returns the weights digest."""
    backbone = {k: v.detach().cpu().clone() for k, v in model.backbone.state_dict().items()}
    digest = weights_digest(model.backbone)
    with atomic_output(out / "backbone.pt") as tmp:
        torch.save({"state_dict": backbone, "arch": arch, "epochs": cfg["epochs"], "seed": seed,
                    "settings": cfg, "slides": slide_ids, "weights_digest": digest}, tmp)
    write_csv(out / "loss.csv", curve)
    plot_loss(curve, out / "loss.png", f"SimCLR {arch}", chance=float(np.log(2 * batch_size - 1)))
    return digest


def _resume(path: Path, signature: dict, epochs: int, model, optimizer, scaler) -> tuple[int, list[dict]]:
    """First epoch to run and the loss history so far, restoring state from a matching checkpoint."""
    if not path.is_file():
        return 1, []
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("signature") != signature:
        logger.info("%s was made with other settings; starting afresh", path)
        return 1, []
    if state["epoch"] > epochs:
        logger.info("%s is past epoch %d; starting afresh", path, epochs)
        return 1, []
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    logger.info("resuming SimCLR from %s after epoch %d", path, state["epoch"])
    return state["epoch"] + 1, list(state["history"])


def _save_checkpoint(path: Path, epoch, signature, model, optimizer, scaler, history) -> None:
    with atomic_output(path) as tmp:
        torch.save({"epoch": epoch, "signature": signature, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "history": history}, tmp)


def plot_loss(curve: pd.DataFrame, out_png: Path, title: str, chance: float | None = None) -> None:
    """Loss per step and per epoch; ``chance`` (log(2B - 1)) is the loss of embeddings that tell nothing apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = np.arange(1, len(curve) + 1)
    ax.plot(steps, curve["loss"], lw=0.8, alpha=0.6, label="step")
    ends = curve.groupby("epoch").size().cumsum()
    ax.plot(ends.to_numpy(), curve.groupby("epoch")["loss"].mean().to_numpy(), "o-", label="epoch mean")
    if chance is not None:
        ax.axhline(chance, ls="--", lw=0.8, color="gray", label="chance, log(2B-1)")
    ax.set(xlabel="step", ylabel="NT-Xent loss", title=title)
    ax.legend()
    fig.tight_layout()
    save_png(fig, out_png)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


def main(argv=None, prog: str = "python -m slidemil.pretrain.simclr") -> None:
    from slidemil.logs import setup_logging

    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_arguments(ap, DEFAULT_SETTINGS)
    ap.add_argument("--arch", default="shufflenet_v2", choices=ARCHITECTURES)
    args = ap.parse_args(argv)
    setup_logging(args.log)
    slides, tiles = cli_cohort(args)
    summary = pretrain_simclr(slides, tiles, args.splits, args.out, args.arch, args.settings, args.seed,
                              args.device, args.workers, args.num_threads)
    print(json.dumps({k: v for k, v in summary.items() if k != "slides"}, indent=2))


if __name__ == "__main__":
    main()
