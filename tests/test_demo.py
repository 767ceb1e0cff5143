"""Tests of the synthetic cohort generator (slidemil.demo.render).

Slides are kept small (<= 2048 px) so the whole file runs in seconds. The
background rule is re-implemented here from its written definition rather
than imported, so a drift in the library's copy would show up.
"""

from __future__ import annotations

import cv2
import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile

from slidemil.demo import render as demo

TILE = 256
SLIDE_PX = (2048, 2048)


def keeps_tile(rgb_tile: np.ndarray) -> bool:
    """Downstream background rule: True when the tile counts as tissue."""
    gray = cv2.cvtColor(np.ascontiguousarray(rgb_tile), cv2.COLOR_RGB2GRAY)
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    g = 0.5 * np.abs(gx) + 0.5 * np.abs(gy)
    return bool(np.mean(g <= 20) < 0.60 and np.mean(gray > 240) <= 0.50)


def tiles(rgb: np.ndarray):
    """(row, col, tile) for every complete TILE x TILE tile."""
    for r in range(rgb.shape[0] // TILE):
        for c in range(rgb.shape[1] // TILE):
            yield r, c, rgb[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE]


def tile_fraction(mask: np.ndarray, r: int, c: int) -> float:
    return float(mask[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE].mean())


def read_level0(path) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as slide:
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))


# ---------------------------------------------------------------- planning


def test_plan_cohort_is_deterministic_and_well_formed():
    plan = demo.plan_cohort(12, seed=3)
    pd.testing.assert_frame_equal(plan, demo.plan_cohort(12, seed=3))
    assert not plan.equals(demo.plan_cohort(12, seed=4))

    assert list(plan.columns) == ["slide_id", "patient_id", "path", "label"]
    assert plan.patient_id.nunique() == 12
    assert plan.slide_id.is_unique
    per_patient = plan.groupby("patient_id").slide_id.count()
    assert set(per_patient) == {1, 2}  # 30 % of 12 patients have two slides
    assert (plan.groupby("patient_id").label.nunique() == 1).all()
    assert set(plan.label) == {0, 1}
    assert plan.label.dtype.kind == "i"
    assert (plan.path == "slides/" + plan.slide_id + ".tiff").all()
    assert plan.slide_id.str.match(r"^DEMO-P\d{3}-S[12]$").all()
    assert (plan.slide_id.str.rsplit("-", n=1).str[0] == plan.patient_id).all()


def test_plan_cohort_keeps_both_classes_and_rejects_bad_input():
    # Even extreme fractions leave one patient in the minority class.
    plan = demo.plan_cohort(5, seed=0, positive_fraction=0.99, two_slide_fraction=0.0)
    assert set(plan.label) == {0, 1}
    assert len(plan) == 5
    with pytest.raises(ValueError):
        demo.plan_cohort(1, seed=0)
    with pytest.raises(ValueError):
        demo.plan_cohort(4, seed=0, positive_fraction=1.0)


# ---------------------------------------------------------------- cohort


def test_make_cohort_writes_slides_and_the_planned_sheet(tmp_path):
    table = demo.make_cohort(tmp_path, n_patients=3, seed=11, slide_px=(768, 512), two_slide_fraction=0.5)
    plan = demo.plan_cohort(3, seed=11, two_slide_fraction=0.5)
    pd.testing.assert_frame_equal(table, plan)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "samples.csv"), plan)
    for rel in plan.path:
        with openslide.OpenSlide(str(tmp_path / rel)) as slide:
            assert slide.dimensions == (768, 512)
    # Atomic writes leave no temporaries behind.
    leftovers = [p.name for p in tmp_path.rglob(".*")]
    assert leftovers == []


def test_slide_pixels_are_reproducible_per_slide(tmp_path):
    kwargs = dict(label=1, seed=5, slide_px=(1024, 768))
    demo.make_slide(tmp_path / "a" / "DEMO-P001-S1.tiff", **kwargs)
    demo.make_slide(tmp_path / "b" / "DEMO-P001-S1.tiff", **kwargs)
    demo.make_slide(tmp_path / "c" / "DEMO-P001-S1.tiff", **{**kwargs, "seed": 6})
    demo.make_slide(tmp_path / "d" / "DEMO-P002-S1.tiff", **kwargs)
    a = read_level0(tmp_path / "a" / "DEMO-P001-S1.tiff")
    np.testing.assert_array_equal(a, read_level0(tmp_path / "b" / "DEMO-P001-S1.tiff"))
    # Seed and slide id both enter the pixels.
    assert not np.array_equal(a, read_level0(tmp_path / "c" / "DEMO-P001-S1.tiff"))
    assert not np.array_equal(a, read_level0(tmp_path / "d" / "DEMO-P002-S1.tiff"))


def test_cohort_slide_matches_a_slide_made_alone(tmp_path):
    settings = dict(n_patients=2, seed=2, slide_px=(512, 512), two_slide_fraction=0.0)
    plan = demo.make_cohort(tmp_path / "cohort", **settings)
    row = plan.iloc[1]
    alone = tmp_path / "alone" / f"{row.slide_id}.tiff"
    demo.write_pyramidal_tiff(alone, demo.render_cohort_slide(settings, row.slide_id)[0], 0.5, 20)
    np.testing.assert_array_equal(read_level0(tmp_path / "cohort" / row.path), read_level0(alone))


def test_process_pool_gives_the_same_slides(tmp_path):
    kwargs = dict(n_patients=2, seed=4, slide_px=(512, 512), two_slide_fraction=0.5)
    plan = demo.make_cohort(tmp_path / "serial", workers=1, **kwargs)
    pd.testing.assert_frame_equal(demo.make_cohort(tmp_path / "pool", workers=2, **kwargs), plan)
    for rel in plan.path:
        np.testing.assert_array_equal(read_level0(tmp_path / "serial" / rel), read_level0(tmp_path / "pool" / rel))


# ---------------------------------------------------------------- file format


def test_pyramid_writer_is_read_by_openslide(tmp_path):
    # Flat colour patches (H&E-like and primaries) over a smooth gradient;
    # sizes that are not multiples of the tile or of the downsample.
    h, w = 700, 1000
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, np.full((h, w), 180)], axis=-1).astype(np.uint8)
    colours = [(230, 150, 190), (90, 60, 150), (255, 0, 0), (0, 160, 0), (20, 20, 230), (248, 248, 248)]
    for i, colour in enumerate(colours):
        rgb[100:300, 50 + i * 150 : 170 + i * 150] = colour
    path = tmp_path / "pyr.tiff"
    demo.write_pyramidal_tiff(path, rgb, mpp=0.25, objective_power=40)

    with openslide.OpenSlide(str(path)) as slide:
        props = slide.properties
        assert props[openslide.PROPERTY_NAME_VENDOR] == "aperio"
        assert slide.level_count >= 3
        assert slide.level_dimensions[0] == (w, h)
        np.testing.assert_allclose(slide.level_downsamples[:3], (1, 4, 16), rtol=0.03)
        assert float(props[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        assert float(props[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.25)
        assert float(props[openslide.PROPERTY_NAME_OBJECTIVE_POWER]) == pytest.approx(40)
        back = np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB")).astype(int)
        level1 = np.asarray(slide.read_region((0, 0), 1, slide.level_dimensions[1]).convert("RGB")).astype(int)

    assert np.abs(back - rgb).mean() < 2.0
    for i, colour in enumerate(colours):
        patch = back[150:250, 80 + i * 150 : 140 + i * 150].reshape(-1, 3).mean(axis=0)
        np.testing.assert_allclose(patch, colour, atol=4)
    # The reduced level is the image, not noise: compare with an area downsample.
    expected = cv2.resize(rgb, (w // 4, h // 4), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(level1 - expected).mean() < 3.0

    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) >= 3
        assert all(page.is_tiled and page.compression == tifffile.COMPRESSION.JPEG for page in tif.pages)


def test_slide_metadata_and_no_mpp_variant(tmp_path):
    # Same file name, so the same slide id and pixels: only metadata differs.
    with_mpp = tmp_path / "m" / "DEMO-P001-S1.tiff"
    without = tmp_path / "n" / "DEMO-P001-S1.tiff"
    demo.make_slide(with_mpp, label=0, seed=1, slide_px=(1024, 1024), mpp=0.5, objective_power=20)
    demo.make_slide(without, label=0, seed=1, slide_px=(1024, 1024), mpp=None)

    with openslide.OpenSlide(str(with_mpp)) as slide:
        assert slide.level_count >= 3
        np.testing.assert_allclose(slide.level_downsamples[:3], (1, 4, 16))
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == 0.5
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == 0.5
        assert float(slide.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER]) == 20
    with openslide.OpenSlide(str(without)) as slide:
        assert slide.level_count >= 3
        for name in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y, openslide.PROPERTY_NAME_OBJECTIVE_POWER):
            assert name not in slide.properties
    np.testing.assert_array_equal(read_level0(with_mpp), read_level0(without))


# ---------------------------------------------------------------- content


@pytest.fixture(scope="module")
def rendered():
    """A positive and a negative 2048-px slide, rendered in memory."""
    return {
        label: demo.render_slide(f"DEMO-P00{label + 1}-S1", label, seed=7, slide_px=SLIDE_PX)
        for label in (0, 1)
    }


def test_blank_slide_is_all_background(tmp_path):
    path = tmp_path / "blank.tiff"
    facts = demo.make_slide(path, label=1, seed=0, slide_px=(1024, 1024), tissue=False)
    rgb = read_level0(path)
    assert facts["n_tissue_tiles"] == 0 and facts["n_tumor_tiles"] == 0
    assert not any(keeps_tile(t) for _, _, t in tiles(rgb))
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    assert (gray > 240).mean() > 0.99
    assert gray.std() > 0.3  # slight noise, not a flat fill


def test_tissue_tiles_pass_and_background_and_faint_tiles_fail(rendered, tmp_path):
    n_faint_tiles = 0
    for label, (rgb, masks, facts) in rendered.items():
        path = tmp_path / f"{label}.tiff"
        demo.write_pyramidal_tiff(path, rgb, mpp=0.5, objective_power=20)
        decoded = read_level0(path)  # judge what the tiling stage will read
        kept = 0
        for r, c, t in tiles(decoded):
            tissue = tile_fraction(masks["tissue"], r, c)
            faint = tile_fraction(masks["faint"], r, c)
            keep = keeps_tile(t)
            kept += keep
            if tissue > 0.99:
                assert keep, f"full tissue tile ({r}, {c}) of label {label} dropped"
            if tissue == 0:
                assert not keep, f"tile ({r}, {c}) without tissue kept (faint share {faint:.2f})"
                n_faint_tiles += faint > 0.5
        assert kept == facts["n_tissue_tiles"]
        assert 0.3 <= facts["n_tissue_tiles"] / facts["n_tiles"] <= 0.7
        assert 0.3 <= facts["tissue_pixel_fraction"] <= 0.6
        # Faint tissue is mostly brighter than the background threshold.
        gray = cv2.cvtColor(decoded, cv2.COLOR_RGB2GRAY)
        faint_only = masks["faint"] & ~masks["tissue"]
        assert faint_only.any()
        assert (gray[faint_only] > 240).mean() > 0.6
    assert n_faint_tiles >= 1  # the faint-tile branch above was exercised


def test_tumour_only_in_positive_slides_and_in_a_minority_of_tissue_tiles(rendered):
    _, neg_masks, neg = rendered[0]
    _, pos_masks, pos = rendered[1]
    assert neg["n_tumor_tiles"] == 0 and not neg_masks["lesion"].any()
    assert pos["n_tumor_tiles"] >= 1
    assert 0.05 <= pos["tumor_tile_fraction"] <= 0.4
    assert pos["tumor_tile_fraction"] == pytest.approx(pos["target_tumor_tile_fraction"], abs=0.1)
    assert pos_masks["lesion"].any() and not (pos_masks["lesion"] & ~pos_masks["tissue"]).any()

    # The tumour texture changes low-level statistics: share of dark
    # (nuclear) pixels and mean hue separate tumour tiles from tumour-free ones.
    def stats(rgb, masks):
        tumour, other = [], []
        for r, c, t in tiles(rgb):
            if not keeps_tile(t):
                continue
            gray = cv2.cvtColor(np.ascontiguousarray(t), cv2.COLOR_RGB2GRAY)
            dark = float((gray < 100).mean())
            blueness = float(t[..., 2].mean() - t[..., 0].mean())
            lesion = tile_fraction(masks["lesion"], r, c)
            if lesion > 0.9:
                tumour.append((dark, blueness))
            elif lesion == 0:
                other.append((dark, blueness))
        return np.array(tumour).reshape(-1, 2), np.array(other).reshape(-1, 2)

    pos_tumour, pos_other = stats(rendered[1][0], pos_masks)
    neg_tumour, neg_other = stats(rendered[0][0], neg_masks)
    assert len(pos_tumour) >= 1 and len(neg_tumour) == 0
    normal = np.concatenate([pos_other, neg_other])
    assert pos_tumour[:, 0].min() > 2 * normal[:, 0].max()
    assert pos_tumour[:, 1].min() > normal[:, 1].max()


def test_lesions_are_compact(rendered):
    # One to three lesions, not a scatter of spots.
    _, masks, _ = rendered[1]
    n_labels, _, stats, _ = cv2.connectedComponentsWithStats(masks["lesion"].astype(np.uint8))
    areas = stats[1:, cv2.CC_STAT_AREA]
    big = areas[areas >= 0.05 * areas.sum()]
    assert 1 <= len(big) <= 3
    assert big.sum() >= 0.9 * areas.sum()


# ---------------------------------------------------------------- command line


def test_cli_help_and_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--help"])
    assert exc.value.code == 0
    assert "--n-patients" in capsys.readouterr().out

    demo.main(["--out", str(tmp_path), "--n-patients", "2", "--seed", "9", "--slide-px", "512", "256", "--mpp", "0.25"])
    sheet = pd.read_csv(tmp_path / "samples.csv")
    pd.testing.assert_frame_equal(sheet, demo.plan_cohort(2, seed=9))
    with openslide.OpenSlide(str(tmp_path / sheet.path[0])) as slide:
        assert slide.dimensions == (512, 256)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == 0.25
