"""Local weights files: which files hold an extractor's weights, and their sha256.

An extractor's ``weights`` setting is a name (``imagenet``, ``random``, ``simclr``) or a local path: one file
(.safetensors, .bin, .pth, .pt) or a Hugging Face snapshot folder. The workflow makes these files inputs of
feature extraction (replacing a file at the same path reruns it) and every feature file records their sha256,
the same digest Hugging Face lists for each file. Light (no torch): the DAG uses it.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from slidemil.names import ENCODER_CARDS, SIMCLR_WEIGHTS

NAMED_WEIGHTS = ("imagenet", "random", SIMCLR_WEIGHTS)
# In the order a snapshot folder's files are preferred: safetensors when a folder has both.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def is_local(weights: str | None) -> bool:
    """Whether ``weights`` names a local file or folder (not imagenet, random or simclr)."""
    return bool(weights) and str(weights) not in NAMED_WEIGHTS


def weights_files(weights: str) -> list[str]:
    """The files whose content is the weights: the file itself, or a snapshot folder's weight files (all shards
    of the first suffix of WEIGHT_SUFFIXES it holds); [] for a folder without any."""
    path = Path(weights)
    if not path.is_dir():
        return [str(path)]
    for suffix in WEIGHT_SUFFIXES:
        found = sorted(str(p) for p in path.iterdir() if p.suffix == suffix and p.is_file())
        if found:
            return found
    return []


def _file_sha256(path: str) -> str:
    stat = Path(path).stat()
    return _sha256_of(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _sha256_of(path: str, mtime_ns: int, size: int) -> str:
    """Hashed once per process and file version: a giant's 4.5 GB take seconds."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(weights: str) -> str:
    """sha256 of the weights file (what ``sha256sum`` prints); of a sharded folder, sha256 of its
    "name sha256" lines."""
    files = weights_files(weights)
    if len(files) == 1:
        return _file_sha256(files[0])
    lines = "".join(f"{Path(f).name} {_file_sha256(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def missing_weights(extractor: str, weights: str) -> str | None:
    """One line saying what is missing and where to get it, or None when the weights are there."""
    if weights_files(weights) and all(Path(f).is_file() for f in weights_files(weights)):
        return None
    what = "no weights file (.safetensors, .bin, .pth, .pt) in folder" if Path(weights).is_dir() else "not found:"
    card = ENCODER_CARDS.get(extractor)
    where = (f"; copy {card.files} from {card.card} (the model card; weights are never downloaded) and set "
             f"features.settings.{extractor}.weights to it" if card else "")
    return f"weights of {extractor}: {what} {weights}{where}"
