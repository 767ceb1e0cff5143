"""Training stage: one MIL model on one fold of the splits.

Bags (one per slide) are memory-mapped from the feature files (or read, when a
file's layout cannot be mapped) once per job: jobs of several folds and models on
one node share the page cache instead of each holding a copy. The model is trained with
Adam and a per-step cosine schedule on the fold's ``train`` slides, evaluated
after every epoch on its ``val`` slides at the patient level (mean of a
patient's slide probabilities), and the checkpoint with the best validation
patient AUC (``training.selection``: or the lowest validation loss, or the last
epoch; see ``slidemil.training.Selection``) is kept. Validation and test predictions of that checkpoint are written out.

Models that train differently (MHIM-MIL: teacher, masking, EMA) do so through
the optional hooks described in ``slidemil.mil.models``; a model that starts from
another one's checkpoint gets it as ``init_checkpoint``.

Outputs in ``out_dir``: model.pt, history.csv, predictions_slides.csv,
predictions_patients.csv.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from slidemil.config import Compute, Config, Training, field_defaults, resolve
from slidemil.runtime import resolve_device, resolve_precision, warn_if_bf16_emulated
from slidemil.files.checkpoint import read_checkpoint
from slidemil.files.features import map_features, read_features
from slidemil.files.splits import read_fold, read_splits, split_task
from slidemil.mil.models import create_model
from slidemil.names import BINARY
from slidemil.tasks import Task, make_task
from slidemil.training import Loop, Selection, Stepper, fit_epochs, fmt_metric, subsample_indices, write_outputs

logger = logging.getLogger(__name__)

# The defaults and checks are slidemil.config.Training's (one home for the workflow and this CLI).
DEFAULT_TRAINING = field_defaults(Training)


# --------------------------------------------------------------------------- inputs


def resolve_training(training: dict | None) -> dict:
    """``training`` completed with the defaults; unknown keys and bad values are errors (one line)."""
    return resolve(Training, training, "training")


def load_bags(
    slide_ids, features: dict[str, str], max_tiles: int | None = None, seed: int = 0, mmap: bool = True
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every slide's features, once, as tensors [N, D].

    With ``mmap`` a bag is a copy-on-write map of its HDF5 file (what ``write_h5`` stores
    maps; other layouts are read), so parallel jobs share the page cache; a subsampled bag
    is its own copy. Each map holds a file descriptor: the open-file limit is raised towards
    its hard limit when short, and maps stop at half of it (later bags are read).
    float16 features stay float16 (half the RAM of a large cohort) and are cast to float32
    (and standardised) per batch. Returns the bags and the slides skipped because they
    have no tiles. A slide without a feature file is an error (all such slides are listed).
    """
    missing = [s for s in slide_ids if s not in features]
    if missing:
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise ValueError(f"no feature file for slide(s) {', '.join(missing[:20])}{more}")
    maps_left = _map_budget(len(slide_ids)) if mmap else 0
    bags, skipped = {}, []
    for slide_id in slide_ids:
        if maps_left > 0:
            feats = map_features(features[slide_id])
            maps_left -= isinstance(feats, np.memmap)
        else:
            feats = read_features(features[slide_id], names=("features",))[0]["features"]
        if feats.size == 0:
            logger.warning("slide %s has no tiles (%s); skipped", slide_id, features[slide_id])
            skipped.append(slide_id)
            continue
        if feats.ndim != 2:
            raise ValueError(f"slide {slide_id}: features must be N x D, got shape {feats.shape}")
        keep = subsample_indices(len(feats), max_tiles, seed, slide_id)
        if keep is not None:
            feats = feats[keep]
        if feats.dtype not in (np.float16, np.float32):
            feats = feats.astype(np.float32)
        bags[slide_id] = torch.from_numpy(feats if isinstance(feats, np.memmap) else np.ascontiguousarray(feats))
    dims = {b.shape[1] for b in bags.values()}
    if len(dims) > 1:
        raise ValueError(f"feature dimensions differ between slides: {sorted(dims)}")
    return bags, skipped


def _map_budget(n_files: int) -> int:
    """How many feature files may stay mapped: half the open-file limit, raised towards the hard limit if short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return n_files
    wanted = 2 * n_files + 128
    if soft < wanted and (hard == resource.RLIM_INFINITY or hard > soft):
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return max(soft // 2 - 64, 0)


def feature_stats(bags: dict[str, torch.Tensor], ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std over all tiles of the given slides, accumulated bag by bag."""
    total = sum(len(bags[s]) for s in ids)
    acc = sum(bags[s].double().sum(0) for s in ids)
    acc_sq = sum(bags[s].double().pow(2).sum(0) for s in ids)
    mean = acc / total
    std = (acc_sq / total - mean.pow(2)).clamp_min(0).sqrt()
    # Constant dimensions carry no information; dividing by 1 leaves them at zero after centring.
    std[std < 1e-12] = 1.0
    return mean.float(), std.float()


# --------------------------------------------------------------------------- batches and losses


def collate(bags: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad bags [N_i, D] to x [B, max N, D] with mask [B, max N] (True = real tile)."""
    n_max = max(len(b) for b in bags)
    # Promote, so a float32 bag batched with float16 ones is never rounded down.
    dtype = functools.reduce(torch.promote_types, (b.dtype for b in bags))
    x = torch.zeros((len(bags), n_max, bags[0].shape[1]), dtype=dtype)
    mask = torch.zeros((len(bags), n_max), dtype=torch.bool)
    for i, bag in enumerate(bags):
        x[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    return x, mask


def batch_ids(slide_ids: list[str], batch_size: int, rng: np.random.Generator | None = None) -> list[list[str]]:
    """Slides in minibatches, shuffled by ``rng`` when given."""
    order = rng.permutation(len(slide_ids)) if rng is not None else np.arange(len(slide_ids))
    ordered = [slide_ids[i] for i in order]
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


# --------------------------------------------------------------------------- epochs


@dataclass
class Data:
    """What the epoch loops need: bags, slide targets, the task (its loss) and the standardisation."""

    bags: dict[str, torch.Tensor]
    targets: dict
    task: Task
    device: torch.device
    norm: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, std) per feature dimension
    precision: str = "auto"  # training.precision: the autocast of every forward pass

    def __post_init__(self):
        self.amp = resolve_precision(self.device, self.precision, need="training")
        if self.norm is not None:
            self.norm = tuple(t.float().to(self.device) for t in self.norm)

    def batch(self, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, mask = collate([self.bags[s] for s in ids])
        y = self.task.collate([self.targets[s] for s in ids])
        x, mask = x.to(self.device).float(), mask.to(self.device)
        if self.norm is not None:
            # Standardised here, in float32, rather than once into a second copy of every bag: the bags
            # stay what was loaded (shared maps of the feature files), and training sees the same
            # values the heatmaps compute from the checkpoint's statistics. Padding stays zero.
            # In place: collate made x, a copy of the bags.
            x.sub_(self.norm[0]).div_(self.norm[1])
            if not mask.all():
                x.masked_fill_(~mask[..., None], 0.0)
        return x, mask, y.to(self.device)


def train_epoch(
    model, data: Data, ids: list[str], batch_size: int, stepper: Stepper, rng, step: int = 0, total_steps: int = 1
) -> tuple[float, float]:
    """One pass over the training slides; returns (mean batch loss, lr of the last step).

    ``step`` counts optimiser steps from the start of training (of ``total_steps``) for
    models whose own schedules follow training progress (the hooks in ``slidemil.mil.models``).
    """
    model.train()
    loss_fn = data.task.loss
    training_step = getattr(model, "training_step", None)
    after_step = getattr(model, "after_optimizer_step", None)
    total, n_batches, lr = 0.0, 0, float("nan")
    for chunk in batch_ids(ids, batch_size, rng):
        x, mask, y = data.batch(chunk)
        with data.amp.autocast(data.device):
            if training_step is not None:
                loss = training_step(x, mask, y, loss_fn, step, total_steps)
            else:
                loss = loss_fn(model(x, mask)["logits"], y)
        lr = stepper.lr  # the rate this step uses; the schedule moves it after the step
        stepper.step(loss)
        if after_step is not None:
            after_step(step, total_steps)
        step += 1
        total += loss.item()
        n_batches += 1
    return total / max(n_batches, 1), lr


@torch.inference_mode()
def predict(model, data: Data, ids: list[str], batch_size: int) -> tuple[pd.DataFrame, float]:
    """Slide outputs over ``ids`` (the task's columns: binary ``prob`` of class 1) and the mean (weighted) loss."""
    model.eval()
    outputs, loss_sum = [], 0.0
    for chunk in batch_ids(ids, batch_size):
        x, mask, y = data.batch(chunk)
        with data.amp.autocast(data.device):
            logits = model(x, mask)["logits"].float()
        loss_sum += data.task.loss(logits, y, reduction="sum").item()
        outputs.append(data.task.outputs(logits))
    values = np.concatenate(outputs).astype(np.float64)
    return pd.DataFrame(values, columns=data.task.output_columns), loss_sum / max(len(ids), 1)


def fit(net, data: Data, train_ids: list[str], val: pd.DataFrame, cfg: dict, seed: int, desc: str):
    """Train with early stopping on the validation slides; returns (Selection, history rows)."""
    optimizer = torch.optim.Adam(
        [p for p in net.parameters() if p.requires_grad],
        lr=cfg["lr"], betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"],
    )
    steps_per_epoch = math.ceil(len(train_ids) / cfg["batch_size"])
    steps = cfg["epochs"] * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    stepper = Stepper(optimizer, data.amp.grad_scaler(data.device), scheduler)
    shuffle_rng = np.random.default_rng(seed)

    def train(epoch: int) -> tuple[float, float]:
        return train_epoch(net, data, train_ids, cfg["batch_size"], stepper, shuffle_rng,
                           step=(epoch - 1) * steps_per_epoch, total_steps=steps)

    def validate() -> tuple[float | None, float]:
        outputs, loss = predict(net, data, val["slide_id"].tolist(), cfg["batch_size"])
        return data.task.score(_with_outputs(val, outputs)), loss

    loop = Loop(train, validate, cfg["epochs"], cfg["patience"], desc, selection=cfg["selection"])
    return fit_epochs(net, loop, data.task.can_select(val))


def _with_outputs(slides: pd.DataFrame, outputs: pd.DataFrame) -> pd.DataFrame:
    return slides.assign(**{c: outputs[c].to_numpy() for c in outputs.columns})


# --------------------------------------------------------------------------- stage


@dataclass(frozen=True)
class Recipe:
    """What is trained, as a training rule's params give it: the registered model, its keyword arguments,
    the training settings (``slidemil.config.Training``; missing keys take the defaults) and the seed."""

    model: str
    model_kwargs: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    seed: int = Config.seed


@dataclass
class Trained:
    """What ``train_bags`` returns: the best checkpoint loaded into ``net``, and its predictions."""

    net: torch.nn.Module
    best: Selection
    history: list[dict]
    slides: pd.DataFrame  # val and test slides: slide_id, patient_id, label, partition, the task's outputs
    norm: tuple[torch.Tensor, torch.Tensor] | None
    in_dim: int
    cfg: dict  # the recipe's training settings, completed with the defaults
    task: Task
    recipe: Recipe


def train_bags(
    bags: dict[str, torch.Tensor],
    split: pd.DataFrame,
    recipe: Recipe,
    device: str = "auto",
    desc: str | None = None,
    init_state: dict | None = None,
    init_source: str | None = None,
    task: Task | None = None,
) -> Trained:
    """Train ``recipe`` on in-memory bags; the core of ``train_fold``, usable without files.

    ``bags`` maps slide_id to a feature tensor [N, D] (not modified); ``split``
    has one row per slide: slide_id, patient_id, label (0/1), partition
    (train/val/test). Slides of ``split`` missing from ``bags`` are an error.
    ``init_state`` is a checkpoint dict (as ``checkpoint`` makes and model.pt
    holds) that models built on a baseline (MHIM-MIL) start from; the model
    takes it through its ``init_from_checkpoint`` method, and features are then
    standardised with the checkpoint's statistics, the ones its weights were
    trained on. ``init_source`` names it in errors. ``task``: the endpoint (slidemil.tasks; default binary):
    its head size, targets, loss and validation metric; survival splits carry a ``time`` column.
    """
    cfg = resolve_training(recipe.training)
    model, model_kwargs, seed = recipe.model, dict(recipe.model_kwargs or {}), recipe.seed
    reserved = sorted({"in_dim", "n_classes"} & set(model_kwargs))
    if reserved:
        raise ValueError(f"model_kwargs must not set {', '.join(reserved)}: they come from the data")
    dev = resolve_device(device)
    warn_if_bf16_emulated(dev, cfg["precision"], "training.precision")
    missing = sorted(set(split["slide_id"]) - set(bags))
    if missing:
        raise ValueError(f"no bag for slide(s) {', '.join(missing[:20])}")
    ids = {p: split.loc[split["partition"] == p, "slide_id"].tolist() for p in ("train", "val", "test")}
    for part in ("train", "val"):
        if not ids[part]:
            raise ValueError(f"{desc or model}: no {part} slide")
    bags = {s: bags[s] for s in split["slide_id"]}
    in_dim = next(iter(bags.values())).shape[1]

    task = task or make_task(BINARY, class_weighted=cfg["class_weighted"])
    torch.manual_seed(seed)
    net = create_model(model, in_dim=in_dim, n_classes=task.head_size, **model_kwargs)
    norm = _start_from(net, model, init_state, init_source, in_dim, cfg["standardize"])
    if norm is None and cfg["standardize"] and init_state is None:
        norm = feature_stats(bags, ids["train"])

    task.fit(split[split["partition"] == "train"])
    data = Data(bags, task.targets(split), task.to(dev), dev, norm, cfg["precision"])

    net = net.to(dev)
    val = split[split["partition"] == "val"]
    best, history = fit(net, data, ids["train"], val, cfg, seed, desc=desc or model)
    net.load_state_dict(best.state)
    slides = _final_predictions(net, data, split, cfg["batch_size"])
    return Trained(net, best, history, slides, norm, in_dim, cfg, task, recipe)


def train_fold(
    features: dict[str, str],
    splits_csv: str,
    fold: int,
    recipe: Recipe,
    out_dir: str,
    device: str = "auto",
    num_threads: int | None = None,
    init_checkpoint: str | None = None,
) -> dict:
    """Train ``recipe`` on fold ``fold`` and write its checkpoint, history and predictions.

    ``features`` maps slide_id to its HDF5 feature file. Returns a summary dict.
    ``init_checkpoint``: the model.pt a model that starts from another one (MHIM-MIL:
    its baseline trained on the same fold) is initialised from; features are then
    standardised with that checkpoint's statistics, the ones its weights were trained on.
    """
    started = time.monotonic()
    if num_threads:
        torch.set_num_threads(num_threads)
    cfg = resolve_training(recipe.training)
    bags, split, skipped, task = _load_fold(features, splits_csv, fold, cfg, recipe.seed)
    n = split["partition"].value_counts()
    logger.info(
        "fold %d: %d train, %d val, %d test slides (%d skipped without tiles); in_dim %d; device %s",
        fold, n.get("train", 0), n.get("val", 0), n.get("test", 0), len(skipped),
        next(iter(bags.values())).shape[1], resolve_device(device),
    )
    init_state = load_init_checkpoint(init_checkpoint, recipe.model, fold, task.name) if init_checkpoint else None
    run = train_bags(bags, split, recipe, device, desc=f"{recipe.model} fold {fold}",
                     init_state=init_state, init_source=init_checkpoint, task=task)
    write_outputs(out_dir, checkpoint(run, fold), run.history, run.slides, task.patients(run.slides),
                  metric_column=task.history_column)
    summary = {**_summary(run, fold, split), "skipped_slides": skipped, "device": str(resolve_device(device)),
               "seconds": round(time.monotonic() - started, 2)}
    metric = _summary_metric(task)
    logger.info("fold %d done: best epoch %d, val %s %s, test %s %s", fold, run.best.epoch, metric,
                fmt_metric(run.best.auc), metric, fmt_metric(summary[f"test_{metric}"]))
    return summary


def _load_fold(features: dict[str, str], splits_csv: str, fold: int, cfg: dict, seed: int):
    """The fold's bags, its split over the slides that have tiles, the slides skipped without, and the task."""
    split = read_fold(splits_csv, fold)
    task_name, class_names = split_task(read_splits(splits_csv), splits_csv)
    task = make_task(task_name, class_names, cfg["class_weighted"])
    bags, skipped = load_bags(split["slide_id"].tolist(), features, cfg["max_tiles"], seed)
    split = split[split["slide_id"].isin(bags)].reset_index(drop=True)
    for part in ("train", "val"):
        if not (split["partition"] == part).any():
            raise ValueError(f"fold {fold}: no {part} slide has tiles")
    return bags, split, skipped, task


def _summary_metric(task: Task) -> str:
    return "auc" if task.name == BINARY else task.metric  # binary keeps its summary keys


def _summary(run: Trained, fold: int, split: pd.DataFrame) -> dict:
    """What ``train_fold`` returns of a trained run: the selected epoch and its validation and test scores."""
    metric = _summary_metric(run.task)
    test = run.slides[run.slides["partition"] == "test"]
    return {
        "model": run.recipe.model,
        "fold": fold,
        "seed": run.recipe.seed,
        "best_epoch": run.best.epoch,
        "epochs_run": len(run.history),
        f"val_{metric}": run.best.auc,
        "val_loss": run.best.loss,
        f"test_{metric}": run.task.score(test) if len(test) else None,
        "n_slides": {p: int((split["partition"] == p).sum()) for p in ("train", "val", "test")},
    }


def load_init_checkpoint(path: str, model: str, fold: int, task: str = BINARY) -> dict:
    """Read the model.pt a model starts from (MHIM-MIL: its baseline on the same fold, for the same task)."""
    try:
        ckpt = read_checkpoint(path, required=("state_dict", "model", "in_dim"))
    except FileNotFoundError:
        raise ValueError(f"{path}: initial checkpoint for {model!r} not found") from None
    if ckpt.get("task", BINARY) != task:
        raise ValueError(f"{path}: trained for task {ckpt.get('task', BINARY)}, not {task}")
    if ckpt.get("fold") is not None and ckpt["fold"] != fold:
        raise ValueError(f"{path}: trained on fold {ckpt['fold']}, not fold {fold}; its weights may have been fitted on this fold's validation or test slides")
    return ckpt


def _start_from(net, model: str, ckpt: dict | None, source: str | None, in_dim: int, standardize: bool):
    """Initialise ``net`` from ``ckpt`` if the model starts from one; returns the checkpoint's feature statistics."""
    source = source or "initial checkpoint"
    if not getattr(net, "needs_init_checkpoint", False):
        if ckpt is not None:
            raise ValueError(f"model {model!r} does not start from a checkpoint, but {source} was given")
        return None
    if ckpt is None:
        raise ValueError(
            f"model {model!r} starts from its baseline trained on the same fold: "
            "pass init_checkpoint (that baseline's model.pt for this fold)"
        )
    if ckpt["in_dim"] != in_dim:
        raise ValueError(f"{source}: trained on {ckpt['in_dim']}-d features, but these features are {in_dim}-d")
    net.init_from_checkpoint(ckpt, source=source)
    logger.info("%s initialised from %s (%s, epoch %s)", model, source, ckpt["model"], ckpt.get("epoch"))
    trained_standardized = ckpt.get("feature_mean") is not None
    if trained_standardized != standardize:
        logger.warning(
            "%s: training.standardize is %s but %s was trained %s standardisation; following the checkpoint",
            model, standardize, source, "with" if trained_standardized else "without",
        )
    return (ckpt["feature_mean"].float(), ckpt["feature_std"].float()) if trained_standardized else None


def _final_predictions(net, data: Data, split: pd.DataFrame, batch_size: int) -> pd.DataFrame:
    task = data.task
    # Survival: the training slides' risks too, whose median splits the test patients' Kaplan-Meier curves.
    parts = ["train", "val", "test"] if task.name == "survival" else ["val", "test"]
    slides = split[split["partition"].isin(parts)].reset_index(drop=True)
    outputs, _ = predict(net, data, slides["slide_id"].tolist(), batch_size)
    columns = ["slide_id", "patient_id", "label", *task.extra_columns, "partition", *task.output_columns]
    return _with_outputs(slides, outputs)[columns]


def checkpoint(run: Trained, fold: int) -> dict:
    """The model.pt content of a trained run."""
    return {
        "state_dict": run.best.state,
        "model": run.recipe.model,
        "model_kwargs": dict(run.recipe.model_kwargs or {}),
        "in_dim": run.in_dim,
        "n_classes": run.task.head_size,
        **run.task.state(),
        "epoch": run.best.epoch,
        "val_auc": run.best.auc,
        "training": run.cfg,
        "seed": run.recipe.seed,
        "fold": fold,
        # Features must be standardised with these before the model sees them.
        "feature_mean": None if run.norm is None else run.norm[0],
        "feature_std": None if run.norm is None else run.norm[1],
    }


# --------------------------------------------------------------------------- CLI


def _parse_args(argv=None, prog: str = "python -m slidemil.mil.train") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train one MIL model on one fold; writes model.pt, history.csv and predictions.",
    )
    parser.add_argument("--features-dir", required=True, help="folder of feature files named {slide_id}.h5")
    parser.add_argument("--splits", required=True, help="splits CSV (slide_id, patient_id, label, fold_0..)")
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--model", required=True, help="registered MIL model name, e.g. abmil")
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help="model keyword arguments as JSON")
    parser.add_argument("--training", type=json.loads, default={},
                        help=f"training settings as JSON; defaults: {json.dumps(DEFAULT_TRAINING)}")
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default=Compute.device, help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--init-checkpoint", default=None,
                        help="model.pt to start from (MHIM-MIL models: the baseline trained on the same fold)")
    parser.add_argument("--log", default=None, help="log file (default: stderr)")
    return parser.parse_args(argv)


def main(argv=None, prog: str = "python -m slidemil.mil.train") -> None:
    from slidemil.logs import setup_logging

    args = _parse_args(argv, prog)
    setup_logging(args.log)
    features = {p.stem: str(p) for p in sorted(Path(args.features_dir).glob("*.h5"))}
    recipe = Recipe(args.model, args.model_kwargs, args.training, args.seed)
    summary = train_fold(features, args.splits, args.fold, recipe, args.out, device=args.device,
                         num_threads=args.num_threads, init_checkpoint=args.init_checkpoint)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
