"""tiles.h5, the tiling's output: dataset ``coords`` [N, 2] (level-0 x, y of each kept tile) and the
tiling's attributes (slide_id, slide_path, level, tile_px, read_px, tile_size_level0, target_mpp, excluded, warning:
a colour warning or "", ...), among them the slide's level-0 size and file size (``slide_identity``), so that a
stage given a slide and a tiles file refuses a pair that do not belong together (``check_tiles_slide``).

Written by ``slidemil.tiling.tile``; read by feature extraction, the tile pool of the pixel stages, the
manifests and the heatmaps, all through ``read_tiles``.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from slidemil.errors import SlideError
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


def slide_identity(slide_path: str | os.PathLike, level0_px: tuple[int, int]) -> dict:
    """The tiles file's record of its slide: level-0 width and height in pixels and the file's size in bytes."""
    return {"slide_width_px": int(level0_px[0]), "slide_height_px": int(level0_px[1]),
            "slide_bytes": os.path.getsize(slide_path)}


def check_tiles_slide(tiles_path, attrs: Mapping, slide_path, level0_px: tuple[int, int]) -> None:
    """Raise SlideError when ``slide_path`` is not the slide the tiles file was cut from.

    The path alone does not tell (slides are moved and copied); the size in pixels and bytes does. Files
    written before these attributes existed are not checked.
    """
    recorded = {k: attrs.get(k) for k in ("slide_width_px", "slide_height_px", "slide_bytes")}
    if any(v is None for v in recorded.values()):
        return
    given = slide_identity(slide_path, level0_px)
    if all(int(recorded[k]) == given[k] for k in given):
        return
    raise SlideError(
        f"{tiles_path}: tiles of {attrs.get('slide_path')} ({_size(recorded)}), not of {slide_path} ({_size(given)}); "
        f"tile this slide first (slidemil tiling {slide_path} --out ...) or pass the slide these tiles came from")


def _size(identity: Mapping) -> str:
    return (f"{int(identity['slide_width_px'])} x {int(identity['slide_height_px'])} px, "
            f"{int(identity['slide_bytes'])} bytes")
