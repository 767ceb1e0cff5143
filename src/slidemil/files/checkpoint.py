"""model.pt, a trained classifier: a dict saved with ``torch.save``, loadable with ``weights_only``.

Every model.pt holds state_dict (the weights), model (its name), n_classes, epoch (the selected one),
val_auc (the task's validation metric), seed, fold, ``format_version`` and the task's record
(``slidemil.tasks.Task.state``: task, class_names and what its outputs need; older files lack it: binary).
MIL models add model_kwargs, in_dim, training (the resolved settings) and feature_mean / feature_std (None, or
the standardisation the model was trained with); the tile-supervised baseline adds settings and init_digest.

Written by MIL training and the tile-supervised baseline (``write_checkpoint``); read by MIL training
(a model that starts from another one's) and the heatmaps (``read_checkpoint``).
"""

from __future__ import annotations

import os

import torch

from slidemil.errors import CheckpointError
from slidemil.files import FORMAT_VERSION, atomic_output, check_format

VERSION = 1
REQUIRED = ("state_dict", "model")


def write_checkpoint(path: str | os.PathLike, ckpt: dict) -> None:
    with atomic_output(path) as tmp:
        torch.save({**ckpt, FORMAT_VERSION: VERSION}, tmp)


def read_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = REQUIRED) -> dict:
    """The checkpoint dict, on the CPU; CheckpointError if it cannot be read or lacks a ``required`` key."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for unreadable files
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({err})") from err
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a slidemil training checkpoint (missing {', '.join(missing)})")
    try:
        check_format(ckpt.get(FORMAT_VERSION), VERSION, path, "checkpoint")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    return ckpt
