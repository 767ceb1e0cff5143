"""Tiles drawn from many slides and read on the fly, for the stages that train on pixels.

SimCLR pre-training and the tile-supervised baseline both sample a fixed subset
of each slide's tiles (from the seed and the slide id alone, as the MIL bags
are), read them through the tiling coordinates and augment them. Random
augmentations are seeded per (seed, epoch, item), so a tile's views depend
neither on the number of loader workers nor on whether a run was resumed.
"""

from __future__ import annotations

import collections
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from slidemil.config import Compute, Config, Simclr, TileSupervised, resolve
from slidemil.slides.reader import open_slide, read_rgb, resize_tile
from slidemil.files.tiles import read_tiles
from slidemil.training import subsample_indices

logger = logging.getLogger(__name__)

STAGE_SETTINGS = {"simclr": Simclr, "tile_supervised": TileSupervised}

# Open slides kept per worker: enough that a shuffled epoch rarely reopens one, few enough for the fd limit.
MAX_OPEN_SLIDES = 64


@dataclass(frozen=True)
class SlideTiles:
    """The tiles of one slide that a stage uses: level-0 coordinates and how to read them."""

    slide_id: str
    slide_path: str
    coords: np.ndarray  # [N, 2] level-0 x, y
    level: int
    read_px: int


def sample_slide_tiles(slide_id: str, slide_path: str, tiles_h5: str, max_tiles: int | None, seed: int) -> SlideTiles:
    """At most ``max_tiles`` of a slide's tiles, the same subset for every run with this seed."""
    coords, attrs = read_tiles(tiles_h5)
    coords = np.asarray(coords).reshape(-1, 2)
    keep = subsample_indices(len(coords), max_tiles, seed, slide_id)
    if keep is not None:
        coords = coords[keep]
    level = int(attrs["level"]) if len(coords) else 0
    read_px = int(attrs["read_px"]) if len(coords) else 0
    return SlideTiles(slide_id, str(slide_path), coords, level, read_px)


def item_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


class TilePool(Dataset):
    """Item ``i`` -> ``(transform(tile), i)``; the tile is uint8 CHW at ``resize_px`` (or as read).

    ``transform`` runs under its own torch seed derived from (seed, epoch, i),
    with the global RNG of the calling process left untouched. Each DataLoader
    worker opens its own slide handles.
    """

    def __init__(self, slides: list[SlideTiles], transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 seed: int = 0, resize_px: int | None = None):
        self.slides = [s for s in slides if len(s.coords)]
        self.transform, self.seed, self.resize_px = transform, seed, resize_px
        self.epoch = 0
        self.slide_index = np.concatenate(
            [np.full(len(s.coords), k, dtype=np.int64) for k, s in enumerate(self.slides)] or [np.zeros(0, np.int64)])
        self.row = np.concatenate([np.arange(len(s.coords)) for s in self.slides] or [np.zeros(0, np.int64)])
        self._handles: collections.OrderedDict = collections.OrderedDict()

    @property
    def slide_ids(self) -> list[str]:
        return [s.slide_id for s in self.slides]

    def item_slide_ids(self) -> list[str]:
        """The slide of every item, in item order."""
        return [self.slides[k].slide_id for k in self.slide_index]

    def __len__(self) -> int:
        return len(self.row)

    def __getstate__(self):
        # Handles never travel to workers: each worker opens its own.
        return {**self.__dict__, "_handles": collections.OrderedDict()}

    def _slide(self, path: str):
        handle = self._handles.pop(path, None) or open_slide(path)
        self._handles[path] = handle
        while len(self._handles) > MAX_OPEN_SLIDES:
            self._handles.popitem(last=False)[1].close()
        return handle

    def read(self, i: int) -> torch.Tensor:
        s = self.slides[self.slide_index[i]]
        x, y = (int(v) for v in s.coords[self.row[i]])
        tile = read_rgb(self._slide(s.slide_path), s.slide_path, (x, y), s.level, (s.read_px, s.read_px))
        if self.resize_px:
            tile = resize_tile(tile, self.resize_px)
        return torch.from_numpy(np.ascontiguousarray(tile.transpose(2, 0, 1)))

    def __getitem__(self, i: int):
        tile = self.read(i)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed(self.seed, self.epoch, i))
                tile = self.transform(tile)
        return tile, i


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffling order of an epoch, from the seed and the epoch alone (so a resumed run matches)."""
    return torch.Generator().manual_seed(item_seed(seed, epoch, -1 % 2**32))


def normalizer(device: torch.device):
    """uint8 [B, 3, H, W] -> float, ImageNet-normalised, channels-last, as the extractors expect."""
    from slidemil.features.extractors import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    def normalize(batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(device, non_blocking=True).float().sub_(mean).div_(std)
        return x.contiguous(memory_format=torch.channels_last)

    return normalize


# --------------------------------------------------------------------------- shared settings and CLI of the pixel stages


def merge_settings(stage: str, settings: dict | None, defaults: dict | None = None, positive: tuple[str, ...] = (),
                   optional_positive: tuple[str, ...] = (), floats: tuple[str, ...] = ()) -> dict:
    """``settings`` of a pixel stage (simclr, tile_supervised) checked and completed by slidemil.config,
    which holds their defaults and rules; the other arguments are those of the former signature, unused."""
    return resolve(STAGE_SETTINGS[stage], settings, stage)


def add_cli_arguments(ap, defaults: dict) -> None:
    """Arguments every stage that trains on tiles takes (simclr, tile_supervised)."""
    ap.add_argument("--sheet", required=True, help="sample sheet (slide_id, path, ...)")
    ap.add_argument("--tiles-dir", required=True, help="folder of tiling outputs named {slide_id}.h5")
    ap.add_argument("--splits", required=True, help="splits CSV; slides that are test in any fold are never read")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--settings", type=json.loads, default={}, help=f"settings as JSON; defaults: {json.dumps(defaults)}")
    ap.add_argument("--seed", type=int, default=Config.seed)
    ap.add_argument("--device", default=Compute.device)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--num-threads", type=int)
    ap.add_argument("--log")


def cli_cohort(args) -> tuple[dict[str, str], dict[str, str]]:
    """(slide_id -> slide file, slide_id -> tiles file) from --sheet and --tiles-dir."""
    from slidemil.cohort.sheet import load_sheet

    sheet = load_sheet(args.sheet)
    slides = dict(zip(sheet["slide_id"], sheet["path"]))
    return slides, {s: str(Path(args.tiles_dir) / f"{s}.h5") for s in slides}

