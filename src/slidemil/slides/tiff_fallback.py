"""TIFF slides that OpenSlide cannot open, or opens without their pixel size, read with tifffile.

OME-TIFF (QuPath and Bio-Formats exports, pyramids in SubIFDs) and plain TIFF, tiled or in strips, with a
physical resolution: OpenSlide refuses untiled TIFF and reads an OME-TIFF as a one-level generic TIFF without
its mpp. ``TiffSlide`` offers what slidemil uses of an ``openslide.OpenSlide``: dimensions, level_dimensions,
level_downsamples, properties (with ``openslide.mpp-x/y``), read_region, get_best_level_for_downsample,
get_thumbnail, associated_images, close. Regions decode only the tiles or strips they touch (each cached,
64 MiB per slide), so a large slide is never decoded whole for them; a level in a layout other than those
``_Level`` reads segment by segment (other bit depths, odd plane layouts) is decoded whole, once.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import weakref
import xml.etree.ElementTree as ET

import cv2
import numpy as np

logger = logging.getLogger(__name__)

VENDOR = "tifffile"
CACHE_BYTES = 64 << 20
# Microns per unit of OME's PhysicalSizeXUnit and of TIFF's ResolutionUnit (2 inch, 3 centimetre).
_OME_UNIT_UM = {"µm": 1.0, "um": 1.0, "\u00b5m": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "pm": 1e-6}
_RESOLUTION_UNIT_UM = {2: 25400.0, 3: 10000.0}


def tiff_mpp(tif) -> tuple[float, float] | None:
    """Level-0 (mpp_x, mpp_y) from the OME-XML's PhysicalSizeX/Y, else the first page's resolution tags."""
    if tif.is_ome and tif.ome_metadata:
        try:
            mpp = _ome_mpp(tif.ome_metadata)
        except ET.ParseError as err:
            logger.debug("%s: unreadable OME-XML (%s)", tif.filename, err)
            mpp = None
        if mpp is not None:
            return mpp
    page = tif.pages[0]
    unit = _RESOLUTION_UNIT_UM.get(int(page.tags.valueof("ResolutionUnit", 2)))
    xres, yres = page.tags.valueof("XResolution"), page.tags.valueof("YResolution")
    if unit is None or not xres:
        return None
    px_x = _rational(xres)
    px_y = _rational(yres) if yres else px_x
    if not (px_x > 0 and px_y > 0):
        return None
    return unit / px_x, unit / px_y


def _rational(value) -> float:
    if isinstance(value, tuple):
        return value[0] / value[1] if value[1] else 0.0
    return float(value)


def _ome_mpp(xml: str) -> tuple[float, float] | None:
    root = ET.fromstring(xml)
    for pixels in root.iter():
        if not pixels.tag.endswith("}Pixels") and pixels.tag != "Pixels":
            continue
        sizes = []
        for axis in ("X", "Y"):
            value = pixels.get(f"PhysicalSize{axis}")
            unit = _OME_UNIT_UM.get(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
            sizes.append(float(value) * unit if value and unit else None)
        if sizes[0]:
            return sizes[0], sizes[1] or sizes[0]
    return None


class _Level:
    """One pyramid level: its tiles or strips decoded on demand, each with every sample of its pixels.

    The samples of a pixel lie together (contiguous), in separate planes of one page (planar configuration 2),
    or in one page per channel (an OME "CYX" series): a segment is then read from each plane and stacked."""

    def __init__(self, series_level, fd: int):
        self.series = series_level
        pages = list(series_level.pages)
        page = series_level.keyframe
        self.page, self.fd = page, fd
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        if page.is_tiled:
            self.seg_h, self.seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            self.seg_h, self.seg_w = min(int(page.rowsperstrip or self.height), self.height), self.width
        self.across = -(-self.width // self.seg_w)
        n_segments = self.across * -(-self.height // self.seg_h)
        separate = page.planarconfig == 2 and page.samplesperpixel > 1
        # Pages after the first may be tifffile frames: offsets of their own, the rest (decoding) the keyframe's.
        if separate and len(pages) == 1:  # plane k's segment i is the page's segment k * n + i
            self.planes = [(page, k * n_segments) for k in range(int(page.samplesperpixel))]
        elif not separate and all(p is not None and p.shape == page.shape for p in pages):
            self.planes = [(p, 0) for p in pages]
        else:
            self.planes = []
        per_plane = 1 if separate else int(page.samplesperpixel)
        self.samples = per_plane * len(self.planes) if not separate else len(self.planes)
        # Anything else (other layouts, other bit depths) is read whole, once per level.
        self.chunked = bool(self.planes) and page.dtype == np.uint8 and self.samples in (1, 3, 4) \
            and all(len(p.dataoffsets) >= start + n_segments for p, start in self.planes)

    def segment(self, i: int) -> np.ndarray:
        parts = []
        key = self.page
        for page, start in self.planes:
            k = start + i
            count = int(page.databytecounts[k])
            data = os.pread(self.fd, count, int(page.dataoffsets[k])) if count else None
            seg, _, _ = key.decode(data, k, jpegtables=key.jpegtables)
            if seg is None:  # a missing segment: background
                seg = np.full((self.seg_h, self.seg_w, 1), 255, np.uint8)
            seg = np.asarray(seg)
            parts.append(seg.reshape(seg.shape[-3], seg.shape[-2], -1))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)


class TiffSlide:
    """A TIFF slide read with tifffile, in the part of openslide.OpenSlide's interface slidemil uses."""

    def __init__(self, path: str | os.PathLike):
        import tifffile

        self.path = str(path)
        self._tif = tifffile.TiffFile(self.path)
        try:
            series = max(self._tif.series, key=lambda s: _area(s))
            if series.keyframe.dtype != np.uint8 or _area(series) == 0:
                raise ValueError(f"{series.dtype} pixels in {series.axes} layout, not 8-bit RGB or gray")
            self._fd = os.open(self.path, os.O_RDONLY)
            # Readers that drop a slide without close() (a DataLoader worker's handles) still free its file.
            self._finalizer = weakref.finalize(self, _close, self._fd, self._tif)
            self._levels = [_Level(lv, self._fd) for lv in series.levels]
            mpp = tiff_mpp(self._tif)
        except Exception:
            self._tif.close()
            raise
        self.level_dimensions = tuple((lv.width, lv.height) for lv in self._levels)
        self.dimensions = self.level_dimensions[0]
        self.level_count = len(self._levels)
        w0, h0 = self.dimensions
        self.level_downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in self.level_dimensions)
        props = {"openslide.vendor": VENDOR, "openslide.level-count": str(self.level_count),
                 "tifffile.series-axes": series.axes, "tifffile.is-ome": str(bool(self._tif.is_ome))}
        if mpp is not None:
            props["openslide.mpp-x"], props["openslide.mpp-y"] = repr(mpp[0]), repr(mpp[1])
        self.properties = props
        self.associated_images: dict = {}
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()
        self._whole: dict[int, np.ndarray] = {}

    def read_rgb(self, location, level: int, size) -> np.ndarray:
        """The region (level-0 top-left, level, size in level pixels) as RGB uint8; outside the image white."""
        lv = self._levels[level]
        ds = self.level_downsamples[level]
        x, y = int(math.floor(location[0] / ds)), int(math.floor(location[1] / ds))
        w, h = int(size[0]), int(size[1])
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lv.width), min(y + h, lv.height)
        if x1 <= x0 or y1 <= y0:
            return out
        if not lv.chunked:
            whole = self._whole_level(level)
            out[y0 - y:y1 - y, x0 - x:x1 - x] = whole[y0:y1, x0:x1]
            return out
        for sy in range(y0 // lv.seg_h, (y1 - 1) // lv.seg_h + 1):
            for sx in range(x0 // lv.seg_w, (x1 - 1) // lv.seg_w + 1):
                seg = self._segment(level, lv, sy * lv.across + sx)
                ox, oy = sx * lv.seg_w, sy * lv.seg_h
                ax, ay = max(x0, ox), max(y0, oy)
                bx, by = min(x1, ox + seg.shape[1]), min(y1, oy + seg.shape[0])
                if bx > ax and by > ay:
                    out[ay - y:by - y, ax - x:bx - x] = seg[ay - oy:by - oy, ax - ox:bx - ox]
        return out

    def read_region(self, location, level: int, size) -> np.ndarray:
        """As OpenSlide's, RGBA and transparent outside the slide, but an array (slidemil's readers take
        ``np.asarray`` of OpenSlide's PIL image)."""
        rgb = self.read_rgb(location, level, size)
        lv, ds = self._levels[level], self.level_downsamples[level]
        x, y = int(math.floor(location[0] / ds)), int(math.floor(location[1] / ds))
        alpha = np.zeros(rgb.shape[:2], np.uint8)
        alpha[max(0, -y):max(0, lv.height - y), max(0, -x):max(0, lv.width - x)] = 255
        return np.dstack([rgb, alpha])

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """As OpenSlide: the level with the largest downsample not above ``downsample`` (level 0 if none)."""
        below = [i for i, d in enumerate(self.level_downsamples) if d <= downsample]
        return max(below, key=lambda i: self.level_downsamples[i]) if below else 0

    def get_thumbnail(self, size) -> np.ndarray:
        """RGB array fitting in ``size`` (width, height), from the coarsest level not coarser than that."""
        factor = max(self.dimensions[0] / size[0], self.dimensions[1] / size[1], 1.0)
        level = max(i for i, d in enumerate(self.level_downsamples) if i == 0 or d <= factor)
        img = self.read_rgb((0, 0), level, self.level_dimensions[level])
        out = (max(1, round(self.dimensions[0] / factor)), max(1, round(self.dimensions[1] / factor)))
        return cv2.resize(img, out, interpolation=cv2.INTER_AREA)

    def close(self) -> None:
        self._finalizer()

    def _segment(self, level: int, lv: _Level, i: int) -> np.ndarray:
        key = (level, i)
        with self._lock:
            seg = self._cache.get(key)
            if seg is not None:
                self._cache.move_to_end(key)
                return seg
        seg = _to_rgb(lv.segment(i))
        with self._lock:
            if key not in self._cache:
                self._cache[key] = seg
                self._cache_bytes += seg.nbytes
            while self._cache_bytes > CACHE_BYTES and len(self._cache) > 1:
                self._cache_bytes -= self._cache.popitem(last=False)[1].nbytes
        return seg

    def _whole_level(self, level: int) -> np.ndarray:
        with self._lock:
            if level not in self._whole:
                lv = self._levels[level]
                logger.info("%s: level %d (%d x %d px) stored in separate planes: decoded whole",
                            self.path, level, lv.width, lv.height)
                arr = lv.series.asarray()
                axes = lv.series.axes
                if arr.ndim == 3 and axes[0] in "CS":  # planes first (CYX, SYX) -> YXC
                    arr = np.moveaxis(arr, 0, -1)
                self._whole[level] = _to_rgb(np.asarray(arr).reshape(lv.height, lv.width, -1))
            return self._whole[level]


def _close(fd: int, tif) -> None:
    os.close(fd)
    tif.close()


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """(H, W, S) uint8 as RGB: gray repeated, a fourth (alpha) or further channel dropped."""
    if arr.shape[-1] == 1:
        return np.ascontiguousarray(np.repeat(arr, 3, axis=-1))
    return np.ascontiguousarray(arr[..., :3])


def _area(series) -> int:
    page = series.keyframe
    return int(page.imagewidth) * int(page.imagelength)
