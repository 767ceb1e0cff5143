"""Opening slides with OpenSlide, with errors that name the slide and the fix."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide
from openslide import lowlevel

from slidemil.errors import SlideError
from slidemil.slides.tiff_fallback import TiffSlide
from slidemil.slides.tiffjpeg import SCALES, reader_for

logger = logging.getLogger(__name__)

# A pyramid level counts as "at or below" the target mpp within this relative
# tolerance, so a 0.5040 mpp scan still serves a 0.5 mpp grid from level 0.
MPP_TOLERANCE = 0.05
# Level-0 resolutions coarser than this are no microscope's: scanner software writes a screen or print
# placeholder (72, 96 or 300 dpi is 353, 265 or 85 um/px) where it knows none, so such metadata counts as none.
MAX_MPP = 20.0


def open_slide(path: str | os.PathLike) -> openslide.OpenSlide | TiffSlide:
    """The slide, through OpenSlide; a folder is a DICOM WSI series (OpenSlide opens it from one of its files).

    TIFF that OpenSlide refuses (untiled, or a layout it does not know) or reads as a generic TIFF without mpp
    (OME-TIFF: its pixel size is in the OME-XML) is read with tifffile instead (slidemil.slides.tiff_fallback).
    """
    path = Path(path)
    given = path
    if path.is_dir():
        path = dicom_file(path)
    if not path.is_file():
        raise SlideError(f"{path}: slide file not found; fix the path in the sample sheet",
                         command_line=f"{path}: slide file not found; check the slide path on the command line")
    try:
        slide = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as err:
        fallback = _open_tiff(path)
        if fallback is not None:
            return fallback
        raise SlideError(f"{given}: not a slide format OpenSlide or tifffile can open ({err}); "
                         "convert it or remove it from the sample sheet",
                         command_line=f"{given}: not a slide format OpenSlide or tifffile can open ({err}); "
                         "convert it to one they open (e.g. a pyramidal TIFF)") from err
    except openslide.OpenSlideError as err:
        raise SlideError(f"{given}: OpenSlide cannot open this file ({err}); "
                         "it may be corrupt or truncated: re-export or re-copy it") from err
    props = slide.properties
    if props.get(openslide.PROPERTY_NAME_VENDOR) == "generic-tiff" and not props.get(openslide.PROPERTY_NAME_MPP_X):
        fallback = _open_tiff(path)
        if fallback is not None and fallback.properties.get(openslide.PROPERTY_NAME_MPP_X):
            logger.info("%s: read with tifffile (OpenSlide finds no mpp in it)", path)
            slide.close()
            return fallback
        if fallback is not None:
            fallback.close()
    return slide


def _open_tiff(path: Path) -> TiffSlide | None:
    try:
        return TiffSlide(path)
    except Exception as err:  # noqa: BLE001 - not a TIFF tifffile can read: the caller reports OpenSlide's error
        logger.debug("%s: tifffile cannot read it either (%s)", path, err)
        return None


def dicom_file(folder: Path) -> Path:
    """The file of a DICOM WSI folder to hand OpenSlide (it finds the series' other files next to it)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    dcm = [p for p in files if p.suffix.lower() == ".dcm"] or files
    for candidate in dcm:
        if openslide.OpenSlide.detect_format(str(candidate)) == "dicom":
            return candidate
    raise SlideError(f"{folder}: a folder, but no DICOM WSI file in it that OpenSlide recognises "
                     f"({len(files)} files); give the slide's file, or the folder of one DICOM WSI series")


def read_rgb(slide: openslide.OpenSlide, path, location, level: int, size, scale: int = 1) -> np.ndarray:
    """Read a region as an RGB uint8 array; pixel-decoding failures name the slide.

    ``scale`` > 1 returns the region at 1/``scale`` of the level's resolution (``size`` must be a multiple of it):
    JPEG-tiled TIFF slides decode it directly at that scale, other slides are read whole and area-averaged, which
    gives the same pixels to within rounding (see tiffjpeg).
    """
    w, h = int(size[0]), int(size[1])
    if scale != 1:
        if scale not in SCALES or w % scale or h % scale:
            raise ValueError(f"read_rgb: cannot read {w} x {h} px at 1/{scale} scale (1, 2, 4 or 8, dividing the size)")
        reader = reader_for(slide, path)
        bgr = reader.read_bgr(location, level, (w, h), scale) if reader is not None else None
        if bgr is not None:
            return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return cv2.resize(read_rgb(slide, path, location, level, (w, h)), (w // scale, h // scale),
                          interpolation=cv2.INTER_AREA)
    if isinstance(slide, TiffSlide):
        return _read_tiff(slide, path, location, level, size)
    img = _read_fast(slide, path, location, level, size, cv2.COLOR_BGR2RGB, cv2.COLOR_BGRA2RGB)
    if img is not None:
        return img
    return rgba_to_rgb(_read_rgba(slide, path, location, level, size))


def decode_scale(read_px: int, out_px: int) -> int:
    """The largest JPEG decoding scale (1, 2, 4 or 8) that divides ``read_px`` and keeps at least ``out_px``
    pixels per side, so the resize to ``out_px`` still only shrinks."""
    return max(s for s in SCALES if read_px % s == 0 and read_px // s >= out_px) if read_px >= out_px else 1


def read_gray(slide: openslide.OpenSlide, path, location, level: int, size) -> np.ndarray:
    """Read a region as a gray uint8 array (transparent pixels white), without an RGB copy in between."""
    if isinstance(slide, TiffSlide):
        return cv2.cvtColor(_read_tiff(slide, path, location, level, size), cv2.COLOR_RGB2GRAY)
    img = _read_fast(slide, path, location, level, size, cv2.COLOR_BGR2GRAY, cv2.COLOR_BGRA2GRAY)
    if img is not None:
        return img
    rgba = _read_rgba(slide, path, location, level, size)
    return _whiten_transparent(cv2.cvtColor(rgba, cv2.COLOR_RGBA2GRAY), rgba)


def _read_fast(slide, path, location, level: int, size, from_bgr: int, from_bgra: int) -> np.ndarray | None:
    """The region converted by one cvtColor from the JPEG tiles themselves (tiffjpeg) or from OpenSlide's own
    buffer when fully opaque; None where only the public read_region gives the right pixels."""
    reader = reader_for(slide, path)
    bgr = reader.read_bgr(location, level, size) if reader is not None else None
    if bgr is not None:
        return cv2.cvtColor(bgr, from_bgr)
    bgra = _read_opaque_bgra(slide, path, location, level, size)
    return cv2.cvtColor(bgra, from_bgra) if bgra is not None else None


def _read_tiff(slide: TiffSlide, path, location, level: int, size) -> np.ndarray:
    try:
        return slide.read_rgb(location, level, size)
    except Exception as err:  # noqa: BLE001 - tifffile and its codecs raise many types for a corrupt segment
        raise _read_error(path, location, level, err) from err


def _read_rgba(slide: openslide.OpenSlide, path, location, level: int, size) -> np.ndarray:
    try:
        region = slide.read_region(location, level, size)
    except openslide.OpenSlideError as err:
        raise _read_error(path, location, level, err) from err
    return np.asarray(region)


# OpenSlide's own read calls, which fill a caller's buffer with premultiplied ARGB words (BGRA bytes on a
# little-endian machine). openslide-python's public reads convert that buffer to straight RGBA for a PIL
# image, which numpy then copies again: two passes that cost 15-20 % of reading a 257 px tile.
_LITTLE_ENDIAN = sys.byteorder == "little"
_RAW_READ = getattr(lowlevel, "_read_region", None) if _LITTLE_ENDIAN else None
_RAW_READ_ASSOCIATED = getattr(lowlevel, "_read_associated_image", None) if _LITTLE_ENDIAN else None


def _read_opaque_bgra(slide, path, location, level: int, size) -> np.ndarray | None:
    """The region as BGRA bytes straight from OpenSlide's buffer, or None where that shortcut does not apply:
    a region with any pixel that is not opaque (its premultiplied colour needs the public conversion, and
    transparent pixels become white there), an object that is not an OpenSlide, or bindings without the call."""
    w, h = int(size[0]), int(size[1])
    if _RAW_READ is None or not isinstance(slide, openslide.OpenSlide) or w <= 0 or h <= 0:
        return None
    x, y, level = int(location[0]), int(location[1]), int(level)
    try:
        return _opaque_bgra(w, h, lambda ptr: _RAW_READ(slide._osr, ptr, x, y, level, w, h))
    except openslide.OpenSlideError as err:
        raise _read_error(path, location, level, err) from err


def _opaque_bgra(w: int, h: int, fill) -> np.ndarray | None:
    global _RAW_READ, _RAW_READ_ASSOCIATED
    buf = np.empty((h, w, 4), np.uint8)
    try:
        fill(buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)))
    except (TypeError, AttributeError, ctypes.ArgumentError) as err:
        # These calls are openslide-python internals: if a release changes them, read the public way from now on.
        logger.warning("direct OpenSlide reads are unavailable with openslide-python %s (%s); using its "
                       "public read_region", openslide.__version__, err)
        _RAW_READ = _RAW_READ_ASSOCIATED = None
        return None
    # Each pixel as one little-endian word is alpha << 24 | red << 16 | green << 8 | blue, so one vectorised
    # minimum tells whether every alpha is 255 (a tenth of the cost of extracting the alpha channel).
    return buf if buf.view(np.uint32).min() >= 0xFF000000 else None


def _read_error(path, location, level, err) -> SlideError:
    return SlideError(f"{path}: reading pixels at level {level}, {tuple(location)} failed ({err}); "
                      "the file is probably corrupt: re-export or re-copy it")


def read_thumbnail(slide: openslide.OpenSlide, path) -> np.ndarray:
    """The slide's associated 'thumbnail' image as RGB uint8."""
    try:
        if _RAW_READ_ASSOCIATED is not None and isinstance(slide, openslide.OpenSlide) \
                and "thumbnail" in lowlevel.get_associated_image_names(slide._osr):
            w, h = lowlevel.get_associated_image_dimensions(slide._osr, "thumbnail")
            bgra = _opaque_bgra(w, h, lambda ptr: _RAW_READ_ASSOCIATED(slide._osr, "thumbnail", ptr))
            if bgra is not None:
                return cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGB)
        image = slide.associated_images["thumbnail"]
    except (KeyError, openslide.OpenSlideError) as err:
        raise SlideError(f"{path}: reading the slide's thumbnail image failed ({err}); "
                         "the file is probably corrupt: re-export or re-copy it") from err
    return rgba_to_rgb(np.asarray(image if image.mode == "RGBA" else image.convert("RGBA")))


def resize_tile(tile: np.ndarray, px: int) -> np.ndarray:
    """A square tile (gray or colour) at ``px`` x ``px``: area averaging by the nearest whole factor, after a
    bilinear step of under half a pixel per output pixel to that exact multiple; bilinear when upsampling.

    OpenCV's area resampling is fast only for whole factors. Between them it costs as much as a third of reading
    the tile (measured per tile: RGB 512 -> 224 px 2.0 ms, 257 -> 224 px 0.53 ms; gray 257 -> 256 px 0.33 ms);
    the two steps take 0.6, 0.08 and 0.04 ms and differ from one area resize by 0.2-0.3 gray levels on average.
    """
    n = tile.shape[0]
    if n == px:
        return tile
    k = max(1, round(n / px))
    if n != k * px:
        tile = cv2.resize(tile, (k * px, k * px), interpolation=cv2.INTER_LINEAR)
    if k > 1:
        tile = cv2.resize(tile, (px, px), interpolation=cv2.INTER_AREA)
    return tile


@contextlib.contextmanager
def one_opencv_thread():
    """OpenCV without its own thread pool inside the block, e.g. while DataLoader workers read tiles.

    The workers are the parallelism: OpenCV's pool in each (its colour conversion and bilinear resize go
    multi-threaded at tile size) takes cores from the model. Entered in the parent before the workers fork,
    since setting it inside a forked worker deadlocks once the parent has used the pool.
    """
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    return _whiten_transparent(cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB), rgba)


def _whiten_transparent(img: np.ndarray, rgba: np.ndarray) -> np.ndarray:
    """``img`` (converted from ``rgba``) with transparent pixels white, in place."""
    # Transparent (outside-the-scan) pixels come back as zeros: paint them white, i.e. background.
    # Most regions are fully opaque; counting first skips the costly masked write for them.
    alpha = cv2.extractChannel(rgba, 3)
    if cv2.countNonZero(alpha) < alpha.size:
        img[alpha == 0] = 255
    return img


@dataclass(frozen=True)
class SlideMpp:
    mpp: float
    source: str  # "sheet", "metadata" or "objective-power"


def slide_mpp(slide: openslide.OpenSlide, path, mpp_override: float | None = None) -> SlideMpp:
    """Level-0 microns per pixel: the sheet's value, else metadata, else 10 / objective power."""
    if mpp_override is not None:
        return SlideMpp(float(mpp_override), "sheet")
    props = slide.properties
    mpp_x, mpp_y = props.get(openslide.PROPERTY_NAME_MPP_X), props.get(openslide.PROPERTY_NAME_MPP_Y)
    what = "no resolution in the slide metadata (neither openslide.mpp-x nor objective power)"
    if mpp_x:
        mpp = float(mpp_x) if not mpp_y else (float(mpp_x) + float(mpp_y)) / 2
        if 0 < mpp <= MAX_MPP:
            return SlideMpp(mpp, "metadata")
        if mpp > MAX_MPP:
            what = (f"no resolution in the slide metadata: it says {mpp:.4g} um/px ({25400 / mpp:.3g} dpi), "
                    f"a scanner software's placeholder (no microscope scans coarser than {MAX_MPP:g} um/px)")
            logger.warning("%s: metadata mpp %.4g is over %g um/px, a placeholder: ignored", path, mpp, MAX_MPP)
    power = props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER) or props.get("aperio.AppMag")
    if power and float(power) > 0:
        # The usual convention (20x ~ 0.5 mpp, 40x ~ 0.25 mpp); scanners differ by a few percent.
        mpp = 10.0 / float(power)
        logger.warning("%s: no mpp in metadata; using %.4g mpp from objective power %sx", path, mpp, power)
        return SlideMpp(mpp, "objective-power")
    problem = f"{path}: {what}, so the tile grid cannot be placed in microns; "
    raise SlideError(problem + "add an 'mpp' column to the sample sheet with this slide's level-0 microns per pixel",
                     command_line=problem + "pass --mpp-override with this slide's level-0 microns per pixel")


def level_mpps(slide: openslide.OpenSlide, base_mpp: float) -> list[float]:
    return [base_mpp * d for d in slide.level_downsamples]


def pick_level(slide: openslide.OpenSlide, path, base_mpp: float, target_mpp: float) -> int:
    """The coarsest level whose mpp is still at or below the target (never upsample from coarser)."""
    mpps = level_mpps(slide, base_mpp)
    ok = [i for i, m in enumerate(mpps) if m <= target_mpp * (1 + MPP_TOLERANCE)]
    if not ok:
        raise SlideError(
            f"{path}: finest level is {mpps[0]:.4g} mpp, coarser than the target {target_mpp:.4g} mpp; "
            "tiles would have to be upsampled: set a target mpp of at least "
            f"{mpps[0]:.4g} or leave this slide out"
        )
    return max(ok, key=lambda i: mpps[i])
