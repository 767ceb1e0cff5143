"""Regions of JPEG-tiled TIFF slides (Aperio SVS, generic tiled TIFF) decoded without OpenSlide's drawing.

OpenSlide decodes each JPEG tile with libjpeg-turbo and then paints it onto a premultiplied-ARGB canvas with
cairo; on the machines measured that painting costs two to three times the decode itself (a 256 px tile:
0.4 ms to decode, 1.5-2 ms through ``read_region``). Reading a tile's bytes with ``os.pread`` and decoding
them with OpenCV's libjpeg-turbo gives the same pixels for a fraction of the cost. Which tiles make up a
level comes from tifffile; OpenSlide still opens the slide, reads its metadata and serves everything this
module declines:
- any vendor other than "aperio" and "generic-tiff", any level that is not 8-bit 3-channel JPEG tiles;
- a region that is not wholly inside its level, or not on whole pixels of that level;
- a missing tile (no bytes), or a tile that does not decode to the tile's size;
- a slide whose test tile does not decode to exactly OpenSlide's pixels (checked once per slide).

It can also decode at 1/2, 1/4 or 1/8 scale (``scale``): libjpeg-turbo then runs a smaller inverse DCT on each
8 x 8 block instead of decoding every pixel and averaging them afterwards. On CMU-1's tiles that is 1.3x faster
at 1/2 scale and 1.65x at 1/4 (Huffman decoding costs the same at every scale), and within 0.2 gray levels on
average of the full decode followed by area averaging.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import weakref

import cv2
import numpy as np
import openslide

logger = logging.getLogger(__name__)

VENDORS = ("aperio", "generic-tiff")
ENABLED = True  # False: OpenSlide reads everything (tests of the OpenSlide path, comparisons)
# Decoded tiles kept per process, all slides together: neighbouring regions share tiles, and a 40,960 px slide's
# rows of 256 px tiles (160 tiles, 30 MiB) fit twice, so a grid that does not line up with the tiles decodes
# each tile about once. The budget is per process: each DataLoader worker has its own.
CACHE_BYTES = 64 << 20
# An Adobe APP14 marker with transform 0: the JPEG's three components are R, G, B, not YCbCr. TIFF says so in
# its photometric tag (Aperio writes RGB JPEG tiles), but a bare JPEG stream cannot, so the decoder is told here.
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
_DECODE_FLAGS = {scale: flag | cv2.IMREAD_IGNORE_ORIENTATION for scale, flag in (
    (1, cv2.IMREAD_COLOR), (2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4),
    (8, cv2.IMREAD_REDUCED_COLOR_8))}
SCALES = tuple(_DECODE_FLAGS)

_readers: "weakref.WeakKeyDictionary[openslide.OpenSlide, TiffJpegReader | None]" = weakref.WeakKeyDictionary()
_readers_lock = threading.Lock()
_cache: collections.OrderedDict = collections.OrderedDict()  # (reader number, level, scale, tx, ty) -> BGR tile
_cache_bytes = 0
_cache_lock = threading.Lock()
_numbers = itertools.count()  # not id(): a new reader could reuse a dead one's id and find its tiles


class _Level:
    def __init__(self, page, rgb_photometric: bool):
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.tile_w, self.tile_h = int(page.tilewidth), int(page.tilelength)
        self.tiles_across = -(-self.width // self.tile_w)
        self.offsets, self.counts = page.dataoffsets, page.databytecounts
        tables = page.jpegtables
        # A tile is an abbreviated JPEG stream: SOI, then scans; the shared tables go in after its SOI.
        head = b"\xff\xd8" + (_ADOBE_RGB if rgb_photometric else b"")
        self.head = head + (bytes(tables)[2:-2] if tables else b"")


class TiffJpegReader:
    """A slide's JPEG-tiled levels, read straight from the file."""

    def __init__(self, path: str, levels: dict[int, _Level], downsamples):
        self.path = path
        self.levels = levels
        self.downsamples = [float(d) for d in downsamples]
        self._fd = os.open(path, os.O_RDONLY)
        self._finalizer = weakref.finalize(self, os.close, self._fd)
        self.number = next(_numbers)

    @classmethod
    def open(cls, slide: openslide.OpenSlide, path) -> "TiffJpegReader | None":
        """The reader, or None where OpenSlide must do the reading (see the module's list)."""
        props = slide.properties
        if props.get(openslide.PROPERTY_NAME_VENDOR) not in VENDORS:
            return None
        try:
            import tifffile

            with tifffile.TiffFile(str(path)) as tif:
                pages = [p for p in tif.pages if p.is_tiled]
                levels = {}
                for k, dims in enumerate(slide.level_dimensions):
                    page = next((p for p in pages if (p.imagewidth, p.imagelength) == tuple(dims)), None)
                    if page is not None and _usable(page):
                        levels[k] = _Level(page, page.photometric == tifffile.PHOTOMETRIC.RGB)
        except Exception as err:  # noqa: BLE001 - any trouble here only means OpenSlide reads this slide
            logger.debug("%s: read through OpenSlide (%s)", path, err)
            return None
        if not levels:
            return None
        reader = cls(str(path), levels, slide.level_downsamples)
        try:
            return reader if reader._matches_openslide(slide) else None
        except openslide.OpenSlideError:  # a broken slide: OpenSlide reports it, with the slide's name, when read
            return None

    def read_bgr(self, location, level: int, size, scale: int = 1) -> np.ndarray | None:
        """The region (level-0 top-left, level, size in level pixels) as BGR uint8 at 1/``scale`` of the level's
        resolution, or None if OpenSlide must read it (and, for ``scale`` > 1, the caller must downscale)."""
        lv = self.levels.get(level)
        if lv is None or scale not in _DECODE_FLAGS:
            return None
        w, h = int(size[0]), int(size[1])
        ds = self.downsamples[level]
        fx, fy = location[0] / ds, location[1] / ds
        x, y = int(round(fx)), int(round(fy))
        # OpenSlide resamples regions that start between a level's pixels; only whole pixels are copied here.
        if abs(fx - x) > 1e-6 or abs(fy - y) > 1e-6 or w <= 0 or h <= 0 or x < 0 or y < 0 \
                or x + w > lv.width or y + h > lv.height:
            return None
        # A scaled region must map onto whole output pixels of whole scaled tiles.
        if (x | y | w | h | lv.tile_w | lv.tile_h) % scale:
            return None
        tw, th = lv.tile_w // scale, lv.tile_h // scale
        x, y, w, h = x // scale, y // scale, w // scale, h // scale
        out = np.empty((h, w, 3), np.uint8)
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                tile = self._tile(level, lv, tx, ty, scale)
                if tile is None:
                    return None
                x0, y0 = tx * tw, ty * th
                sx, sy = max(x, x0), max(y, y0)
                ex, ey = min(x + w, x0 + tw), min(y + h, y0 + th)
                out[sy - y:ey - y, sx - x:ex - x] = tile[sy - y0:ey - y0, sx - x0:ex - x0]
        return out

    def _tile(self, level: int, lv: _Level, tx: int, ty: int, scale: int = 1) -> np.ndarray | None:
        global _cache_bytes
        key = (self.number, level, scale, tx, ty)
        with _cache_lock:
            tile = _cache.get(key)
            if tile is not None:
                _cache.move_to_end(key)
                return tile
        i = ty * lv.tiles_across + tx
        count = int(lv.counts[i])
        if count <= 2:  # a missing tile: OpenSlide knows how to show it
            return None
        try:
            data = os.pread(self._fd, count, int(lv.offsets[i]))
        except OSError:  # OpenSlide reads it again and reports the failure with the slide's name
            return None
        if data[:2] != b"\xff\xd8":
            return None
        try:
            tile = cv2.imdecode(np.frombuffer(lv.head + data[2:], np.uint8), _DECODE_FLAGS[scale])
        except cv2.error:
            return None
        if tile is None or tile.shape != (lv.tile_h // scale, lv.tile_w // scale, 3):
            return None
        with _cache_lock:
            if key not in _cache:
                _cache[key] = tile
                _cache_bytes += tile.nbytes
            while _cache_bytes > CACHE_BYTES and _cache:
                _cache_bytes -= _cache.popitem(last=False)[1].nbytes
        return tile

    def _matches_openslide(self, slide: openslide.OpenSlide) -> bool:
        """Whether a tile of each level decodes to exactly OpenSlide's pixels (colour space, tables, decoder)."""
        for level, lv in self.levels.items():
            tx, ty = (lv.tiles_across - 1) // 2, (-(-lv.height // lv.tile_h) - 1) // 2
            w, h = min(lv.tile_w, lv.width - tx * lv.tile_w), min(lv.tile_h, lv.height - ty * lv.tile_h)
            ds = self.downsamples[level]
            loc = (int(round(tx * lv.tile_w * ds)), int(round(ty * lv.tile_h * ds)))
            ours = self.read_bgr(loc, level, (w, h))
            theirs = np.asarray(slide.read_region(loc, level, (w, h)))
            if ours is None or (theirs[..., 3] != 255).any() \
                    or not np.array_equal(ours, cv2.cvtColor(theirs, cv2.COLOR_RGBA2BGR)):
                logger.info("%s: level %d read through OpenSlide (its tiles decode differently here)", self.path, level)
                return False
        return True


def _usable(page) -> bool:
    import tifffile

    return (page.compression == tifffile.COMPRESSION.JPEG and page.samplesperpixel == 3 and page.bitspersample == 8
            and page.planarconfig == tifffile.PLANARCONFIG.CONTIG and page.tilewidth > 0 and page.tilelength > 0
            and page.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
            and len(page.dataoffsets) == -(-page.imagewidth // page.tilewidth) * -(-page.imagelength // page.tilelength))


def reader_for(slide: openslide.OpenSlide, path) -> TiffJpegReader | None:
    """The slide's reader, made on first use in this process (each DataLoader worker makes its own)."""
    if not ENABLED or not isinstance(slide, openslide.OpenSlide):
        return None
    try:
        return _readers[slide]
    except KeyError:
        pass
    with _readers_lock:
        if slide not in _readers:
            _readers[slide] = TiffJpegReader.open(slide, path)
        return _readers[slide]
