"""Reading JPEG-tiled TIFF slides past OpenSlide's drawing: the same pixels, or OpenSlide does the reading."""

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from slidemil.slides import reader as slides, tiffjpeg
from slidemil.demo.render import make_slide
from slidemil.slides.reader import open_slide, read_gray, read_rgb


def _regions(slide, rng, n_per_level=12):
    """Random regions wholly inside each level, some touching its right and bottom edges."""
    for level, (w, h) in enumerate(slide.level_dimensions):
        ds = slide.level_downsamples[level]
        for i in range(n_per_level):
            size = int(rng.integers(1, min(600, w, h) + 1))
            x = w - size if i % 4 == 0 else int(rng.integers(0, w - size + 1))
            y = h - size if i % 4 == 1 else int(rng.integers(0, h - size + 1))
            yield (int(round(x * ds)), int(round(y * ds))), level, (size, size)


def _assert_same_as_openslide(slide, path, rng):
    reader = tiffjpeg.reader_for(slide, path)
    assert reader is not None
    for loc, level, size in _regions(slide, rng):
        bgr = reader.read_bgr(loc, level, size)
        assert bgr is not None, (loc, level, size)  # wholly inside the level: read here, not by OpenSlide
        public = np.asarray(slide.read_region(loc, level, size))
        assert (public[..., 3] == 255).all()
        np.testing.assert_array_equal(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), public[..., :3])
        np.testing.assert_array_equal(read_rgb(slide, path, loc, level, size), public[..., :3])
        np.testing.assert_array_equal(read_gray(slide, path, loc, level, size),
                                      cv2.cvtColor(public, cv2.COLOR_RGBA2GRAY))


def test_aperio_rgb_jpeg_tiles_read_as_openslide_does(shared_slides):
    # CMU-1: Aperio, 240 px tiles, shared JPEG tables, components stored as RGB (not YCbCr).
    path = shared_slides / "CMU-1-Small-Region.svs"
    _assert_same_as_openslide(open_slide(path), path, np.random.default_rng(0))


def test_pyramid_of_ycbcr_jpeg_tiles_read_as_openslide_does(tmp_path):
    path = tmp_path / "s.tiff"
    make_slide(path, label=1, seed=3, slide_px=(2048, 1536))
    slide = open_slide(path)
    assert slide.level_count >= 3
    _assert_same_as_openslide(slide, path, np.random.default_rng(1))


def test_regions_openslide_must_draw_are_left_to_it(tmp_path):
    path = tmp_path / "s.tiff"
    make_slide(path, label=0, seed=0, slide_px=(1024, 1024))
    slide = open_slide(path)
    reader = tiffjpeg.reader_for(slide, path)
    ds = slide.level_downsamples[1]
    assert reader.read_bgr((900, 0), 0, (200, 100)) is None  # past the right edge: transparent there
    assert reader.read_bgr((-1, 0), 0, (10, 10)) is None
    assert reader.read_bgr((1, 0), 1, (10, 10)) is None  # between level-1 pixels: OpenSlide resamples
    assert reader.read_bgr((int(ds), 0), 1, (10, 10)) is not None
    assert reader.read_bgr((0, 0), slide.level_count, (10, 10)) is None  # no such level
    # A missing tile (no bytes in the file) is OpenSlide's to show.
    level0 = reader.levels[0]
    level0.counts = np.array(level0.counts)
    level0.counts[0] = 0
    tiffjpeg._cache.clear()
    tiffjpeg._cache_bytes = 0
    assert reader.read_bgr((0, 0), 0, (10, 10)) is None
    assert reader.read_bgr((level0.tile_w, 0), 0, (10, 10)) is not None
    # Through read_rgb the declined regions still come out right: white outside the scan.
    rgb = read_rgb(slide, path, (900, 0), 0, (200, 100))
    assert (rgb[:, 124:] == 255).all()
    np.testing.assert_array_equal(rgb[:, :124], np.asarray(slide.read_region((900, 0), 0, (124, 100)))[..., :3])


def test_slides_not_made_of_jpeg_tiles_are_read_by_openslide(shared_slides):
    path = shared_slides / "boxes.tiff"  # generic TIFF, deflate-compressed tiles
    assert tiffjpeg.reader_for(open_slide(path), path) is None
    np.testing.assert_array_equal(read_rgb(open_slide(path), path, (10, 10), 0, (64, 64)),
                                  np.asarray(open_slide(path).read_region((10, 10), 0, (64, 64)))[..., :3])


def test_a_slide_whose_tiles_decode_differently_is_read_by_openslide(shared_slides, monkeypatch):
    # Without the marker that says "RGB", Aperio's tiles decode as YCbCr: wrong colours, caught at opening.
    monkeypatch.setattr(tiffjpeg, "_ADOBE_RGB", b"")
    path = shared_slides / "CMU-1-Small-Region.svs"
    slide = open_slide(path)
    assert tiffjpeg.reader_for(slide, path) is None
    np.testing.assert_array_equal(read_rgb(slide, path, (100, 200), 0, (300, 300)),
                                  np.asarray(slide.read_region((100, 200), 0, (300, 300)))[..., :3])


def test_broken_slides_still_fail_with_the_slides_name(shared_slides):
    path = shared_slides / "bad" / "unreadable.svs"
    slide = open_slide(path)
    assert tiffjpeg.reader_for(slide, path) is None
    with pytest.raises(slides.SlideError, match="unreadable.svs"):
        read_rgb(slide, path, (0, 0), 0, (16, 16))


def test_threads_share_one_reader(shared_slides, monkeypatch):
    path = shared_slides / "CMU-1-Small-Region.svs"
    slide = open_slide(path)
    rng = np.random.default_rng(2)
    spots = [(int(x), int(y)) for x, y in zip(rng.integers(0, 1900, 64), rng.integers(0, 2600, 64))]
    monkeypatch.setattr(tiffjpeg, "CACHE_BYTES", 8 * 240 * 240 * 3)  # 8 tiles: they come and go under the threads
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda xy: read_gray(slide, path, xy, 0, (300, 300)), spots))
    assert tiffjpeg._cache_bytes <= tiffjpeg.CACHE_BYTES
    for xy, gray in zip(spots, got):
        expected = cv2.cvtColor(np.asarray(slide.read_region(xy, 0, (300, 300))), cv2.COLOR_RGBA2GRAY)
        np.testing.assert_array_equal(gray, expected)


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_scaled_decoding_matches_area_averaging(shared_slides, scale):
    # libjpeg-turbo's reduced inverse DCT: a low-pass and subsample of each 8 x 8 block, so it must agree with
    # decoding every pixel and area-averaging, up to rounding and block edges (not byte for byte).
    path = shared_slides / "CMU-1-Small-Region.svs"
    slide = open_slide(path)
    reader = tiffjpeg.reader_for(slide, path)
    rng = np.random.default_rng(scale)
    for _ in range(8):
        size = 64 * int(rng.integers(1, 9))
        x = scale * int(rng.integers(0, (2220 - size) // scale))
        y = scale * int(rng.integers(0, (2967 - size) // scale))
        scaled = read_rgb(slide, path, (x, y), 0, (size, size), scale)
        assert scaled.shape == (size // scale, size // scale, 3)
        np.testing.assert_array_equal(scaled, cv2.cvtColor(reader.read_bgr((x, y), 0, (size, size), scale),
                                                          cv2.COLOR_BGR2RGB))
        area = cv2.resize(np.asarray(slide.read_region((x, y), 0, (size, size)))[..., :3],
                          (size // scale, size // scale), interpolation=cv2.INTER_AREA)
        diff = np.abs(scaled.astype(int) - area)
        assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 4, (x, y, size, diff.mean())


def test_scaled_reads_openslide_must_serve_are_area_averaged(tmp_path):
    path = tmp_path / "s.tiff"
    make_slide(path, label=1, seed=5, slide_px=(1024, 1024))
    slide = open_slide(path)
    reader = tiffjpeg.reader_for(slide, path)
    assert reader.read_bgr((2, 0), 0, (64, 64), 4) is None  # not on the 1/4 grid
    assert reader.read_bgr((0, 0), 0, (66, 64), 4) is None
    assert reader.read_bgr((0, 0), 0, (64, 64), 3) is None
    # Declined by the reader (off the grid, past the edge): read whole, then area-averaged, the same size.
    for loc, size in [((2, 6), (64, 64)), ((960, 0), (128, 64))]:
        got = read_rgb(slide, path, loc, 0, size, 4)
        full = read_rgb(slide, path, loc, 0, size)
        np.testing.assert_array_equal(got, cv2.resize(full, (size[0] // 4, size[1] // 4),
                                                      interpolation=cv2.INTER_AREA))
    with pytest.raises(ValueError, match="1/4"):
        read_rgb(slide, path, (0, 0), 0, (66, 64), 4)


def test_decode_scale_keeps_at_least_the_input_size():
    assert slides.decode_scale(512, 224) == 2  # 40x scan, 256 px tiles at 0.5 mpp
    assert slides.decode_scale(256, 224) == 1
    assert slides.decode_scale(1024, 224) == 4
    assert slides.decode_scale(514, 128) == 2  # 257 is the largest whole share
    assert slides.decode_scale(4096, 128) == 8
    assert slides.decode_scale(100, 224) == 1
