import cv2
import numpy as np
import openslide
import pytest

from slidemil.demo.render import make_slide
from slidemil.slides.reader import SlideError, open_slide, pick_level
import slidemil.tiling.tile as tiling
from slidemil.tiling.tile import TilingParams, is_tissue, load_tiles, tile_slide


def _flat(value):
    return np.full((256, 256, 3), value, np.uint8)


def test_background_rule_thresholds():
    p = TilingParams()
    rng = np.random.default_rng(0)
    white = np.clip(_flat(245) + rng.integers(-3, 4, (256, 256, 3)), 0, 255).astype(np.uint8)
    assert not is_tissue(white, p)                      # bright
    assert not is_tissue(_flat(150), p)                  # dark but flat: Sobel rule
    textured = rng.integers(60, 200, (256, 256, 3)).astype(np.uint8)
    assert is_tissue(textured, p)
    # Exactly the Sobel criterion: a half-textured, half-flat mid-gray tile has > 40 % flat pixels.
    half = textured.copy()
    half[:, :160] = 150
    assert not is_tissue(half, p)
    assert is_tissue(half, TilingParams(max_flat_fraction=0.7))


def test_cmu_small_region_keeps_tissue_drops_white(shared_slides, tmp_path):
    slide_path = shared_slides / "CMU-1-Small-Region.svs"
    out, qc = tmp_path / "cmu.h5", tmp_path / "cmu.png"
    summary = tile_slide(str(slide_path), str(out), str(qc), {"mpp": 0.5, "tile_px": 256})
    coords, attrs = load_tiles(str(out))
    assert attrs["level"] == 0 and attrs["tile_size_level0"] == 257  # 256 px * 0.5 / 0.499
    assert attrs["slide_mpp"] == pytest.approx(0.499)
    assert 20 <= len(coords) < summary["n_grid"]
    slide = openslide.OpenSlide(str(slide_path))
    p = TilingParams()
    kept = {tuple(c) for c in coords.tolist()}
    step = attrs["tile_size_level0"]
    w, h = slide.dimensions
    grays_kept, grays_dropped = [], []
    for y in range(0, h - step + 1, step):
        for x in range(0, w - step + 1, step):
            tile = np.asarray(slide.read_region((x, y), 0, (step, step)).convert("RGB"))
            gray = cv2.cvtColor(tile, cv2.COLOR_RGB2GRAY).mean()
            (grays_kept if (x, y) in kept else grays_dropped).append(gray)
            if (x, y) in kept:  # every kept tile passes the rule at full resolution
                assert is_tissue(cv2.resize(tile, (256, 256), interpolation=cv2.INTER_AREA), p)
    assert max(grays_kept) < 225                       # no white tile kept
    assert sum(g > 235 for g in grays_dropped) >= 20   # the white margins are dropped
    qc_img = cv2.imread(str(qc))
    assert qc_img.shape[0] == 1024
    green = (qc_img[..., 1] > 150) & (qc_img[..., 0] < 40) & (qc_img[..., 2] < 40)
    assert green.sum() > 100  # kept tiles are outlined


def test_demo_slide_reads_finer_level_and_resizes(tmp_path):
    path = tmp_path / "s.tiff"
    make_slide(str(path), label=0, seed=1, slide_px=(2048, 2048), mpp=0.25, objective_power=40)
    slide = openslide.OpenSlide(str(path))
    assert pick_level(slide, path, 0.25, 0.5) == 0       # 0.25 and 1.0 mpp levels: never upsample 1.0
    assert pick_level(slide, path, 0.25, 1.0) == 1
    tile_slide(str(path), str(tmp_path / "t.h5"), None, {"mpp": 0.5, "tile_px": 256})
    coords, attrs = load_tiles(str(tmp_path / "t.h5"))
    assert attrs["read_px"] == 512 and attrs["tile_size_level0"] == 512
    assert len(coords) > 0 and (coords % 512 == 0).all()


def test_blank_slide_gives_empty_valid_output(tmp_path, caplog):
    path = tmp_path / "blank.tiff"
    make_slide(str(path), label=0, seed=1, slide_px=(1024, 1024), tissue=False)
    out = tmp_path / "blank.h5"
    summary = tile_slide(str(path), str(out), str(tmp_path / "blank.png"), {}, on_error="exclude")
    coords, attrs = load_tiles(str(out))
    assert summary["n_tiles"] == 0 and coords.shape == (0, 2)
    assert "no tissue tiles" in caplog.text and "blank" in caplog.text
    assert "no tissue tiles" in attrs["excluded"]


def test_slide_without_mpp_fails_naming_slide_and_fix(tmp_path):
    path = tmp_path / "nompp.tiff"
    make_slide(str(path), label=0, seed=1, slide_px=(1024, 1024), mpp=None, objective_power=None)
    with pytest.raises(SlideError, match=r"nompp\.tiff.*'mpp' column"):
        tile_slide(str(path), str(tmp_path / "x.h5"), None, {}, on_error="fail")
    assert not (tmp_path / "x.h5").exists()
    # The sheet's mpp rescues it.
    tile_slide(str(path), str(tmp_path / "x.h5"), None, {}, mpp_override=0.5)
    assert (load_tiles(str(tmp_path / "x.h5"))[1]["mpp_source"]) == "sheet"


def test_upsampling_is_refused(tmp_path):
    path = tmp_path / "s.tiff"
    make_slide(str(path), label=0, seed=1, slide_px=(1024, 1024), mpp=0.5)
    with pytest.raises(SlideError, match="upsampled"):
        tile_slide(str(path), str(tmp_path / "x.h5"), None, {"mpp": 0.25})


@pytest.mark.parametrize("name, message", [
    ("unopenable.tiff", "OpenSlide cannot open"),
    ("unreadable.svs", "reading pixels"),
    ("broken.svs", "not a slide format"),
])
def test_bad_slides_give_clear_errors(shared_slides, tmp_path, name, message):
    path = shared_slides / "bad" / name
    out = tmp_path / "bad.h5"
    with pytest.raises(SlideError) as info:
        tile_slide(str(path), str(out), str(tmp_path / "bad.png"), {"mpp": 0.5, "tile_px": 8, "mask_min_fraction": 0})
    assert name in str(info.value) and message in str(info.value)
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_missing_file(tmp_path):
    with pytest.raises(SlideError, match="not found"):
        open_slide(tmp_path / "nope.svs")


def _is_tissue_float(tile_rgb, p):
    # The rule as published (Fu et al. 2020): float Sobel magnitude and means.
    gray = cv2.cvtColor(tile_rgb, cv2.COLOR_RGB2GRAY)
    if np.mean(gray > p.bright_threshold) > p.max_bright_fraction:
        return False
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    return bool(np.mean(0.5 * np.abs(gx) + 0.5 * np.abs(gy) <= p.sobel_threshold) < p.max_flat_fraction)


def test_integer_tissue_rule_decides_like_the_float_rule():
    """The fast integer form must make the very same decision, including right at the thresholds."""
    rng = np.random.default_rng(1)
    decisions = []
    for i in range(400):
        amp = [0, 3, 8, 15, 30, 60][i % 6]
        tile = np.clip(rng.integers(0, 256, 3) + rng.normal(0, amp, (256, 256, 3)), 0, 255).astype(np.uint8)
        if i % 3 == 0:
            tile = cv2.GaussianBlur(tile, (0, 0), 1 + i % 4)
        # Thresholds on both sides of 127.5, where the rule switches from uint8 to int32 magnitudes.
        p = TilingParams(sobel_threshold=float(rng.uniform(2, 50) if i % 4 else rng.uniform(120, 200)),
                         bright_threshold=int(rng.integers(120, 250)),
                         max_flat_fraction=float(rng.uniform(0.2, 0.9)), max_bright_fraction=float(rng.uniform(0.2, 0.8)))
        assert is_tissue(tile, p) == _is_tissue_float(tile, p), i
        decisions.append(is_tissue(tile, p))
    assert 0.1 < np.mean(decisions) < 0.9  # both outcomes were exercised


def _tile_with_reads(monkeypatch, path, out, params):
    """tile_slide, returning the (level, width, height) of every region it decoded and its tiles file."""
    reads = []
    for name in ("read_rgb", "read_gray"):
        original = getattr(tiling, name)

        def counting(slide, p, location, level, size, original=original):
            reads.append((level, *size, tuple(location)))
            return original(slide, p, location, level, size)
        monkeypatch.setattr(tiling, name, counting)
    tile_slide(str(path), str(out), None, params)
    monkeypatch.undo()
    return reads, load_tiles(str(out))


@pytest.mark.parametrize("mpp, power, expected_px", [(0.5, 20, 16), (0.25, 40, 32)])
def test_brightness_precheck_skips_white_candidates_and_keeps_the_same_tiles(tmp_path, monkeypatch, mpp, power,
                                                                            expected_px):
    path = tmp_path / "s.tiff"
    make_slide(str(path), label=1, seed=3, slide_px=(4096, 4096), mpp=mpp, objective_power=power)
    reads_on, (kept_on, attrs_on) = _tile_with_reads(monkeypatch, path, tmp_path / "on.h5", {})
    reads_off, (kept_off, attrs_off) = _tile_with_reads(monkeypatch, path, tmp_path / "off.h5",
                                                        {"precheck_brightness": False})
    np.testing.assert_array_equal(kept_on, kept_off)
    assert attrs_on["n_candidates"] == attrs_off["n_candidates"] == attrs_off["n_read"]
    assert attrs_on["n_tiles"] <= attrs_on["n_read"] < attrs_on["n_candidates"]
    tile_reads = [r for r in reads_on if r[0] == attrs_on["level"] and r[1] == attrs_on["read_px"]]
    assert len(tile_reads) == attrs_on["n_read"]
    # Besides tiles, whole levels are decoded, each at most once (mask and pre-check share one when it
    # suits both), the finest of them with the expected pixels per grid cell; and the doubtful candidates
    # are read once more each, 4x coarser per side than their tile, never one the overview already rejected.
    slide = openslide.OpenSlide(str(path))
    overview = [r for r in reads_on if r not in tile_reads and tuple(r[1:3]) == slide.level_dimensions[r[0]]]
    assert overview and len(set(overview)) == len(overview)
    check_level = min(r[0] for r in overview)
    step0 = attrs_on["tile_size_level0"]
    assert step0 / slide.level_downsamples[check_level] == pytest.approx(expected_px, rel=0.02)
    second_looks = [r for r in reads_on if r not in tile_reads and r not in overview]
    assert {r[:3] for r in second_looks} == {(check_level - 1, step0 // 4, step0 // 4)}
    looked_twice = [r[3] for r in second_looks]
    assert len(set(looked_twice)) == len(looked_twice) < attrs_on["n_read"]
    assert set(looked_twice) - {r[3] for r in tile_reads}  # some were dropped on that second look


def test_slide_without_pyramid_uses_its_thumbnail_not_a_whole_decode(shared_slides, tmp_path, monkeypatch):
    """CMU-1-Small-Region has one level; its Aperio thumbnail serves the mask and the pre-check."""
    path = shared_slides / "CMU-1-Small-Region.svs"
    reads, (kept, attrs) = _tile_with_reads(monkeypatch, path, tmp_path / "on.h5", {})
    assert {r[1:3] for r in reads} == {(257, 257)}  # tiles only: level 0 was never decoded whole
    assert attrs["n_tiles"] <= attrs["n_read"] < attrs["n_candidates"]
    # The same tiles as the rule applied to every candidate of a full-resolution mask.
    monkeypatch.setattr(tiling, "overview_sources", lambda slide: {0: 1.0})
    _, (kept_full, attrs_full) = _tile_with_reads(monkeypatch, path, tmp_path / "full.h5",
                                                  {"precheck_brightness": False})
    np.testing.assert_array_equal(kept, kept_full)
    assert attrs_full["n_candidates"] == attrs["n_candidates"]


class _FakeSlide:
    def __init__(self, dims, downsamples, props):
        self.dimensions, self.level_downsamples, self.properties = dims, downsamples, props


def test_overview_sources_trust_only_an_aperio_thumbnail_of_the_scanned_area():
    props = {"openslide.vendor": "aperio", "openslide.associated.thumbnail.width": "574",
             "openslide.associated.thumbnail.height": "768"}
    sources = tiling.overview_sources(_FakeSlide((2220, 2967), (1.0,), props))
    assert sources[0] == 1.0 and sources["thumbnail"] == pytest.approx(3.866, abs=1e-3)
    # A macro photo of the whole glass has another shape; other vendors' thumbnails are not trusted.
    wide = {**props, "openslide.associated.thumbnail.width": "1280"}
    assert "thumbnail" not in tiling.overview_sources(_FakeSlide((2220, 2967), (1.0,), wide))
    other = {**props, "openslide.vendor": "hamamatsu"}
    assert "thumbnail" not in tiling.overview_sources(_FakeSlide((2220, 2967), (1.0,), other))


def test_precheck_overview_is_fine_enough_and_cheap_enough():
    pyramid = {0: 1.0, 1: 4.0, 2: 16.0, 3: 64.0}
    dims = (40960, 40960)
    # 40x slide, 512 px cells: level 2 gives exactly 32 px per cell.
    assert tiling.pick_check_source(pyramid, dims, 512, 1600 * 512 ** 2) == 2
    # 20x slide, 256 px cells: level 1 (64 px) and level 2 (16 px) are as far from 32; the cheaper wins.
    assert tiling.pick_check_source(pyramid, dims, 256, 1600 * 256 ** 2) == 2
    # Too few candidates for any overview to pay for itself.
    assert tiling.pick_check_source(pyramid, dims, 512, 4 * 512 ** 2) is None
    # Only level 0 and a coarse level: nothing between 16 px per cell and a whole-slide decode.
    assert tiling.pick_check_source({0: 1.0, 1: 64.0}, dims, 512, 1600 * 512 ** 2) is None
    assert tiling.pick_source(pyramid, 64.0) == 3 and tiling.pick_source(pyramid, 63.9) == 2
    assert tiling.pick_source({0: 1.0, "thumbnail": 3.87}, 32.0) == "thumbnail"
    # The second look: finer than the overview, at least 4x coarser per side than the tile level.
    levels = (1.0, 4.0, 16.0, 64.0)
    assert tiling.pick_refine_level(levels, 0, 16.0, 512) == 1
    assert tiling.pick_refine_level(levels, 0, 4.0, 512) is None    # the overview is that level already
    assert tiling.pick_refine_level(levels, 1, 64.0, 1024) == 2     # tiles read at level 1
    assert tiling.pick_refine_level((1.0, 2.0, 8.0), 0, 32.0, 512) == 2
    assert tiling.pick_refine_level((1.0, 2.0), 0, 16.0, 512) is None  # level 1 is not coarse enough


def test_precheck_setting_must_be_a_boolean(tmp_path):
    with pytest.raises(ValueError, match="precheck_brightness"):
        TilingParams.from_dict({"precheck_brightness": "no"})
    path = tmp_path / "s.tiff"
    make_slide(str(path), label=0, seed=1, slide_px=(1024, 1024))
    tiling.main([str(path), "--out", str(tmp_path / "t.h5"), "--precheck-brightness", "false"])
    attrs = load_tiles(str(tmp_path / "t.h5"))[1]
    assert attrs["n_read"] == attrs["n_candidates"]


def test_transparent_pixels_read_as_white(tmp_path):
    from slidemil.slides.reader import read_rgb

    path = tmp_path / "s.tiff"
    make_slide(path, label=0, seed=0, slide_px=(512, 512))
    slide = open_slide(path)
    # Half of this region lies outside the scan: OpenSlide returns it transparent.
    rgb = read_rgb(slide, path, (256, 256), 0, (512, 512))
    assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8
    assert (rgb[256:, :] == 255).all() and (rgb[:, 256:] == 255).all()
    inside = np.asarray(slide.read_region((256, 256), 0, (256, 256)))[..., :3]
    np.testing.assert_array_equal(rgb[:256, :256], inside)

    from slidemil.slides.reader import read_gray

    gray = read_gray(slide, path, (256, 256), 0, (512, 512))
    np.testing.assert_array_equal(gray, cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))


def test_direct_reads_match_openslides_public_read(shared_slides, monkeypatch):
    """The shortcut past openslide-python's image conversion gives the same pixels as its read_region."""
    from slidemil.slides import reader as slides, tiffjpeg

    monkeypatch.setattr(tiffjpeg, "ENABLED", False)  # OpenSlide's own reading is the one under test
    path = shared_slides / "CMU-1-Small-Region.svs"
    slide = open_slide(path)
    w, h = slide.dimensions
    for x, y, size in ((0, 0, 257), (1000, 1500, 300), (w - 240, h - 500, 240), (513, 77, 1024)):
        assert slides._read_opaque_bgra(slide, path, (x, y), 0, (size, size)) is not None  # the shortcut is taken
        public = np.asarray(slide.read_region((x, y), 0, (size, size)))
        assert (public[..., 3] == 255).all()
        np.testing.assert_array_equal(slides.read_rgb(slide, path, (x, y), 0, (size, size)), public[..., :3])
        np.testing.assert_array_equal(slides.read_gray(slide, path, (x, y), 0, (size, size)),
                                      cv2.cvtColor(public, cv2.COLOR_RGBA2GRAY))
    np.testing.assert_array_equal(slides.read_thumbnail(slide, path),
                                  np.asarray(slide.associated_images["thumbnail"])[..., :3])
    # Past the scanned area the pixels are transparent: the public conversion (and white) takes over.
    assert slides._read_opaque_bgra(slide, path, (w - 100, 0), 0, (200, 200)) is None
    assert (slides.read_gray(slide, path, (w - 100, 0), 0, (200, 200))[:, 100:] == 255).all()


def test_direct_read_takes_the_buffer_only_when_every_pixel_is_opaque():
    """One pixel short of opaque anywhere (any colour) sends the region to the public conversion."""
    import ctypes

    from slidemil.slides import reader as slides

    def filler(alpha_at=None, alpha=254):
        def fill(ptr):
            buf = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint8)), shape=(5, 7, 4))
            buf[...] = 255  # opaque white, the largest word there is
            buf[..., :3] = np.arange(5 * 7 * 3).reshape(5, 7, 3)
            if alpha_at is not None:
                buf[alpha_at + (3,)] = alpha
        return fill

    opaque = slides._opaque_bgra(7, 5, filler())
    assert opaque is not None and opaque.shape == (5, 7, 4) and (opaque[..., 3] == 255).all()
    for where in ((0, 0), (2, 3), (4, 6)):
        for alpha in (0, 1, 254):
            assert slides._opaque_bgra(7, 5, filler(where, alpha)) is None, (where, alpha)


def test_direct_read_errors_name_the_slide(shared_slides):
    from slidemil.slides import reader as slides

    path = shared_slides / "bad" / "unreadable.svs"
    slide = open_slide(path)
    with pytest.raises(SlideError, match="unreadable.svs.*reading pixels"):
        slides.read_gray(slide, path, (0, 0), 0, (256, 256))


def test_resize_tile_is_area_averaging_and_close_to_it_between_whole_factors():
    from slidemil.slides.reader import resize_tile

    rng = np.random.default_rng(0)
    tissue = cv2.GaussianBlur(rng.integers(0, 256, (1030, 1030, 3), dtype=np.uint8), (0, 0), 1.5)
    for img in (cv2.cvtColor(tissue, cv2.COLOR_RGB2GRAY), tissue):  # the rule's gray tile, the model's RGB tile
        # Whole factors: exactly OpenCV's area averaging.
        for n, px in ((512, 256), (1024, 256), (448, 224), (256, 64)):
            np.testing.assert_array_equal(resize_tile(img[:n, :n], px),
                                          cv2.resize(img[:n, :n], (px, px), interpolation=cv2.INTER_AREA))
        np.testing.assert_array_equal(resize_tile(img[:256, :256], 256), img[:256, :256])
        # 0.499 and 0.2527 mpp scans (257 and 507 px reads) to the rule's 256 and the models' 224 px,
        # and a small upsampling within the mpp tolerance.
        for n, px in ((257, 256), (507, 256), (1030, 256), (250, 256), (257, 224), (512, 224), (507, 224)):
            fast = resize_tile(img[:n, :n], px)
            ref = cv2.resize(img[:n, :n], (px, px), interpolation=cv2.INTER_AREA if n > px else cv2.INTER_LINEAR)
            assert fast.shape == ref.shape and fast.dtype == np.uint8
            diff = np.abs(fast.astype(int) - ref)
            assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 8, (n, px)


def test_reads_fall_back_to_the_public_call_if_openslide_python_changes(shared_slides, monkeypatch, caplog):
    import ctypes

    from slidemil.slides import reader as slides

    from slidemil.slides import tiffjpeg

    monkeypatch.setattr(tiffjpeg, "ENABLED", False)  # the OpenSlide path is the one under test
    path = shared_slides / "CMU-1-Small-Region.svs"
    slide = open_slide(path)
    expected = slides.read_gray(slide, path, (300, 400), 0, (257, 257))

    def changed_signature(*args):
        raise ctypes.ArgumentError("argument 2: wrong type")
    monkeypatch.setattr(slides, "_RAW_READ_ASSOCIATED", slides._RAW_READ_ASSOCIATED)  # restored afterwards
    monkeypatch.setattr(slides, "_RAW_READ", changed_signature)
    np.testing.assert_array_equal(slides.read_gray(slide, path, (300, 400), 0, (257, 257)), expected)
    assert slides._RAW_READ is None and slides._RAW_READ_ASSOCIATED is None  # not tried again
    assert "public read_region" in caplog.text
    assert slides.read_thumbnail(slide, path).shape == (768, 574, 3)
