"""tiles.h5, the tiling's output: dataset ``coords`` [N, 2] (level-0 x, y of each kept tile) and the
tiling's attributes (slide_id, slide_path, level, tile_px, read_px, tile_size_level0, target_mpp, excluded, ...).

Written by ``slidemil.tiling.tile``; read by feature extraction, the tile pool of the pixel stages, the
manifests and the heatmaps, all through ``read_tiles``.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from slidemil.files import FORMAT_VERSION, check_format, open_h5, read_h5, write_h5

VERSION = 1
WHAT = "tiles file"


def write_tiles(path: str | os.PathLike, coords: np.ndarray, attrs: Mapping) -> None:
    write_h5(path, {"coords": np.asarray(coords).reshape(-1, 2)}, {**attrs, FORMAT_VERSION: VERSION})


def read_tiles(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """(coords [N, 2], attributes) of a tiles file."""
    data, attrs = read_h5(path, ("coords",), WHAT)
    check_format(attrs.get(FORMAT_VERSION), VERSION, path, WHAT)
    return data["coords"], attrs


def read_tiles_attrs(path: str | os.PathLike) -> tuple[int, dict]:
    """(number of tiles, attributes) without reading the coordinates."""
    with open_h5(path, WHAT) as f:
        n = int(f["coords"].shape[0]) if "coords" in f else 0
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    check_format(attrs.get(FORMAT_VERSION), VERSION, path, WHAT)
    return n, attrs
