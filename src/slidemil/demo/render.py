"""Deterministic synthetic cohort of H&E-like whole-slide images.

The slides are real pyramidal TIFFs in the Aperio SVS layout, so the rest of
the pipeline reads them through OpenSlide exactly as it would read scanner
output. Each slide has white background, several tissue regions, some faint
(washed-out) tissue that a background filter should drop, and the patterns that
carry its target (planned per patient in slidemil.demo.plan): one to three
compact "tumour" lesions (crowded, large, dark nuclei on a purple ground) and
lymphoid aggregates (densely packed small, round, dark nuclei), each covering a
planned share of the tissue tiles. Both shift colour statistics the same way,
so a model has to tell them apart by texture.

Rendering works in optical-density space: haematoxylin and eosin concentration
maps are built with vectorised numpy/cv2 and turned into RGB by Beer-Lambert
absorption of a slightly noisy white illumination. Nothing here loops over
pixels in Python; nuclei are drawn with ``cv2.ellipse`` in loops of a few
thousand.

Every random draw of a slide comes from a generator seeded by
``(seed, slide_id, label)`` (and the planned pattern shares, when given); the
rendering parameters act deterministically, so
one slide can be regenerated alone and comes out byte-identical.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import pandas as pd
import tifffile
from tqdm import tqdm

from slidemil.config import Demo, field_defaults
from slidemil.demo.plan import PATTERN_COLUMNS, SIGNAL_KEYS, plan_cohort, seed_sequence
from slidemil.files import atomic_output, write_csv
from slidemil.names import TASKS

logger = logging.getLogger(__name__)

# The background rule of the tiling stage, repeated here so the generator can
# report (and the tests can check) which tiles count as tissue.
TILE_PX = 256
GRAD_LOW = 20.0  # Sobel magnitude at or below this is "flat"
MAX_FLAT_FRACTION = 0.60  # a tissue tile has fewer flat pixels than this
BRIGHT_GRAY = 240  # gray above this is "bright"
MAX_BRIGHT_FRACTION = 0.50  # a tissue tile has at most this many bright pixels

# A tile "contains tumour texture" when at least this share of it is lesion.
TUMOR_TILE_MIN_FRACTION = 0.25

# Optical density per unit stain concentration, derived from the colour each
# stain gives at concentration 1 (so the palette is easy to reason about).
_HEMATOXYLIN_RGB = (72, 48, 130)
_EOSIN_RGB = (235, 120, 175)
_H_OD = -np.log(np.array(_HEMATOXYLIN_RGB, np.float32) / 255.0)
_E_OD = -np.log(np.array(_EOSIN_RGB, np.float32) / 255.0)

# Coarse grid used for planning tissue and lesions: one coarse pixel is
# _COARSE x _COARSE slide pixels, so a 256-px tile is 16 x 16 coarse pixels.
_COARSE = 16
# Tissue is where the upsampled tissue field exceeds _TISSUE_CUT; the stain
# amount ramps from 0 to 1 as the field goes from 0 to 1 / _EDGE_SHARPNESS.
_EDGE_SHARPNESS = 8.0
_TISSUE_CUT = 0.5 / _EDGE_SHARPNESS
# Stain amount of faint tissue relative to normal tissue.
_FAINT_STAIN = 0.035
# Share of the tissue-free area (away from tissue edges) given to faint tissue.
_FAINT_SHARE = 0.25


# --------------------------------------------------------------------------
# Pyramidal TIFF writer
# --------------------------------------------------------------------------


def write_pyramidal_tiff(
    path: str | os.PathLike,
    rgb: np.ndarray,
    mpp: float | None,
    objective_power: float | None,
    n_levels: int = 3,
    downsample: int = 4,
    tile: int = TILE_PX,
    jpeg_quality: int = 90,
) -> None:
    """Write ``rgb`` (H, W, 3 uint8) as a tiled, JPEG-compressed Aperio-style pyramid.

    OpenSlide recognises the Aperio layout from the first ImageDescription
    ("Aperio ..."), and takes ``openslide.mpp-x/y`` and
    ``openslide.objective-power`` from its ``MPP`` and ``AppMag`` fields; a
    generic tiled TIFF would give mpp from resolution tags but never an
    objective power. With ``mpp=None`` (or ``objective_power=None``) the field
    is left out, giving a slide without that metadata. The resolution tags are
    written too (or left unset) to match, so other readers agree.

    ``photometric='rgb'`` makes tifffile encode JPEG in YCbCr and tag it as
    such, which OpenSlide decodes correctly; passing ``'ycbcr'`` would instead
    declare the RGB input to already be YCbCr and scramble colours.
    """
    rgb = np.ascontiguousarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    if n_levels < 1 or downsample < 2:
        raise ValueError("need n_levels >= 1 and downsample >= 2")
    pyramid = _AperioPyramid(rgb.shape[1], rgb.shape[0], tile, jpeg_quality, mpp, objective_power)
    with atomic_output(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tw:
            for i, level in enumerate(_pyramid_levels(rgb, n_levels, downsample)):
                tw.write(
                    level,
                    tile=(tile, tile),
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": jpeg_quality},
                    metadata=None,  # no tifffile JSON: the description must stay Aperio's
                    **pyramid.level_tags(i, level),
                )


def _pyramid_levels(rgb: np.ndarray, n_levels: int, downsample: int) -> Iterator[np.ndarray]:
    """Yield level 0, then each level ``downsample`` times smaller than the one before (made from it)."""
    level = rgb
    for i in range(n_levels):
        yield level
        if i + 1 < n_levels:
            h, w = level.shape[:2]
            size = (max(1, w // downsample), max(1, h // downsample))
            level = cv2.resize(level, size, interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class _AperioPyramid:
    """What the tags of every pyramid level derive from: the level-0 size, tiling and scanner metadata."""

    level0_width_px: int
    level0_height_px: int
    tile_px: int
    jpeg_quality: int
    mpp: float | None  # microns per pixel at level 0
    objective_power: float | None

    def level_tags(self, i: int, level: np.ndarray) -> dict:
        """tifffile arguments of level ``i`` (pixels ``level``): description, subfile type, resolution."""
        h, w = level.shape[:2]
        tags = {"description": self._description(i, w, h), "subfiletype": 0 if i == 0 else 1}
        if self.mpp is not None:
            level_mpp = self.mpp if i == 0 else self.mpp * self.level0_width_px / w
            per_cm = 1e4 / level_mpp
            tags.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
        return tags

    def _description(self, i: int, width_px: int, height_px: int) -> str:
        # Only level 0 carries the AppMag and MPP fields that OpenSlide reads.
        width, height = self.level0_width_px, self.level0_height_px
        tiling = f"({self.tile_px}x{self.tile_px}) JPEG/RGB Q={self.jpeg_quality}"
        if i > 0:
            return f"Aperio Image Library v12.0.0\r\n{width}x{height} -> {width_px}x{height_px} - {tiling}"
        fields = []
        if self.objective_power is not None:
            fields.append(f"AppMag = {self.objective_power:g}")
        if self.mpp is not None:
            fields.append(f"MPP = {self.mpp:g}")
        return "|".join([f"Aperio Image Library v12.0.0\r\n{width}x{height} [0,0 {width}x{height}] {tiling}", *fields])


# --------------------------------------------------------------------------
# Tile classification (the downstream background rule)
# --------------------------------------------------------------------------


def tile_tissue_mask(rgb: np.ndarray, tile: int = TILE_PX) -> np.ndarray:
    """Boolean (rows, cols) grid: which full ``tile``-sized tiles pass the background rule."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    grad = 0.5 * np.abs(gx) + 0.5 * np.abs(gy)
    flat = _tile_means(grad <= GRAD_LOW, tile)
    bright = _tile_means(gray > BRIGHT_GRAY, tile)
    return (flat < MAX_FLAT_FRACTION) & (bright <= MAX_BRIGHT_FRACTION)


def _tile_means(mask: np.ndarray, tile: int) -> np.ndarray:
    # Mean of a boolean map over each complete tile; a partial last row or
    # column of tiles is dropped, as the tiling stage does.
    rows, cols = mask.shape[0] // tile, mask.shape[1] // tile
    m = mask[: rows * tile, : cols * tile].astype(np.float32)
    return m.reshape(rows, tile, cols, tile).mean(axis=(1, 3))


# --------------------------------------------------------------------------
# Slide layout: tissue, faint tissue, lesions (coarse grid)
# --------------------------------------------------------------------------


@dataclass
class _Layout:
    tissue_field: np.ndarray  # coarse, >0 inside tissue (soft edge)
    faint_field: np.ndarray  # coarse, >0 inside faint tissue
    lesion_weight: np.ndarray  # coarse, lesion membership in [0, 1] (soft edge)
    lymphoid_weight: np.ndarray  # coarse, lymphoid-aggregate membership in [0, 1] (soft edge)
    targets: dict  # planned share of tissue tiles per pattern ("tumor", "lymphoid")


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field with correlation length ``sigma`` (coarse px)."""
    noise = rng.standard_normal(shape).astype(np.float32)
    field = cv2.GaussianBlur(noise, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    return (field - field.mean()) / (field.std() + 1e-6)


def _plan_layout(rng: np.random.Generator, coarse_shape: tuple[int, int], targets: dict, tissue: bool,
                 tumor_tile_fraction: tuple[float, float]) -> _Layout:
    if not tissue:
        empty, none = np.full(coarse_shape, -1.0, np.float32), np.zeros(coarse_shape, np.float32)
        return _Layout(empty, empty, none, none, {"tumor": 0.0, "lymphoid": 0.0})

    # Large blobs with ragged edges: a broad field plus a finer one; the
    # threshold is a quantile so the covered share is controlled exactly.
    blob_sigma = max(coarse_shape) / 14.0
    field = _smooth_field(rng, coarse_shape, blob_sigma) + 0.3 * _smooth_field(rng, coarse_shape, blob_sigma / 5)
    coverage = rng.uniform(0.35, 0.55)
    tissue_field = (field - np.quantile(field, 1.0 - coverage)).astype(np.float32)

    # Faint tissue: pale patches kept a little away from the real tissue, so
    # that whole tiles of it exist for the background filter to drop.
    faint = _smooth_field(rng, coarse_shape, blob_sigma)
    outside = faint[tissue_field < -0.3]
    faint_cut = np.quantile(outside, 1.0 - _FAINT_SHARE) if outside.size else np.inf
    faint_field = np.minimum(faint - faint_cut, -0.3 - tissue_field).astype(np.float32)

    in_tissue = tissue_field > _TISSUE_CUT
    if targets["tumor"] is None:  # a label-driven positive slide: its share drawn here, as slides always were
        targets = {**targets, "tumor": float(rng.uniform(*tumor_tile_fraction))}
    lesion = _plan_lesions(rng, in_tissue, targets["tumor"])
    # Aggregates keep a coarse pixel away from tumour, so that a tile shows one pattern or the other.
    free = in_tissue & ~cv2.dilate(lesion.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    lymphoid = _plan_lesions(rng, in_tissue, targets["lymphoid"], allowed=free)
    # A slightly blurred map gives soft borders once upsampled.
    blur = lambda m: cv2.GaussianBlur(m.astype(np.float32), (0, 0), 0.7)  # noqa: E731
    return _Layout(tissue_field, faint_field, blur(lesion), blur(lymphoid), dict(targets))


def _plan_lesions(rng: np.random.Generator, tissue: np.ndarray, target: float,
                  allowed: np.ndarray | None = None) -> np.ndarray:
    """Coarse mask of one to three compact lesions inside ``allowed`` (default: ``tissue``), sized so
    that about ``target`` of the tissue tiles are lesion tiles (none for a target of 0)."""
    allowed = tissue if allowed is None else allowed
    if target <= 0:
        return np.zeros(tissue.shape, bool)
    depth = cv2.distanceTransform(allowed.astype(np.uint8), cv2.DIST_L2, 5).ravel()
    if not depth.any():
        return np.zeros(tissue.shape, bool)
    # Centres deep inside tissue, so lesions look like metastases, not rims.
    k = int(min(rng.integers(1, 4), np.count_nonzero(depth)))
    p = depth**2 / (depth**2).sum()
    idx = rng.choice(depth.size, size=k, replace=False, p=p)
    cy, cx = np.unravel_index(idx, allowed.shape)
    radii = rng.uniform(0.6, 1.4, size=k)
    yy, xx = np.mgrid[0 : tissue.shape[0], 0 : tissue.shape[1]].astype(np.float32)
    # Distance to the nearest centre in units of its radius, wobbled by a
    # bounded factor so borders are irregular but no satellite spots appear.
    dist = np.min([np.hypot(yy - y, xx - x) / r for y, x, r in zip(cy, cx, radii)], axis=0)
    dist *= 1.0 + 0.2 * np.clip(_smooth_field(rng, tissue.shape, 2.0), -1.5, 1.5)

    tissue_tiles = _tile_means(tissue, _COARSE) >= 0.5
    n_tissue_tiles = max(1, int(tissue_tiles.sum()))

    def lesion_at(scale: float) -> np.ndarray:
        return (dist < scale) & allowed

    def fraction(scale: float) -> float:
        tumor = _tile_means(lesion_at(scale), _COARSE) >= TUMOR_TILE_MIN_FRACTION
        return float((tumor & tissue_tiles).sum()) / n_tissue_tiles

    # The tumour-tile fraction grows monotonically with the lesion scale.
    lo, hi = 0.0, float(max(tissue.shape))
    for _ in range(25):
        mid = 0.5 * (lo + hi)
        if fraction(mid) < target:
            lo = mid
        else:
            hi = mid
    return lesion_at(hi)


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def _upsample(coarse: np.ndarray, width: int, height: int) -> np.ndarray:
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)


def _uniform_noise(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    # Zero-mean, unit-variance uniform noise: ~10x cheaper than Gaussian
    # draws, and indistinguishable once it is texture.
    noise = rng.integers(0, 256, shape, dtype=np.uint8).astype(np.float32)
    noise -= 127.5
    noise *= 1.0 / 73.9
    return noise


def _draw_nuclei(
    canvas: np.ndarray,
    rng: np.random.Generator,
    allowed,
    shape: tuple[int, int],
    density: float,
    minor_px: tuple[float, float],
    elong: tuple[float, float],
    intensity: tuple[int, int],
) -> int:
    """Draw filled ellipses into the uint8 ``canvas`` at random points.

    ``allowed(ys, xs)`` says which candidate centres to keep; ``density`` is
    nuclei per pixel of allowed area; ``minor_px`` is the range of the minor
    semi-axis and ``elong`` of the major/minor ratio.
    """
    h, w = shape
    n_candidates = int(density * h * w)
    ys = rng.integers(0, h, n_candidates)
    xs = rng.integers(0, w, n_candidates)
    keep = allowed(ys, xs)
    ys, xs = ys[keep], xs[keep]
    n = ys.size
    minor = rng.uniform(*minor_px, n)
    major = minor * rng.uniform(*elong, n)
    angle = rng.uniform(0, 180, n)
    value = rng.integers(intensity[0], intensity[1] + 1, n)
    for x, y, a, b, ang, v in zip(xs.tolist(), ys.tolist(), major.tolist(), minor.tolist(), angle.tolist(), value.tolist()):
        cv2.ellipse(canvas, (x, y), (max(1, round(a)), max(1, round(b))), ang, 0, 360, v, -1, cv2.LINE_AA)
    return n


@dataclass
class _Planes:
    """A layout upsampled to full resolution (float32 planes, boolean masks)."""

    tissue_field: np.ndarray  # >_TISSUE_CUT inside tissue
    faint_field: np.ndarray  # >0 inside faint tissue
    lesion_weight: np.ndarray  # lesion membership times tissue weight
    lymphoid_weight: np.ndarray  # lymphoid membership times tissue weight
    amount: np.ndarray  # stain amount: 1 in tissue, little in faint tissue, 0 in background
    lesion: np.ndarray  # bool
    lymphoid: np.ndarray  # bool, never overlapping lesion


def _render(rng: np.random.Generator, layout: _Layout, width: int, height: int) -> tuple[np.ndarray, dict]:
    """RGB image and full-resolution masks (tissue, faint, lesion, lymphoid) for a planned layout.

    Works on whole-slide float32 planes with cv2/numpy in-place operations:
    a 3072 x 3072 slide is ~10 M pixels, so every extra temporary costs.
    """
    t0 = time.perf_counter()
    shape = (height, width)
    planes = _upsample_layout(layout, width, height)
    grain = _uniform_noise(rng, shape)
    fibres = _collagen_fibres(rng, grain, layout.tissue_field.shape)
    t1 = time.perf_counter()
    nuclei = _draw_all_nuclei(rng, planes)
    t2 = time.perf_counter()
    hema, eosin = _stain_concentrations(planes, grain, fibres, nuclei)
    rgb = _transmitted_rgb(hema, eosin, grain)
    t3 = time.perf_counter()
    logger.debug("render: fields %.2fs nuclei %.2fs compose %.2fs", t1 - t0, t2 - t1, t3 - t2)
    masks = {"tissue": planes.tissue_field > _TISSUE_CUT, "faint": planes.faint_field > 0.0,
             "lesion": planes.lesion, "lymphoid": planes.lymphoid}
    return rgb, masks


def _upsample_layout(layout: _Layout, width: int, height: int) -> _Planes:
    tissue_f = _upsample(layout.tissue_field, width, height)
    faint_f = _upsample(layout.faint_field, width, height)
    lesion_w = _upsample(layout.lesion_weight, width, height)
    lymph_w = _upsample(layout.lymphoid_weight, width, height)
    # Stain amount: 1 in tissue with a soft edge; faint tissue gets so little
    # that most of it stays brighter than the background threshold.
    tissue_w = np.clip(tissue_f * _EDGE_SHARPNESS, 0.0, 1.0)
    amount = tissue_w + _FAINT_STAIN * np.clip(faint_f * _EDGE_SHARPNESS, 0.0, 1.0)
    lesion = (lesion_w > 0.5) & (tissue_f > _TISSUE_CUT)
    lymphoid = (lymph_w > 0.5) & (tissue_f > _TISSUE_CUT) & ~lesion
    lesion_w *= tissue_w
    lymph_w *= tissue_w
    return _Planes(tissue_f, faint_f, lesion_w, lymph_w, amount, lesion, lymphoid)


def _collagen_fibres(rng: np.random.Generator, grain: np.ndarray, coarse_shape: tuple[int, int]) -> np.ndarray:
    # Collagen fibres: noise smeared along rows or columns, the mix of the two
    # directions varying slowly across the slide.
    height, width = grain.shape
    mix_coarse = 1.0 / (1.0 + np.exp(-3.0 * _smooth_field(rng, coarse_shape, 3.0)))
    mix = _upsample(mix_coarse.astype(np.float32), width, height)
    fib_h = cv2.blur(grain, (15, 1))
    fib_v = cv2.blur(grain, (1, 15))
    return cv2.add(fib_v, cv2.multiply(mix, cv2.subtract(fib_h, fib_v)))


def _draw_all_nuclei(rng: np.random.Generator, planes: _Planes) -> np.ndarray:
    """uint8 nucleus map: scattered small nuclei in normal and faint tissue, crowded large dark
    pleomorphic ones in lesions, packed small round ones in lymphoid aggregates."""
    tissue_f, faint_f, lesion, lymphoid = planes.tissue_field, planes.faint_field, planes.lesion, planes.lymphoid
    shape = tissue_f.shape
    nuclei = np.zeros(shape, np.uint8)
    in_stroma = lambda ys, xs: (tissue_f[ys, xs] > _TISSUE_CUT) & ~lesion[ys, xs] & ~lymphoid[ys, xs]
    in_faint = lambda ys, xs: faint_f[ys, xs] > 0.0
    in_lesion = lambda ys, xs: lesion[ys, xs]
    _draw_nuclei(nuclei, rng, in_stroma, shape, 1 / 900, (2.5, 4.0), (1.0, 2.8), (110, 190))
    _draw_nuclei(nuclei, rng, in_faint, shape, 1 / 900, (2.5, 4.0), (1.0, 2.8), (110, 190))
    if lesion.any():
        _draw_nuclei(nuclei, rng, in_lesion, shape, 1 / 330, (5.0, 8.0), (1.0, 1.6), (190, 255))
    if lymphoid.any():
        _draw_nuclei(nuclei, rng, lambda ys, xs: lymphoid[ys, xs], shape, 1 / 60, (2.2, 3.2), (1.0, 1.25), (200, 255))
    return nuclei


def _stain_concentrations(planes: _Planes, grain: np.ndarray, fibres: np.ndarray,
                          nuclei: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin concentration planes (non-negative float32).

    Haematoxylin: a little everywhere in tissue, more in tumour cytoplasm,
    most in nuclei (with chromatin grain). Eosin: fibrous stroma, less in tumour.
    (cv2.addWeighted(a, x, b, y, z) = x*a + y*b + z in one pass, no temporaries.)
    """
    lesion_w, lymph_w = planes.lesion_weight, planes.lymphoid_weight
    chromatin = cv2.addWeighted(grain, 0.35 * 1.1 / 255.0, grain, 0.0, 1.1 / 255.0)
    hema = cv2.addWeighted(grain, 0.04, lesion_w, 0.35, 0.08)
    # Aggregates get tumour's cytoplasm colour: only nuclear size and crowding tell the two apart.
    hema += lymph_w * 0.3
    hema += cv2.multiply(nuclei.astype(np.float32), chromatin)
    hema *= planes.amount
    eosin = cv2.addWeighted(fibres, 0.22, grain, 0.12, 0.75)
    eosin *= cv2.addWeighted(lesion_w, -0.6, lymph_w, -0.6, 1.0)
    eosin *= planes.amount
    np.maximum(hema, 0.0, out=hema)
    np.maximum(eosin, 0.0, out=eosin)
    return hema, eosin


def _transmitted_rgb(hema: np.ndarray, eosin: np.ndarray, grain: np.ndarray) -> np.ndarray:
    # Beer-Lambert per channel: I = I0 * exp(-(h * OD_h + e * OD_e)), with a
    # slightly noisy illumination I0 (the flipped grain, so no new draw).
    illumination = cv2.flip(grain, -1)
    illumination *= 1.5
    illumination += 249.0
    channels = []
    for c in range(3):
        transmitted = cv2.exp(cv2.addWeighted(hema, -float(_H_OD[c]), eosin, -float(_E_OD[c]), 0.0))
        channels.append(cv2.convertScaleAbs(cv2.multiply(transmitted, illumination)))
    return cv2.merge(channels)


def render_slide(
    slide_id: str,
    label: int | str,
    seed: int,
    slide_px: tuple[int, int] = (3072, 3072),
    tumor_tile_fraction: tuple[float, float] = (0.1, 0.3),
    tissue: bool = True,
    patterns: dict[str, float] | None = None,
) -> tuple[np.ndarray, dict, dict]:
    """Pixels of one slide, without writing anything.

    ``patterns``: the planned share of tissue tiles per pattern (``tumor``, ``lymphoid``), as
    slidemil.demo.plan draws them; without it a binary ``label`` decides (1: a tumour share drawn from
    ``tumor_tile_fraction``, 0: none; no lymphoid aggregates). Returns ``(rgb, masks, facts)``: the
    (H, W, 3) uint8 image; boolean full-resolution masks ``tissue``, ``faint``, ``lesion`` and
    ``lymphoid`` (the ground truth); and the facts that :func:`make_slide` returns.
    """
    width, height = int(slide_px[0]), int(slide_px[1])
    if width < TILE_PX or height < TILE_PX:
        raise ValueError(f"slide_px must be at least {TILE_PX} px each way, got {slide_px}")
    if patterns is None and label not in (0, 1):
        raise ValueError(f"label must be 0 or 1 without planned patterns, got {label}")
    lo, hi = tumor_tile_fraction
    if not 0.0 < lo <= hi < 1.0:
        raise ValueError(f"tumor_tile_fraction must satisfy 0 < lo <= hi < 1, got {tumor_tile_fraction}")

    keys = (label,) if patterns is None else (label, *(f"{patterns.get(k, 0.0):.6f}" for k in ("tumor", "lymphoid")))
    rng = np.random.default_rng(seed_sequence(seed, slide_id, *keys))
    coarse_shape = (max(1, round(height / _COARSE)), max(1, round(width / _COARSE)))
    if patterns is None:
        targets = {"tumor": None if label == 1 else 0.0, "lymphoid": 0.0}
    else:
        targets = {"tumor": float(patterns.get("tumor", 0.0)), "lymphoid": float(patterns.get("lymphoid", 0.0))}
    layout = _plan_layout(rng, coarse_shape, targets, tissue, (lo, hi))
    rgb, masks = _render(rng, layout, width, height)
    facts = {"slide_id": slide_id, "label": label, "width": width, "height": height}
    facts.update(_facts(rgb, masks, layout))
    return rgb, masks, facts


def _facts(rgb: np.ndarray, masks: dict, layout: _Layout) -> dict:
    # Counted on the rendered pixels with the downstream background rule, so
    # the numbers describe what the tiling stage will actually keep.
    tissue_tiles = tile_tissue_mask(rgb)
    n_tissue = int(tissue_tiles.sum())
    facts = {"n_tiles": int(tissue_tiles.size), "n_tissue_tiles": n_tissue}
    for pattern, mask in (("tumor", "lesion"), ("lymphoid", "lymphoid")):
        hits = _tile_means(masks[mask], TILE_PX) >= TUMOR_TILE_MIN_FRACTION
        n_hits = int((hits & tissue_tiles).sum())
        facts[f"n_{pattern}_tiles"] = n_hits
        facts[f"{pattern}_tile_fraction"] = n_hits / n_tissue if n_tissue else 0.0
        facts[f"target_{pattern}_tile_fraction"] = layout.targets[pattern]
    facts.update(tissue_pixel_fraction=float(masks["tissue"].mean()), faint_pixel_fraction=float(masks["faint"].mean()),
                 lesion_pixel_fraction=float(masks["lesion"].mean()),
                 lymphoid_pixel_fraction=float(masks["lymphoid"].mean()))
    return facts


def make_slide(
    path: str | os.PathLike,
    label: int,
    seed: int,
    slide_px: tuple[int, int] = (3072, 3072),
    mpp: float | None = 0.5,
    objective_power: float | None = 20,
    tumor_tile_fraction: tuple[float, float] = (0.1, 0.3),
    tissue: bool = True,
    slide_id: str | None = None,
) -> dict:
    """Render one slide and write it to ``path`` as a pyramidal TIFF.

    ``slide_id`` (default: the file name without extension) seeds the pixels.
    ``mpp=None`` writes no mpp/objective-power metadata at all; ``tissue=False``
    writes an all-background slide (and no tumour, whatever the label).
    Returns facts about the slide, e.g. ``tumor_tile_fraction``: the share of
    tissue tiles (by the background rule) that contain tumour texture.
    """
    t0 = time.perf_counter()
    slide_id = slide_id or Path(path).name.split(".")[0]
    rendered = render_slide(slide_id, label, seed, slide_px, tumor_tile_fraction, tissue)
    return _write_slide(path, rendered, mpp, objective_power, t0)


def _write_slide(path, rendered: tuple, mpp: float | None, objective_power: float | None, t0: float) -> dict:
    rgb, _, facts = rendered
    t1 = time.perf_counter()
    # Objective power without a pixel size would be inconsistent metadata.
    write_pyramidal_tiff(path, rgb, mpp, objective_power if mpp is not None else None)
    t2 = time.perf_counter()
    facts.update(path=str(path), render_s=round(t1 - t0, 3), write_s=round(t2 - t1, 3))
    logger.debug("slide %s: %s", facts["slide_id"], facts)
    return facts


# --------------------------------------------------------------------------
# Cohort
# --------------------------------------------------------------------------


def _make_slide_job(job: dict) -> dict:
    """One slide of a planned cohort (:func:`slide_job` plus path, mpp and objective_power), written."""
    t0 = time.perf_counter()
    rendered = render_slide(job["slide_id"], job["label"], job["seed"], job["slide_px"], patterns=job["patterns"])
    return _write_slide(job["path"], rendered, job["mpp"], job["objective_power"], t0)


def _init_worker() -> None:
    # Processes already share the cores; cv2's own thread pool would oversubscribe them.
    cv2.setNumThreads(1)


def _settings(demo: dict) -> dict:
    unknown = set(demo) - set(field_defaults(Demo))
    if unknown:
        raise TypeError(f"unknown demo setting(s) {', '.join(sorted(unknown))}")
    return {**field_defaults(Demo), **demo}


def plan_slides(demo: dict) -> pd.DataFrame:
    """The cohort's sheet with the planned pattern shares of every slide (the ``demo`` config section's
    settings; the ones not given take slidemil.config.Demo's defaults)."""
    d = _settings(demo)
    return plan_cohort(d["n_patients"], d["seed"], d["two_slide_fraction"], d["positive_fraction"], d["task"],
                       {k: d[k] for k in SIGNAL_KEYS}, patterns=True)


def slide_job(row: dict, d: dict) -> dict:
    """render_slide's arguments for a planned slide (``row``) of the cohort settings ``d``."""
    # Every slide of a patient renders the patient's planned shares, each with its own layout.
    return dict(label=row.get("label", 0), seed=d["seed"], slide_px=tuple(d["slide_px"]), slide_id=row["slide_id"],
                patterns={"tumor": row["tumor_tile_fraction"], "lymphoid": row["lymphoid_tile_fraction"]})


def render_cohort_slide(demo: dict, slide_id: str) -> tuple[np.ndarray, dict, dict]:
    """One slide of the cohort ``demo`` describes, as :func:`render_slide` returns it (pixels, ground-truth
    masks, facts): the same pixels as the cohort's file, without the others."""
    d = _settings(demo)
    row = next(r for r in plan_slides(d).to_dict(orient="records") if r["slide_id"] == slide_id)
    job = slide_job(row, d)
    return render_slide(job.pop("slide_id"), **job)


def make_cohort(out_dir: str | os.PathLike, workers: int = 1, **demo) -> pd.DataFrame:
    """Write ``out_dir/slides/{slide_id}.tiff`` for every planned slide, then ``out_dir/samples.csv``.

    ``demo``: settings of the config's ``demo`` section (slidemil.config.Demo; the ones not given take its
    defaults). The sheet is written last so its presence means the cohort is complete.
    Returns the sheet (:func:`plan_cohort`'s, without the pattern shares).
    """
    d = _settings(demo)
    out_dir = Path(out_dir)
    table = plan_slides(d)
    jobs = [dict(slide_job(row, d), path=out_dir / row["path"], mpp=d["mpp"], objective_power=d["objective_power"])
            for row in table.to_dict(orient="records")]
    (out_dir / "slides").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    facts = []
    progress = dict(total=len(jobs), desc="synthetic slides", unit="slide")
    if workers > 1:
        # spawn: forking a process that has cv2's thread pool running can hang.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
            for result in tqdm(pool.map(_make_slide_job, jobs), **progress):
                facts.append(result)
    else:
        for job in tqdm(jobs, **progress):
            facts.append(_make_slide_job(job))
    sheet = table.drop(columns=PATTERN_COLUMNS)
    write_csv(out_dir / "samples.csv", sheet)

    summary = pd.DataFrame(facts)
    logger.info(
        "wrote %d %s slides of %d patients to %s in %.1fs; tissue tiles per slide %.0f (min %d); "
        "tumour tile fraction %.2f-%.2f, lymphoid %.2f-%.2f",
        len(table), d["task"], d["n_patients"], out_dir, time.perf_counter() - t0,
        summary.n_tissue_tiles.mean(), summary.n_tissue_tiles.min(),
        summary.tumor_tile_fraction.min(), summary.tumor_tile_fraction.max(),
        summary.lymphoid_tile_fraction.min(), summary.lymphoid_tile_fraction.max(),
    )
    return sheet


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, prog: str = "python -m slidemil.demo.render") -> None:
    defaults = field_defaults(Demo)
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Generate a deterministic synthetic cohort of pyramidal H&E-like TIFF slides.",
    )
    parser.add_argument("--out", required=True, help="output directory (gets slides/ and samples.csv)")
    parser.add_argument("--n-patients", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--task", choices=TASKS,
                        default=defaults["task"], help="what the sheet's target is (default %(default)s)")
    parser.add_argument("--slide-px", type=int, nargs=2, default=defaults["slide_px"], metavar=("W", "H"))
    parser.add_argument("--mpp", type=float, default=defaults["mpp"], help="microns per pixel at level 0")
    parser.add_argument("--objective-power", type=float, default=defaults["objective_power"])
    for name in ("tumor_tile_fraction", "lymphoid_tile_fraction"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, nargs=2, default=defaults[name],
                            metavar=("LO", "HI"), help="share of tissue tiles (default %(default)s)")
    for name in ("two_slide_fraction", "positive_fraction", "censored_fraction", "hazard_ratio", "score_noise",
                 "silent_positive_fraction"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=defaults[name],
                            help="default %(default)s (see config/README.md, section demo)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log", default=None, help="log file (default: stderr)")
    args = vars(parser.parse_args(argv))

    from slidemil.logs import setup_logging

    setup_logging(args.pop("log"))
    make_cohort(args.pop("out"), workers=args.pop("workers"), **args)


if __name__ == "__main__":
    main()
