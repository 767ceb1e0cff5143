"""Attention heatmaps: a trained MIL model's per-tile attention drawn over its slide.

The checkpoint written by the training stage is enough to rebuild the model
(``model``, ``model_kwargs``, ``in_dim``, ``state_dict``); the slide's features
are standardised with the checkpoint's ``feature_mean``/``feature_std`` exactly
as in training, and the attention is the ``attention`` output of the model's
own forward pass over the whole bag (for MHIM-MIL checkpoints, which hold the
student, that is the student's attention). Models without instance attention
(max pooling) return None and get no heatmap. The attention map does not depend on the task; the title gives the
bag's score as its task (slidemil.tasks' ``bag_summary``) says it: P(positive), the predicted class and its
probability, the risk, or the predicted value in the target's units.

Colours are attention *percentiles* within the slide (as CLAM draws them):
raw attention sums to one over thousands of tiles, so its scale says little,
while its ranking is what a reader compares with the tissue.

Command line::

    python -m slidemil.report.heatmap --slide S.svs --tiles T.h5 --features F.h5 \\
        --checkpoint model.pt --out heat.png [--top-k 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless cluster nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from scipy.stats import rankdata  # noqa: E402

from slidemil.runtime import resolve_device  # noqa: E402
from slidemil.files import save_png  # noqa: E402
from slidemil.files.checkpoint import read_checkpoint  # noqa: E402
from slidemil.files.features import read_features  # noqa: E402
from slidemil.files.tiles import read_tiles  # noqa: E402
from slidemil.errors import CheckpointError  # noqa: E402
from slidemil.mil.models import create_model  # noqa: E402
from slidemil.slides.reader import open_slide, read_rgb, resize_tile  # noqa: E402
from slidemil.tasks import task_from_checkpoint  # noqa: E402

logger = logging.getLogger(__name__)

CHECKPOINT_KEYS = ("model", "model_kwargs", "in_dim", "state_dict")
COLORMAP = "jet"
THUMB_MAX_PX = 1024
CROP_PX = 192


# --------------------------------------------------------------------------- model


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """The model of a MIL training checkpoint (``slidemil.files.checkpoint``), in eval mode, and the checkpoint dict."""
    ckpt = read_checkpoint(path, required=CHECKPOINT_KEYS)
    model = create_model(ckpt["model"], in_dim=int(ckpt["in_dim"]), n_classes=int(ckpt.get("n_classes", 2)),
                         **dict(ckpt["model_kwargs"] or {}))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit model {ckpt['model']!r} ({err})") from err
    return model.to(device).eval(), ckpt


@torch.inference_mode()
def bag_forward(
    model: torch.nn.Module, ckpt: dict, features: np.ndarray, device: str | torch.device = "cpu"
) -> tuple[np.ndarray | None, np.ndarray]:
    """Attention of every tile ([N], or None for a model without attention) and the bag's outputs, the row its
    task (slidemil.tasks, as the checkpoint records it) writes to the predictions."""
    if features.ndim != 2 or features.shape[1] != int(ckpt["in_dim"]):
        raise ValueError(f"features of shape {features.shape} do not match the model's in_dim {ckpt['in_dim']}")
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    if ckpt.get("feature_mean") is not None:
        x = (x - ckpt["feature_mean"].float()) / ckpt["feature_std"].float()
    out = model(x[None].to(device), None)
    outputs = task_from_checkpoint(ckpt).outputs(out["logits"])[0]
    attention = out.get("attention")
    if attention is None:
        return None, outputs
    attention = attention.float()[0]
    if attention.ndim == 2:
        # Multi-head attention [H, N]: the heads' mean, as a single map.
        attention = attention.mean(0)
    return attention.cpu().numpy().astype(np.float64), outputs


def tile_attention(
    model: torch.nn.Module, ckpt: dict, features: np.ndarray, device: str | torch.device = "cpu"
) -> tuple[np.ndarray | None, float]:
    """Attention of every tile (or None) and the bag's score (binary: P(class 1); slidemil.tasks' bag_summary)."""
    attention, outputs = bag_forward(model, ckpt, features, device)
    return attention, task_from_checkpoint(ckpt).bag_summary(outputs)[0]


def attention_percentiles(attention: np.ndarray) -> np.ndarray:
    """Rank of each tile's attention within the slide, in (0, 1]; ties share their mean rank."""
    return rankdata(attention) / len(attention)


# --------------------------------------------------------------------------- drawing


def attention_canvas(coords: np.ndarray, tile_size_level0: int, values: np.ndarray,
                     shape: tuple[int, int], scale: float) -> np.ndarray:
    """A float image of ``shape`` (h, w) with each tile's value over its footprint, NaN elsewhere.

    ``coords`` are level-0 top-left corners; ``scale`` maps level-0 pixels to
    canvas pixels. Tile edges are rounded so neighbouring tiles meet without
    gaps or overlap.
    """
    canvas = np.full(shape, np.nan, dtype=np.float32)
    h, w = shape
    x0 = np.clip(np.round(coords[:, 0] * scale).astype(int), 0, w)
    y0 = np.clip(np.round(coords[:, 1] * scale).astype(int), 0, h)
    x1 = np.clip(np.round((coords[:, 0] + tile_size_level0) * scale).astype(int), 0, w)
    y1 = np.clip(np.round((coords[:, 1] + tile_size_level0) * scale).astype(int), 0, h)
    for i in range(len(coords)):
        canvas[y0[i]:max(y1[i], y0[i] + 1), x0[i]:max(x1[i], x0[i] + 1)] = values[i]
    return canvas


def overlay(thumb: np.ndarray, canvas: np.ndarray, alpha: float = 0.5, cmap: str = COLORMAP) -> np.ndarray:
    """RGB uint8: the colour-mapped canvas blended over the thumbnail where tiles are."""
    colors = colormaps[cmap](np.nan_to_num(canvas, nan=0.0))[..., :3] * 255
    out = thumb.astype(np.float32)
    where = ~np.isnan(canvas)
    out[where] = (1 - alpha) * out[where] + alpha * colors[where]
    return out.round().clip(0, 255).astype(np.uint8)


def _thumbnail(slide, slide_path, max_px: int) -> tuple[np.ndarray, float]:
    """RGB thumbnail with its longer side at most ``max_px``, and its level-0 -> thumbnail scale."""
    import cv2

    w0, h0 = slide.dimensions
    downsample = max(w0, h0) / max_px if max(w0, h0) > max_px else 1.0
    level = slide.get_best_level_for_downsample(downsample)
    lw, lh = slide.level_dimensions[level]
    img = read_rgb(slide, slide_path, (0, 0), level, (lw, lh))
    size = (max(1, round(w0 / downsample)), max(1, round(h0 / downsample)))
    if (lw, lh) != size:
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return img, size[0] / w0


def _tile_crop(slide, slide_path, xy, level: int, read_px: int, size0: int) -> np.ndarray:
    """The tile as the feature extractor saw it: ``read_px`` pixels at ``level``, resized to CROP_PX."""
    if level >= slide.level_count:
        level, read_px = 0, size0
    tile = read_rgb(slide, slide_path, (int(xy[0]), int(xy[1])), level, (read_px, read_px))
    return resize_tile(tile, CROP_PX)


@dataclass
class Heatmap:
    slide_id: str
    model: str
    score: float  # the task's score of the bag (slidemil.tasks' bag_summary; binary: P(positive))
    prediction: str  # the score in words, as the title gives it
    n_tiles: int
    top: list[dict] = field(default_factory=list)  # rank, x, y (level 0), attention, percentile
    png: str | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _tile_geometry(tile_attrs: dict, feature_attrs: dict) -> tuple[int, int, int]:
    """(tile_size_level0, level, read_px), from the tiles file, else the feature file."""
    attrs = {**feature_attrs, **tile_attrs}
    if "tile_size_level0" not in attrs:
        raise ValueError("neither the tiles nor the features file records tile_size_level0")
    size0 = int(attrs["tile_size_level0"])
    level = int(attrs.get("level", 0))
    read_px = int(attrs.get("read_px", size0))
    return size0, level, read_px


@dataclass(frozen=True)
class HeatmapSettings:
    """How :func:`make_heatmap` draws, the same for every slide of a run."""

    top_k: int = 8  # most attended tiles shown as crops
    device: str = "cpu"  # auto (cuda if available), cpu, cuda


@dataclass(frozen=True)
class _Panels:
    """What :func:`_draw` shows: the thumbnail with its attention canvas (``scale``: level-0 -> thumbnail
    pixels) and the top tiles: their crops, their rows of ``Heatmap.top`` and level-0 corners, ``size0`` wide."""

    thumb: np.ndarray
    canvas: np.ndarray
    scale: float
    crops: list[np.ndarray]
    top: list[dict]
    top_coords: np.ndarray
    size0: int


def make_heatmap(
    slide_path: str | os.PathLike,
    features_h5: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out_png: str | os.PathLike,
    tiles_h5: str | os.PathLike | None = None,
    slide_id: str | None = None,
    label: int | str | float | None = None,
    settings: HeatmapSettings | None = None,
) -> Heatmap:
    """Draw the model's attention over the slide thumbnail, with its ``settings.top_k`` tiles as crops.

    Writes ``out_png`` unless the model has no attention (then ``png`` is None
    and ``note`` says why). Returns what was drawn, top tiles included.
    """
    settings = settings or HeatmapSettings()
    slide_id = slide_id or Path(slide_path).name.split(".")[0]
    open_slide(slide_path).close()  # a wrong slide path fails at once, not after the model has run
    device = resolve_device(settings.device)
    model, ckpt = load_checkpoint(checkpoint, device)
    features, coords, attrs = _read_bag(features_h5, tiles_h5, slide_id)
    attention, outputs = bag_forward(model, ckpt, features, device)
    score, words = task_from_checkpoint(ckpt).bag_summary(outputs)
    result = Heatmap(slide_id=slide_id, model=str(ckpt["model"]), score=score, prediction=words,
                     n_tiles=len(features))
    if attention is None:
        result.note = f"model {ckpt['model']!r} has no instance attention (its forward returns attention None)"
        logger.info("%s: %s; no heatmap", slide_id, result.note)
        return result

    geometry = _tile_geometry(*attrs)
    percent = attention_percentiles(attention)
    order = np.argsort(-attention, kind="stable")[: max(0, settings.top_k)]
    result.top = [
        {"rank": r + 1, "x": int(coords[i, 0]), "y": int(coords[i, 1]),
         "attention": float(attention[i]), "percentile": float(percent[i])}
        for r, i in enumerate(order)
    ]
    panels = _panels(slide_path, coords, percent, order, result.top, geometry)
    title = f"{slide_id}: {ckpt['model']} (fold {ckpt.get('fold', '?')}), {words}"
    if label is not None:
        title += f", label {label}"
    _draw(panels, title, out_png)
    result.png = str(out_png)
    logger.info("%s: heatmap of %d tiles -> %s", slide_id, len(features), out_png)
    return result


def _read_bag(features_h5, tiles_h5, slide_id: str) -> tuple[np.ndarray, np.ndarray, tuple[dict, dict]]:
    """The slide's features, their level-0 coordinates and (tiles file attrs, features file attrs); the tiles
    file, when given, must list the same coordinates."""
    data, feature_attrs = read_features(features_h5, ("features", "coords"))
    features, coords = data["features"], data["coords"].astype(np.int64)
    tile_attrs = {}
    if tiles_h5 is not None:
        tile_coords, tile_attrs = read_tiles(tiles_h5)
        if not np.array_equal(tile_coords, coords):
            raise ValueError(f"{features_h5}: tile coordinates differ from those in {tiles_h5}")
    if len(features) == 0:
        raise ValueError(f"{features_h5}: slide {slide_id} has no tiles, so there is no attention to draw")
    return features, coords, (tile_attrs, feature_attrs)


def _panels(slide_path, coords: np.ndarray, percent: np.ndarray, order: np.ndarray, top: list[dict],
            geometry: tuple[int, int, int]) -> _Panels:
    """Read the thumbnail and the ``order`` tiles' crops from the slide; paint the percentiles on a canvas."""
    size0, level, read_px = geometry
    slide = open_slide(slide_path)
    try:
        thumb, scale = _thumbnail(slide, slide_path, THUMB_MAX_PX)
        canvas = attention_canvas(coords, size0, percent, thumb.shape[:2], scale)
        crops = [_tile_crop(slide, slide_path, coords[i], level, read_px, size0) for i in order]
    finally:
        slide.close()
    return _Panels(thumb, canvas, scale, crops, top, coords[order], size0)


def _draw(panels: _Panels, title: str, out_png) -> None:
    h, w = panels.thumb.shape[:2]
    n_crops = len(panels.crops)
    per_row = min(max(n_crops, 1), 8)
    crop_rows = math.ceil(n_crops / per_row) if n_crops else 0
    map_w_in = 6.0
    map_h_in = map_w_in * h / w
    fig_h = map_h_in + 0.9 + crop_rows * (12.0 / per_row + 0.35)
    fig = plt.figure(figsize=(12.6, fig_h), dpi=100)
    try:
        grid = fig.add_gridspec(1 + crop_rows, per_row,
                                height_ratios=[map_h_in] + [12.0 / per_row + 0.35] * crop_rows)
        half = per_row // 2
        ax_raw = fig.add_subplot(grid[0, :half])
        ax_map = fig.add_subplot(grid[0, half:])
        ax_raw.imshow(panels.thumb)
        ax_raw.set_title("slide", fontsize=10)
        _draw_map(fig, ax_map, panels)
        for ax in (ax_raw, ax_map):
            ax.set_xticks([])
            ax.set_yticks([])
        for k, (crop, item) in enumerate(zip(panels.crops, panels.top)):
            ax = fig.add_subplot(grid[1 + k // per_row, k % per_row])
            ax.imshow(crop)
            ax.set_title(f"#{item['rank']}  a={item['attention']:.2g}", fontsize=8)
            ax.axis("off")
        fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        save_png(fig, out_png)
    finally:
        plt.close(fig)


def _draw_map(fig, ax_map, panels: _Panels) -> None:
    """The attention overlay on ``ax_map``, each top tile boxed and numbered by its rank, with a colour bar."""
    scale, side = panels.scale, panels.size0 * panels.scale
    ax_map.imshow(overlay(panels.thumb, panels.canvas))
    ax_map.set_title("attention (percentile within slide)", fontsize=10)
    for item, xy in zip(panels.top, panels.top_coords):
        x, y = xy[0] * scale, xy[1] * scale
        ax_map.add_patch(Rectangle((x, y), side, side, fill=False, lw=1.2, ec="white"))
        ax_map.text(x, y, str(item["rank"]), color="white", fontsize=7, va="bottom", ha="left",
                    bbox={"boxstyle": "square,pad=0.1", "fc": "black", "ec": "none", "alpha": 0.6})
    # The drawn image is RGB, so the colour bar gets its own mappable of the same map.
    sm = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap=COLORMAP)
    fig.colorbar(sm, ax=ax_map, fraction=0.046, pad=0.02, label="attention percentile")


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None, prog: str = "python -m slidemil.report.heatmap") -> int:
    from slidemil.errors import USER_ERRORS, command_line_message
    from slidemil.logs import setup_logging

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Draw a trained MIL model's tile attention over a slide, with its most attended tiles.",
    )
    parser.add_argument("--slide", required=True, help="the slide (any format OpenSlide opens)")
    parser.add_argument("--tiles", help="tiles HDF5 of the tiling stage (checks the coordinates)")
    parser.add_argument("--features", required=True, help="features HDF5 of the slide (same extractor as the model)")
    parser.add_argument("--checkpoint", required=True, help="model.pt written by the training stage")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--top-k", type=int, default=8, help="most attended tiles shown as crops (default 8)")
    parser.add_argument("--slide-id", help="name in the title (default: the slide's file name)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        result = make_heatmap(args.slide, args.features, args.checkpoint, args.out, tiles_h5=args.tiles,
                              slide_id=args.slide_id, settings=HeatmapSettings(top_k=args.top_k, device=args.device))
    except (*USER_ERRORS, ValueError) as err:
        raise SystemExit(f"error: {command_line_message(err)}")
    print(json.dumps(result.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
