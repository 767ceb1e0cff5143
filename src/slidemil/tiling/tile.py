"""Stage 1: tile a slide on a grid in physical units and drop the background.

Background is never decoded at full resolution:
1. a coarse tissue mask (Otsu on HSV saturation) from a low-resolution level
   selects candidate grid cells;
2. candidates that are mostly white on a finer overview (about 32 px per grid
   cell) fail the rule's brightness half there and are not read; those in doubt
   get a second look on a pyramid level with at most 1/16 of a tile's pixels;
3. the rest are read at the target resolution and judged by the per-tile rule
   of DeepSMILE / Fu et al. 2020 (brightness and Sobel gradient).
The overviews come from the pyramid, or from an Aperio slide's thumbnail image
when it has no pyramid, so a slide's level 0 is decoded only where it is read.
"""

from __future__ import annotations

import argparse
import logging
import math
import textwrap
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide
from tqdm import tqdm

from slidemil.config import ConfigError, Tiling, check_section, field_defaults
from slidemil.files import atomic_output
from slidemil.files.tiles import read_tiles, slide_identity, write_tiles
from slidemil.logs import setup_logging
from slidemil.slides.reader import (SlideError, SlideMpp, open_slide, pick_level, read_gray, read_rgb, read_thumbnail,
                     resize_tile, slide_mpp)

logger = logging.getLogger(__name__)

MASK_PX_PER_TILE = 8  # mask resolution: each grid cell spans about 8 x 8 mask pixels
# The brightness pre-check counts white pixels on an overview with about 32 x 32 pixels per grid cell
# (closer to the tile's own count than the mask's 8 x 8, where averaging hides white between cells),
# never fewer than 16, and only when that overview decodes at most a quarter of the candidates' pixels.
CHECK_PX_PER_TILE = 32
CHECK_MIN_PX_PER_TILE = 16
CHECK_MAX_COST = 0.25
# Candidates still in doubt after the overview (more than 0.7 x max_bright_fraction white there) get a second
# look on a pyramid level with at most 1/16 of the tile's pixels (at least 4x coarser per side): averaging there
# hides less white next to tissue, and one such read costs a tenth (40x) to a third (20x) of reading the tile,
# so it pays where it saves one tile read in three to ten (measured: 43 in 172 and 397 in 665). From 0.6 the
# looks caught one more tile of 590 in 197 more reads on 20x tissue, and none more on 40x.
REFINE_FROM = 0.7
REFINE_MIN_DOWNSAMPLE = 4.0
QC_MAX_PX = 1024
ON_ERROR = Tiling.__dataclass_fields__["on_error"].metadata["choices"]


# The defaults and checks are slidemil.config.Tiling's (one home for the workflow and this CLI).
_DEFAULTS = field_defaults(Tiling)


@dataclass(frozen=True)
class TilingParams:
    mpp: float = _DEFAULTS["mpp"]                                   # target microns per pixel of the tiles
    tile_px: int = _DEFAULTS["tile_px"]                             # tile edge at the target mpp
    bright_threshold: int = _DEFAULTS["bright_threshold"]           # gray level above which a pixel is "white"
    max_bright_fraction: float = _DEFAULTS["max_bright_fraction"]   # background if more than this fraction is white
    sobel_threshold: float = _DEFAULTS["sobel_threshold"]           # gradient magnitude at or below this is "flat"
    max_flat_fraction: float = _DEFAULTS["max_flat_fraction"]       # kept only if fewer than this fraction is flat
    mask_min_saturation: int = _DEFAULTS["mask_min_saturation"]     # floor for the Otsu threshold (blank slides)
    mask_min_fraction: float = _DEFAULTS["mask_min_fraction"]       # a grid cell is a candidate above this tissue fraction
    precheck_brightness: bool = _DEFAULTS["precheck_brightness"]    # reject candidates mostly white on an overview unread

    @classmethod
    def from_dict(cls, d: dict | None) -> "TilingParams":
        """Names and types checked by slidemil.config (one line naming a bad setting); any size a caller
        asks for is allowed here (the workflow's config check holds the ranges). on_error is not a tiling
        parameter."""
        d = dict(d or {})
        for name in d:
            if name not in cls.__dataclass_fields__:
                raise ConfigError(f"tiling.{name}", "unknown tiling setting", ", ".join(cls.__dataclass_fields__))
        return cls(**check_section(Tiling, d, "tiling", fill=False, ranges=False))


def is_tissue(tile_rgb: np.ndarray, p: TilingParams) -> bool:
    """Fu et al.'s rule on an RGB tile at the target size: see ``is_tissue_gray``."""
    return is_tissue_gray(cv2.cvtColor(tile_rgb, cv2.COLOR_RGB2GRAY), p)


def is_tissue_gray(gray: np.ndarray, p: TilingParams) -> bool:
    """Fu et al.'s rule: not mostly white, and not mostly flat (Sobel magnitude), on the gray tile.

    The magnitude 0.5 |gx| + 0.5 |gy| <= t is computed as the exact integer |gx| + |gy| <= 2t
    (3x3 Sobel of uint8 fits int16): the same decision as in floating point. While 2t < 255 the
    integer sum may saturate at 255 in uint8 without changing any comparison, which halves the cost.
    """
    n = gray.size
    if too_white(gray, p):
        return False
    gx, gy = cv2.spatialGradient(gray)  # both 3x3 Sobel derivatives (int16, reflected border) in one pass
    if 2 * p.sobel_threshold < 255:
        magnitude2 = cv2.add(cv2.convertScaleAbs(gx), cv2.convertScaleAbs(gy))
        _, flat = cv2.threshold(magnitude2, 2 * p.sobel_threshold, 1, cv2.THRESH_BINARY_INV)
        n_flat = cv2.countNonZero(flat)
    else:
        magnitude2 = cv2.add(cv2.absdiff(gx, 0), cv2.absdiff(gy, 0), dtype=cv2.CV_32S)
        n_flat = int(np.count_nonzero(magnitude2 <= 2 * p.sobel_threshold))
    return bool(n_flat / n < p.max_flat_fraction)


def too_white(gray: np.ndarray, p: TilingParams) -> bool:
    """The rule's first half: more than ``max_bright_fraction`` of the gray pixels above ``bright_threshold``."""
    _, bright = cv2.threshold(gray, p.bright_threshold, 1, cv2.THRESH_BINARY)
    return cv2.countNonZero(bright) / gray.size > p.max_bright_fraction


def tissue_mask(thumb_rgb: np.ndarray, min_saturation: int) -> np.ndarray:
    """Boolean tissue mask: Otsu on median-blurred HSV saturation, as CLAM does."""
    sat = cv2.cvtColor(thumb_rgb, cv2.COLOR_RGB2HSV)[..., 1]
    sat = cv2.medianBlur(sat, 5)
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # On a blank slide Otsu splits noise; the floor keeps it from calling noise tissue.
    return sat > max(otsu, min_saturation)


def grid_fractions(mask: np.ndarray, scale: tuple[float, float], step0: int, nx: int, ny: int) -> np.ndarray:
    """Tissue fraction of the mask inside each grid cell (ny x nx), via an integral image."""
    integral = cv2.integral(mask.astype(np.uint8))
    h, w = mask.shape
    xs = np.clip(np.round(np.arange(nx + 1) * step0 * scale[0]).astype(int), 0, w)
    ys = np.clip(np.round(np.arange(ny + 1) * step0 * scale[1]).astype(int), 0, h)
    x0, x1 = xs[:-1][None, :], xs[1:][None, :]
    y0, y1 = ys[:-1][:, None], ys[1:][:, None]
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return total / area


def tile_slide(
    slide_path: str,
    out_h5: str,
    out_qc: str | None = None,
    params: dict | TilingParams | None = None,
    slide_id: str | None = None,
    mpp_override: float | None = None,
    threads: int = 1,
    on_error: str = "fail",
) -> dict:
    """Tile one slide; write its coordinates (HDF5) and a QC picture. Returns a summary.

    A slide that cannot be used (unreadable, no resolution, no tissue) raises SlideError with
    ``on_error="fail"``; with ``"exclude"`` it logs one ERROR line and gets a valid zero-row tiles
    file whose ``excluded`` attribute holds the reason, so the rest of the cohort goes on.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, not {on_error!r}")
    p = params if isinstance(params, TilingParams) else TilingParams.from_dict(params)
    slide_id = slide_id or Path(slide_path).stem
    try:
        return _tile(slide_path, out_h5, out_qc, p, slide_id, mpp_override, threads)
    except SlideError as err:
        if on_error == "fail":
            if out_qc and getattr(err, "qc_picture", None) is not None:
                _write_excluded_qc(out_qc, slide_id, str(err), err.qc_picture)
            raise
        reason, picture, warning = str(err), getattr(err, "qc_picture", None), getattr(err, "warning", "")
    logger.error("%s excluded: %s", slide_id, reason)
    write_excluded(out_h5, out_qc, slide_id, slide_path, reason, p, picture, warning)
    return {"slide_id": slide_id, "n_tiles": 0, "excluded": reason}


def write_excluded(out_h5, out_qc, slide_id: str, slide_path, reason: str, p: TilingParams,
                   picture: np.ndarray | None = None, warning: str = "") -> None:
    """A zero-row tiles file carrying the reason, and a QC picture that says it (above ``picture``, BGR, if any:
    a no-tissue slide's thumbnail and mask, which the reason tells the user to look at)."""
    attrs = {
        "slide_id": slide_id, "slide_path": str(slide_path), "level": -1, "tile_px": p.tile_px,
        "tile_size_level0": 0, "read_px": 0, "target_mpp": p.mpp, "n_grid": 0, "n_candidates": 0,
        "n_tiles": 0, "params": asdict(p), "excluded": reason, "warning": warning,
    }
    write_tiles(out_h5, np.zeros((0, 2), np.int64), attrs)
    if out_qc:
        _write_excluded_qc(out_qc, slide_id, reason, picture)


def _write_excluded_qc(out_qc, slide_id: str, reason: str, picture: np.ndarray | None) -> None:
    width = max(960, picture.shape[1] if picture is not None else 0)
    img = np.full((160, width, 3), 255, np.uint8)
    lines = [f"{slide_id}: EXCLUDED"] + textwrap.wrap(reason, 110)[:6]
    for i, line in enumerate(lines):
        cv2.putText(img, line, (8, 22 + 22 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 200) if i == 0 else (0, 0, 0), 1, cv2.LINE_AA)
    if picture is not None:
        below = np.full((picture.shape[0], width, 3), 255, np.uint8)
        below[:, :picture.shape[1]] = picture
        img = np.vstack([img, below])
    ok, buf = cv2.imencode(".png", img)
    with atomic_output(out_qc) as tmp:
        tmp.write_bytes(buf.tobytes())


def mask_picture(slide, slide_path, p: TilingParams, step0: int, candidates: np.ndarray) -> np.ndarray:
    """The thumbnail (candidates outlined in red) beside the tissue mask (tissue white), BGR, each at most
    QC_MAX_PX / 2 wide: what a user checks when no tile was kept. The mask is the tiling's own, at its
    resolution (MASK_PX_PER_TILE per grid cell), shown larger without smoothing."""
    w0, h0 = slide.dimensions
    thumb = _thumbnail(slide, slide_path, max(step0 / MASK_PX_PER_TILE, 1.0))
    mask = tissue_mask(thumb, p.mask_min_saturation)
    side = QC_MAX_PX // 2
    size = (max(1, round(w0 * side / max(w0, h0))), max(1, round(h0 * side / max(w0, h0))))
    left = np.ascontiguousarray(cv2.resize(thumb, size, interpolation=cv2.INTER_AREA)[..., ::-1])
    right = cv2.resize(mask.astype(np.uint8) * 255, size, interpolation=cv2.INTER_NEAREST)
    s = size[0] / w0
    for x, y in candidates.tolist():
        cv2.rectangle(left, (int(x * s), int(y * s)), (int((x + step0) * s) - 1, int((y + step0) * s) - 1),
                      (0, 0, 220), 1)
    gap = np.full((size[1], 8, 3), 255, np.uint8)
    return np.hstack([left, gap, cv2.cvtColor(right, cv2.COLOR_GRAY2BGR)])


# A slide's background (its brightest tenth of overview pixels) is glass: near neutral white. Further than this
# from gray (largest minus smallest channel of its median colour, 0-255) the colours cannot be right: e.g. a
# DICOM header declaring RGB over YCbCr JPEG frames turns white into (255, 128, 128): 123 on a demo slide.
# Measured on slides read right: CMU-1 3, openslide's small.svs 10, the demo slides and boxes.tiff 0; a
# yellowish glass (240, 235, 215) would be 25.
MAX_BACKGROUND_CHROMA = 40
BACKGROUND_QUANTILE = 0.9


def colour_warning(overview_rgb: np.ndarray, slide_path) -> str:
    """A warning (logged) when the slide's background on its overview is far from neutral white, else ""."""
    if overview_rgb.size == 0:
        return ""
    stride = max(1, int(math.sqrt(overview_rgb.shape[0] * overview_rgb.shape[1] / 1e6)))  # a million pixels do
    overview_rgb = np.ascontiguousarray(overview_rgb[::stride, ::stride])
    pixels = overview_rgb.reshape(-1, 3)
    gray = cv2.cvtColor(overview_rgb, cv2.COLOR_RGB2GRAY).ravel()
    background = pixels[gray >= np.quantile(gray, BACKGROUND_QUANTILE)]
    colour = np.median(background, axis=0)
    chroma = float(colour.max() - colour.min())
    if chroma <= MAX_BACKGROUND_CHROMA:
        return ""
    rgb = ", ".join(f"{c:.0f}" for c in colour)
    warning = (f"background colour ({rgb}) is far from neutral white (channels differ by {chroma:.0f} > "
               f"{MAX_BACKGROUND_CHROMA}): the colours are probably read wrongly (e.g. YCbCr taken for RGB); "
               "check the QC picture before trusting its features")
    logger.warning("%s: %s", slide_path, warning)
    return warning


@dataclass(frozen=True)
class _Tiling:
    """One slide being tiled: the open slide, its names, the parameters and its grid on level 0."""
    slide: openslide.OpenSlide
    slide_path: typing.Any
    slide_id: str
    p: TilingParams
    base: SlideMpp       # level-0 mpp and where it came from
    level: int           # the level tiles are read from
    level_mpp: float
    step0: int           # grid step (= tile edge) at level 0
    read_px: int         # tile edge read on ``level``
    nx: int
    ny: int


def _tile(slide_path, out_h5, out_qc, p: TilingParams, slide_id: str, mpp_override, threads) -> dict:
    t = _open_tiling(slide_path, p, slide_id, mpp_override)
    sources = overview_sources(t.slide)
    candidates, mask_source, mask_img = tissue_candidates(t.slide, slide_path, p, t.step0, sources)
    warning = colour_warning(mask_img, slide_path)
    logger.info("%s: %.4g mpp (%s), level %d (%.4g mpp), grid %dx%d of %d px at level 0, %d candidates",
                slide_id, t.base.mpp, t.base.source, t.level, t.level_mpp, t.nx, t.ny, t.step0, len(candidates))

    # A slide with neither a coarser level nor a thumbnail: the mask decoded every pixel at the tile level.
    level_img = mask_img if mask_source == t.level == 0 else None
    to_read = candidates
    if p.precheck_brightness and level_img is None and len(candidates):
        to_read = _skip_white(t, candidates, sources, mask_source, mask_img)
    del mask_img
    coords = _judge_tiles(t, to_read, level_img, threads)
    if len(coords) == 0:
        _raise_no_tissue(t, candidates, warning)
    return _write_outputs(t, out_h5, out_qc, (candidates, to_read, coords), warning)


def _open_tiling(slide_path, p: TilingParams, slide_id: str, mpp_override) -> _Tiling:
    """Open the slide and lay its grid; a slide smaller than one tile is closed and refused."""
    slide = open_slide(slide_path)
    base = slide_mpp(slide, slide_path, mpp_override)
    level = pick_level(slide, slide_path, base.mpp, p.mpp)
    step0 = int(round(p.tile_px * p.mpp / base.mpp))
    w0, h0 = slide.dimensions
    nx, ny = w0 // step0, h0 // step0
    if nx == 0 or ny == 0:
        slide.close()
        raise SlideError(f"{slide_path}: slide {slide_id} is {w0} x {h0} px at {base.mpp:.4g} mpp, smaller than one "
                         f"{p.tile_px} px tile at {p.mpp:g} mpp ({step0} x {step0} px of this slide); leave it out "
                         "of the sample sheet, or tile at a smaller tiling.tile_px")
    downsample = slide.level_downsamples[level]
    return _Tiling(slide, slide_path, slide_id, p, base, level, level_mpp=base.mpp * downsample, step0=step0,
                   read_px=int(round(step0 / downsample)), nx=nx, ny=ny)


def _skip_white(t: _Tiling, candidates: np.ndarray, sources: dict, mask_source, mask_img: np.ndarray) -> np.ndarray:
    """The candidates left to read after the brightness pre-check: not mostly white on an overview, nor, where
    the overview leaves them in doubt, on a finer level."""
    dims, step0 = t.slide.dimensions, t.step0
    check_source = pick_check_source(sources, dims, step0, len(candidates) * t.read_px ** 2)
    if check_source is None:
        return candidates
    check_gray = _check_gray(t, check_source, mask_source, mask_img)
    bright = bright_fractions(check_gray, dims, step0, t.nx, t.ny, t.p.bright_threshold)
    bright = bright[candidates[:, 1] // step0, candidates[:, 0] // step0]
    passed = bright <= t.p.max_bright_fraction
    to_read = candidates[passed]
    del check_gray
    logger.info("%s: %d candidates mostly white on the %s overview (%.0f px per tile), not read",
                t.slide_id, len(candidates) - len(to_read), _source_name(check_source),
                step0 / sources[check_source])
    refine_level = pick_refine_level(t.slide.level_downsamples, t.level, sources[check_source], step0)
    if refine_level is None:
        return to_read
    return _second_look(t, to_read, bright[passed], refine_level)


def _check_gray(t: _Tiling, check_source, mask_source, mask_img: np.ndarray) -> np.ndarray:
    """The pre-check's overview in gray; the mask's image when it is the same one."""
    if check_source == mask_source:
        return cv2.cvtColor(mask_img, cv2.COLOR_RGB2GRAY)
    if check_source == "thumbnail":
        return cv2.cvtColor(read_thumbnail(t.slide, t.slide_path), cv2.COLOR_RGB2GRAY)
    # Straight to gray: no RGB copy of a whole level.
    return read_gray(t.slide, t.slide_path, (0, 0), check_source, t.slide.level_dimensions[check_source])


def _second_look(t: _Tiling, to_read: np.ndarray, bright: np.ndarray, refine_level: int) -> np.ndarray:
    """``to_read`` less the doubtful candidates (nearly too white on the overview, ``bright``) that are mostly
    white on ``refine_level``."""
    doubtful = bright > REFINE_FROM * t.p.max_bright_fraction
    white = mostly_white(t.slide, t.slide_path, to_read[doubtful], refine_level, t.step0, t.p)
    logger.info("%s: %d of %d doubtful candidates mostly white on level %d (%.0f px per tile), not read",
                t.slide_id, int(white.sum()), int(doubtful.sum()), refine_level,
                t.step0 / t.slide.level_downsamples[refine_level])
    doubtful[doubtful] = white
    return to_read[~doubtful]


def _judge_tiles(t: _Tiling, to_read: np.ndarray, level_img: np.ndarray | None, threads) -> np.ndarray:
    """The tiles of ``to_read`` that the per-tile rule keeps, cut from ``level_img`` when it holds the tile level."""
    slide, slide_path, p, read_px = t.slide, t.slide_path, t.p, t.read_px

    def judge(xy):
        # The rule only looks at gray levels, so the tile is resized after the gray conversion:
        # a third of the pixels to resample (within one gray level of resizing the colour tile first).
        x, y = int(xy[0]), int(xy[1])
        if level_img is not None:
            gray = cv2.cvtColor(level_img[y:y + read_px, x:x + read_px], cv2.COLOR_RGB2GRAY)
        else:
            gray = read_gray(slide, slide_path, (x, y), t.level, (read_px, read_px))
        return is_tissue_gray(resize_tile(gray, p.tile_px), p)

    progress = dict(total=len(to_read), desc=f"tiling {t.slide_id}", mininterval=2, disable=None)
    if threads <= 1:
        keep = [judge(xy) for xy in tqdm(to_read, **progress)]
    else:
        # OpenSlide handles are thread-safe and ctypes drops the GIL while decoding.
        with ThreadPoolExecutor(max_workers=threads) as pool:
            keep = list(tqdm(pool.map(judge, to_read), **progress))
    return to_read[np.asarray(keep, dtype=bool)] if len(to_read) else np.zeros((0, 2), np.int64)


def _raise_no_tissue(t: _Tiling, candidates: np.ndarray, warning: str) -> typing.NoReturn:
    """Blank, or tissue too faint for the thresholds: nothing to learn from. The error carries the mask picture
    a user checks, and the colour warning."""
    problem = (f"{t.slide_path}: no tissue tiles found ({len(candidates)} candidate tiles in the tissue mask, "
               "none kept); check the slide and its QC picture, or lower ")
    err = SlideError(problem + "tiling.mask_min_saturation", command_line=problem + "--mask-min-saturation")
    err.qc_picture = mask_picture(t.slide, t.slide_path, t.p, t.step0, candidates)
    err.warning = warning  # false colours are a likely cause: the excluded slide's file keeps the warning
    t.slide.close()
    raise err


def _write_outputs(t: _Tiling, out_h5, out_qc, tiles: tuple[np.ndarray, np.ndarray, np.ndarray],
                   warning: str) -> dict:
    """Write the tiles file and the QC picture, close the slide, and return the summary; ``tiles`` is
    (candidates, those read, those kept)."""
    candidates, to_read, coords = tiles
    attrs = {
        "slide_id": t.slide_id, "slide_path": str(t.slide_path), "level": t.level,
        "tile_px": t.p.tile_px, "tile_size_level0": t.step0, "read_px": t.read_px,
        "target_mpp": t.p.mpp, "slide_mpp": t.base.mpp, "mpp_source": t.base.source, "level_mpp": t.level_mpp,
        "n_grid": t.nx * t.ny, "n_candidates": len(candidates), "n_read": len(to_read), "n_tiles": len(coords),
        "params": asdict(t.p), "excluded": "", "warning": warning,
        **slide_identity(t.slide_path, t.slide.dimensions),
    }
    write_tiles(out_h5, coords, attrs)
    if out_qc:
        write_qc(t.slide, t.slide_path, out_qc, coords, candidates, t.step0)
    t.slide.close()
    return {k: attrs[k] for k in ("slide_id", "level", "tile_size_level0", "n_grid", "n_candidates", "n_read",
                                  "n_tiles")}


def tissue_candidates(slide, slide_path, p: TilingParams, step0: int, sources: dict):
    """Grid cells the coarse tissue mask passes, as level-0 (x, y) in row-major order, and the mask's source
    and image (the caller may reuse it)."""
    w0, h0 = slide.dimensions
    nx, ny = w0 // step0, h0 // step0
    mask_downsample = max(step0 / MASK_PX_PER_TILE, 1.0)
    mask_source = pick_source(sources, mask_downsample)
    mask_img = read_source(slide, slide_path, mask_source)
    thumb = _downsample(mask_img, slide, mask_downsample)
    mask = tissue_mask(thumb, p.mask_min_saturation)
    scale = (thumb.shape[1] / w0, thumb.shape[0] / h0)
    fractions = grid_fractions(mask, scale, step0, nx, ny) if nx and ny else np.zeros((0, 0))
    iy, ix = np.nonzero(fractions > p.mask_min_fraction)
    return np.stack([ix * step0, iy * step0], axis=1).astype(np.int64), mask_source, mask_img


def bright_fractions(gray: np.ndarray, dims: tuple[int, int], step0: int, nx: int, ny: int,
                     bright_threshold: int) -> np.ndarray:
    """Fraction of each grid cell's overview pixels whose gray level is above the threshold (ny x nx)."""
    scale = (gray.shape[1] / dims[0], gray.shape[0] / dims[1])
    return grid_fractions(gray > bright_threshold, scale, step0, nx, ny)


def pick_refine_level(downsamples, level: int, check_downsample: float, step0: int):
    """The pyramid level on which doubtful candidates are looked at again, one small read each: finer than the
    pre-check's overview, coarser than the tile level with at most 1/16 of its pixels; None if there is none."""
    tile_ds = downsamples[level]
    usable = [i for i, d in enumerate(downsamples)
              if i > level and d < check_downsample * (1 - 1e-6) and d >= REFINE_MIN_DOWNSAMPLE * tile_ds * (1 - 1e-6)
              and step0 / d >= 2]
    return min(usable, key=lambda i: downsamples[i]) if usable else None


def mostly_white(slide, slide_path, coords: np.ndarray, level: int, step0: int, p: TilingParams) -> np.ndarray:
    """Whether each grid cell's pixels on ``level`` are more than ``max_bright_fraction`` white."""
    n = max(1, int(round(step0 / slide.level_downsamples[level])))
    white = np.zeros(len(coords), bool)
    for i, (x, y) in enumerate(coords.tolist()):
        white[i] = too_white(read_gray(slide, slide_path, (x, y), level, (n, n)), p)
    return white


def overview_sources(slide: openslide.OpenSlide) -> dict:
    """Level-0 downsample of every whole-slide image there is: pyramid levels 0, 1, ... and "thumbnail".

    Aperio's thumbnail is a downsample of the scanned area (not a photo of the glass, like a macro
    image), so a slide without a pyramid need not be decoded whole for its overviews. Other vendors'
    thumbnails are not trusted to cover the same area.
    """
    sources = {i: float(d) for i, d in enumerate(slide.level_downsamples)}
    props = slide.properties
    if props.get(openslide.PROPERTY_NAME_VENDOR) != "aperio":
        return sources
    try:
        tw = int(props["openslide.associated.thumbnail.width"])
        th = int(props["openslide.associated.thumbnail.height"])
    except (KeyError, ValueError):
        return sources
    w0, h0 = slide.dimensions
    if tw > 0 and th > 0 and abs((w0 / tw) / (h0 / th) - 1) < 0.01:
        sources["thumbnail"] = (w0 / tw + h0 / th) / 2
    return sources


def pick_source(sources: dict, downsample: float):
    """The coarsest image not coarser than ``downsample`` (as OpenSlide's best level for it)."""
    fine_enough = {s: d for s, d in sources.items() if d <= downsample * (1 + 1e-6)} or {0: sources[0]}
    return max(fine_enough, key=fine_enough.get)


def pick_check_source(sources: dict, dims: tuple[int, int], step0: int, candidate_px: int):
    """The image for the brightness pre-check, or None when none is fine enough and cheap enough."""
    w0, h0 = dims
    usable = {s: d for s, d in sources.items()
              if step0 / d >= CHECK_MIN_PX_PER_TILE and w0 * h0 / d ** 2 <= CHECK_MAX_COST * candidate_px}
    if not usable:
        return None
    return min(usable, key=lambda s: (abs(math.log2(step0 / usable[s] / CHECK_PX_PER_TILE)), -usable[s]))


def read_source(slide, slide_path, source) -> np.ndarray:
    if source == "thumbnail":
        return read_thumbnail(slide, slide_path)
    return read_rgb(slide, slide_path, (0, 0), source, slide.level_dimensions[source])


def _source_name(source) -> str:
    return source if isinstance(source, str) else f"level-{source}"


def _thumbnail(slide, slide_path, downsample: float) -> np.ndarray:
    """The slide at about ``downsample`` x, from the coarsest image not coarser than that."""
    source = pick_source(overview_sources(slide), downsample)
    return _downsample(read_source(slide, slide_path, source), slide, downsample)


def _downsample(img: np.ndarray, slide, downsample: float) -> np.ndarray:
    w0, h0 = slide.dimensions
    size = (max(1, round(w0 / downsample)), max(1, round(h0 / downsample)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def write_qc(slide, slide_path, out_png, coords, candidates, step0) -> None:
    """Thumbnail with kept tiles outlined in green and rejected candidates in red."""
    w0, h0 = slide.dimensions
    thumb = _thumbnail(slide, slide_path, max(w0, h0) / QC_MAX_PX)
    s = thumb.shape[1] / w0
    img = np.ascontiguousarray(thumb[..., ::-1])  # OpenCV draws and encodes BGR
    kept = {tuple(c) for c in coords.tolist()}
    rejected = [c for c in candidates.tolist() if tuple(c) not in kept]
    # Rejected first so the outlines of kept tiles stay on top where they touch.
    for color, boxes in (((0, 0, 220), rejected), ((0, 170, 0), coords.tolist())):
        for x, y in boxes:
            cv2.rectangle(img, (int(x * s), int(y * s)),
                          (int((x + step0) * s) - 1, int((y + step0) * s) - 1), color, 1)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError(f"could not encode the QC picture of {slide_path}")
    with atomic_output(out_png) as tmp:
        tmp.write_bytes(buf.tobytes())


def load_tiles(path: str) -> tuple[np.ndarray, dict]:
    """(coords, attributes) of a tiles file (``slidemil.files.tiles.read_tiles``, kept under the stage's name)."""
    return read_tiles(path)


def main(argv=None, prog: str = "python -m slidemil.tiling.tile") -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slide", help="slide file (any format OpenSlide opens)")
    ap.add_argument("--out", required=True, help="output HDF5 with level-0 tile coordinates")
    ap.add_argument("--qc", help="output PNG: thumbnail with kept tiles outlined")
    ap.add_argument("--slide-id")
    ap.add_argument("--mpp-override", type=float, help="level-0 mpp when the slide has none")
    ap.add_argument("--threads", type=int, default=1)
    # From the command line an unusable slide fails (status 1, one line) unless exclusion is asked for: the
    # workflow's default (exclude, so the cohort goes on) would exit 0 and hide it.
    ap.add_argument("--on-error", choices=ON_ERROR, default="fail",
                    help="unusable slide: fail (default) or write an empty tiles file marked excluded")
    # The declared type, not the default's: sobel_threshold defaults to the integer 20 but takes 20.5.
    for name, kind in typing.get_type_hints(TilingParams).items():
        field = TilingParams.__dataclass_fields__[name]
        kind = _yes_no if kind is bool else kind
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=field.default)
    args = ap.parse_args(argv)
    setup_logging()
    params = {k: getattr(args, k) for k in TilingParams.__dataclass_fields__}
    # An unusable slide: slidemil.cli prints its command-line line and exits 1.
    print(tile_slide(args.slide, args.out, args.qc, params, args.slide_id, args.mpp_override, args.threads,
                     args.on_error))


def _yes_no(text: str) -> bool:
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


if __name__ == "__main__":
    from slidemil.errors import USER_ERRORS, command_line_message

    try:
        main()
    except USER_ERRORS as err:  # one line, as from slidemil.cli
        raise SystemExit(f"error: {command_line_message(err)}")
