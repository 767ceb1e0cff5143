"""Real-world slide files (issue 21, items 11-14): placeholder resolutions, slides smaller than a tile, the
no-tissue QC picture, OME-TIFF / plain TIFF / DICOM folders, and colours that cannot be right."""

import logging

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest

from factories import he_pixels, write_ome_tiff, write_plain_tiff, write_planar_tiff, ycbcr_as_rgb
from slidemil.cohort.manifest import read_manifest_table, tile_manifest
from slidemil.cohort.sheet import check_sheet
from slidemil.demo.render import make_slide
from slidemil.errors import SlideError
from slidemil.files.tiles import read_tiles
from slidemil.slides.reader import MAX_MPP, dicom_file, open_slide, read_rgb, slide_mpp
from slidemil.slides.tiff_fallback import TiffSlide
from slidemil.tiling.tile import colour_warning, tile_slide

PARAMS = {"mpp": 1.0, "tile_px": 128}


@pytest.fixture(scope="module")
def rgb():
    return he_pixels(1536, 1024)


def _tile(path, tmp_path, params=PARAMS, **kwargs):
    out, qc = tmp_path / f"{path.stem}.h5", tmp_path / f"{path.stem}.png"
    summary = tile_slide(str(path), str(out), str(qc), params, slide_id=path.stem, on_error="exclude", **kwargs)
    coords, attrs = read_tiles(out)
    return summary, coords, attrs, qc


# ---- item 11: a placeholder resolution is no resolution ----


@pytest.mark.faults
@pytest.mark.parametrize("dpi, tiled", [(72, False), (96, True), (300, False), (72, True)])
def test_placeholder_dpi_is_refused_with_the_mpp_column_advice(rgb, tmp_path, caplog, dpi, tiled):
    # Tiled: OpenSlide reads 352.8 um/px from the tags itself; untiled: tifffile does.
    path = write_plain_tiff(tmp_path / f"scan{dpi}.tif", rgb, dpi=dpi, tiled=tiled)
    with caplog.at_level(logging.WARNING):
        summary, coords, attrs, _ = _tile(path, tmp_path)
    reason = summary["excluded"]
    assert len(coords) == 0 and attrs["excluded"] == reason and "\n" not in reason
    assert f"{25400 / dpi:.4g} um/px ({dpi} dpi)" in reason and "placeholder" in reason
    assert "add an 'mpp' column to the sample sheet" in reason and str(path) in reason
    assert "over 20 um/px, a placeholder: ignored" in caplog.text


def test_the_sheet_mpp_overrides_a_placeholder(rgb, tmp_path):
    path = write_plain_tiff(tmp_path / "scan72.tif", rgb, dpi=72)
    summary, coords, attrs, _ = _tile(path, tmp_path, mpp_override=0.5)
    assert attrs["excluded"] == "" and attrs["mpp_source"] == "sheet" and attrs["tile_size_level0"] == 256
    assert len(coords) > 0


def test_the_bound_is_one_number():
    class Fake:
        def __init__(self, mpp):
            self.properties = {"openslide.mpp-x": str(mpp), "openslide.mpp-y": str(mpp)}

    assert slide_mpp(Fake(MAX_MPP), "s").mpp == MAX_MPP
    with pytest.raises(SlideError, match="placeholder"):
        slide_mpp(Fake(MAX_MPP * 1.01), "s")


# ---- item 12: smaller than one tile; the no-tissue QC picture ----


@pytest.mark.faults
def test_a_slide_smaller_than_one_tile_says_so(rgb, tmp_path):
    path = write_plain_tiff(tmp_path / "tiny.tif", np.ascontiguousarray(rgb[:150, :200]), mpp=0.5)
    summary, coords, _, _ = _tile(path, tmp_path, params={"mpp": 0.5, "tile_px": 256})
    reason = summary["excluded"]
    assert len(coords) == 0 and "no tissue" not in reason
    assert "slide tiny is 200 x 150 px at 0.5 mpp, smaller than one 256 px tile at 0.5 mpp" in reason
    assert "tiling.tile_px" in reason


def _qc_halves(qc, width: int, height: int):
    img = cv2.imread(str(qc))
    below = img[160:]  # under the text: thumbnail | 8 px gap | mask, the longer side 512 px
    h, w = round(height * 512 / max(width, height)), round(width * 512 / max(width, height))
    assert below.shape[0] == h
    return below[:, :w], below[:, w + 8:2 * w + 8]


@pytest.mark.faults
def test_a_no_tissue_qc_picture_shows_thumbnail_and_mask(rgb, tmp_path):
    blank = tmp_path / "blank.tiff"
    make_slide(str(blank), label=0, seed=1, slide_px=(768, 512), tissue=False)
    summary, _, _, qc = _tile(blank, tmp_path)
    assert "no tissue tiles" in summary["excluded"] and "QC picture" in summary["excluded"]
    thumb, mask = _qc_halves(qc, 768, 512)
    assert abs(thumb.mean() - 249) < 2 and (mask == 0).all()  # the slide's off-white glass; an empty mask
    # Candidates in the mask, none kept (false colours): the mask shows where the tiling looked.
    path = write_plain_tiff(tmp_path / "ycbcr.tif", ycbcr_as_rgb(rgb), mpp=0.5)
    summary, _, _, qc = _tile(path, tmp_path)
    assert "no tissue tiles" in summary["excluded"]
    thumb, mask = _qc_halves(qc, 1536, 1024)
    assert thumb.std() > 5 and set(np.unique(mask)) == {0, 255}


# ---- item 13: OME-TIFF, plain TIFF, DICOM folders ----


@pytest.mark.parametrize("unit", ["µm", "nm"])
def test_ome_tiff_is_read_with_its_physical_size_and_pyramid(rgb, tmp_path, unit):
    path = write_ome_tiff(tmp_path / "qupath.ome.tif", rgb, mpp=0.5, unit=unit)
    slide = open_slide(path)  # OpenSlide opens it as one-level generic TIFF without mpp
    assert isinstance(slide, TiffSlide)
    assert slide.level_dimensions == ((1536, 1024), (384, 256)) and slide.level_downsamples == (1.0, 4.0)
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    region = read_rgb(slide, path, (300, 200), 0, (400, 300))
    assert np.abs(region.astype(int) - rgb[200:500, 300:700]).mean() < 4  # JPEG
    thumb = slide.get_thumbnail((192, 192))  # from level 1
    expected = cv2.resize(rgb, (192, 128), interpolation=cv2.INTER_AREA)
    assert thumb.shape == (128, 192, 3) and np.abs(thumb.astype(int) - expected).mean() < 6
    # As OpenSlide's: the coarsest level not coarser than asked (the heatmaps' thumbnails use it).
    assert [slide.get_best_level_for_downsample(d) for d in (0.5, 3.9, 4.0, 9.0)] == [0, 0, 1, 1]
    summary, coords, attrs, _ = _tile(path, tmp_path, params={"mpp": 2.0, "tile_px": 64})
    assert attrs["excluded"] == "" and attrs["mpp_source"] == "metadata" and attrs["level"] == 1
    assert len(coords) > 0


def test_untiled_tiff_gives_the_tiles_of_its_tiled_copy(rgb, tmp_path):
    strips = write_plain_tiff(tmp_path / "strips.tif", rgb, mpp=0.5)
    tiled = write_plain_tiff(tmp_path / "tiled.tif", rgb, mpp=0.5, tiled=True)
    assert isinstance(open_slide(strips), TiffSlide) and not isinstance(open_slide(tiled), TiffSlide)
    _, coords_strips, attrs, _ = _tile(strips, tmp_path)
    _, coords_tiled, _, _ = _tile(tiled, tmp_path)
    assert attrs["slide_mpp"] == pytest.approx(0.5) and len(coords_strips) > 0
    np.testing.assert_array_equal(coords_strips, coords_tiled)


def test_a_region_decodes_only_the_strips_it_touches(rgb, tmp_path):
    slide = TiffSlide(write_plain_tiff(tmp_path / "strips.tif", rgb, mpp=0.5, rowsperstrip=64))
    region = slide.read_rgb((100, 130), 0, (50, 100))  # rows 130-229: strips 2, 3
    np.testing.assert_array_equal(region, rgb[130:230, 100:150])
    assert sorted(slide._cache) == [(0, 2), (0, 3)]
    outside = np.asarray(slide.read_region((1500, 1000), 0, (64, 64)))
    assert (outside[:24, :36, 3] == 255).all() and (outside[24:, :, 3] == 0).all() and (outside[:, 36:, 3] == 0).all()
    slide.close()


@pytest.mark.parametrize("ome", [False, True])
def test_colour_planes_are_read_tile_by_tile(rgb, tmp_path, ome):
    slide = TiffSlide(write_planar_tiff(tmp_path / "planes.tif", rgb, mpp=0.5, ome=ome))
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    region = slide.read_rgb((300, 200), 0, (400, 300))
    np.testing.assert_array_equal(region, rgb[200:500, 300:700])
    assert sorted(slide._cache) == [(0, 1), (0, 2), (0, 7), (0, 8)] and not slide._whole  # 4 of 24 tiles
    slide.close()


def test_features_come_from_a_tifffile_slide(rgb, tmp_path):
    from slidemil.features.extract import extract_features

    path = write_plain_tiff(tmp_path / "strips.tif", rgb, mpp=0.5)
    _tile(path, tmp_path, params={"mpp": 1.0, "tile_px": 64})
    out = tmp_path / "f.h5"
    extract_features(str(path), str(tmp_path / "strips.h5"), str(out), "shufflenet_v2", "random", input_px=32,
                     slide_id="strips", device="cpu")
    with h5py.File(out) as f:
        features = f["features"][:]
    assert len(features) > 0 and np.isfinite(features).all() and features.std(axis=0).max() > 0


@pytest.mark.faults
def test_a_folder_without_dicom_is_refused_with_one_line(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a slide")
    with pytest.raises(SlideError) as err:
        dicom_file(folder)
    assert str(folder) in str(err.value) and "no DICOM WSI file" in str(err.value) and "\n" not in str(err.value)
    summary, _, _, _ = _tile(folder, tmp_path)
    assert "no DICOM WSI file" in summary["excluded"]


def test_the_sheet_accepts_a_dicom_folder(tmp_path):
    (tmp_path / "series").mkdir()
    sheet = pd.DataFrame({"slide_id": ["A", "B"], "patient_id": ["P1", "P2"], "path": ["series", "missing"],
                          "label": [0, 1]})
    problems = " ".join(check_sheet(sheet, base_dir=tmp_path))
    assert "missing" in problems and "series" not in problems


def test_a_dicom_wsi_folder_is_tiled_through_openslide(rgb, tmp_path):
    pytest.importorskip("pydicom", reason="pydicom (the dev extra) writes the test DICOM WSI")
    from factories import write_dicom_wsi

    folder = write_dicom_wsi(tmp_path / "series", rgb, mpp=0.5)
    slide = open_slide(folder)
    assert slide.properties["openslide.vendor"] == "dicom" and slide.level_dimensions == ((1536, 1024), (768, 512))
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    region = read_rgb(slide, folder, (300, 200), 0, (400, 300))
    assert np.abs(region.astype(int) - rgb[200:500, 300:700]).mean() < 4  # JPEG
    summary, coords, attrs, _ = _tile(folder, tmp_path)
    assert attrs["excluded"] == "" and attrs["slide_mpp"] == pytest.approx(0.5) and attrs["warning"] == ""
    assert len(coords) > 0 and summary["slide_id"] == "series"


def test_a_dicom_header_declaring_rgb_over_ycbcr_frames_warns(rgb, tmp_path):
    pytest.importorskip("pydicom", reason="pydicom (the dev extra) writes the test DICOM WSI")
    from factories import write_dicom_wsi

    folder = write_dicom_wsi(tmp_path / "false", rgb, mpp=0.5, photometric="RGB")
    _, _, attrs, _ = _tile(folder, tmp_path)
    assert "far from neutral white" in attrs["warning"]


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "small.svs", "boxes.tiff"])
def test_real_slides_still_open_through_openslide(shared_slides, name):
    slide = open_slide(shared_slides / name)
    assert not isinstance(slide, TiffSlide)


# ---- item 14: colours that cannot be right ----


def test_false_colours_warn_in_the_log_the_tiles_file_and_the_manifest(rgb, tmp_path, caplog):
    tinted = np.clip(rgb * np.array([1.0, 0.72, 0.72]), 0, 255).astype(np.uint8)  # white -> (255, 184, 184)
    path = write_plain_tiff(tmp_path / "tinted.tif", tinted, mpp=0.5)
    with caplog.at_level(logging.WARNING):
        _, coords, attrs, qc = _tile(path, tmp_path)
    assert len(coords) > 0 and "far from neutral white" in attrs["warning"] and attrs["warning"] in caplog.text
    good = write_plain_tiff(tmp_path / "good.tif", rgb, mpp=0.5)
    _, _, good_attrs, good_qc = _tile(good, tmp_path)
    assert good_attrs["warning"] == ""
    table = tile_manifest([str(tmp_path / "tinted.h5"), str(tmp_path / "good.h5")], [str(qc), str(good_qc)],
                          tmp_path / "manifest.csv")
    assert table["warning"].tolist() == [attrs["warning"], ""]
    assert read_manifest_table(tmp_path / "manifest.csv")["warning"].tolist() == [attrs["warning"], ""]


def test_ycbcr_read_as_rgb_keeps_its_warning_when_excluded(rgb, tmp_path):
    path = write_plain_tiff(tmp_path / "ycbcr.tif", ycbcr_as_rgb(rgb), mpp=0.5)
    summary, _, attrs, _ = _tile(path, tmp_path)
    assert "far from neutral white" in attrs["warning"] and "no tissue tiles" in summary["excluded"]
    assert attrs["excluded"] == summary["excluded"]


def test_real_h_and_e_backgrounds_do_not_warn(shared_slides):
    slide = open_slide(shared_slides / "CMU-1-Small-Region.svs")
    overview = read_rgb(slide, "cmu", (0, 0), 0, slide.dimensions)
    assert colour_warning(overview, "cmu") == ""


def test_the_report_lists_the_warnings(tmp_path):
    from slidemil.report.page import _cohort

    sheet = tmp_path / "samples.csv"
    pd.DataFrame({"slide_id": ["A", "B"], "patient_id": ["P1", "P2"], "path": ["a.tif", "b.tif"],
                  "label": [0, 1]}).to_csv(sheet, index=False)
    features = pd.DataFrame({"slide_id": ["A", "B"], "path": ["a.h5", "b.h5"], "n_tiles": [5, 7],
                             "excluded": ["", ""], "extractor": ["x", "x"], "weights_digest": ["d", "d"]})
    tiles = pd.DataFrame({"slide_id": ["A", "B"], "path": ["a.t.h5", "b.t.h5"], "qc": ["", ""],
                          "n_tiles": [5, 7], "n_candidates": [9.0, 9.0], "warning": ["background colour off", ""]})
    doc = _cohort(sheet, None, features, tiles, 0, tmp_path)
    assert doc["cohort"]["warnings"] == [{"slide_id": "A", "warning": "background colour off"}]


@pytest.mark.workflow
def test_the_workflow_takes_odd_files_and_reports_them(tmp_path):
    import importlib.util
    from html import escape as html_escape

    import yaml

    from factories import TINY_SHEET_CONFIG, make_odd_files_cohort, snakemake_cli

    dicom = importlib.util.find_spec("pydicom") is not None  # without it the DICOM folder is left out
    sheet = make_odd_files_cohort(tmp_path / "cohort", dicom=dicom)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(dict(TINY_SHEET_CONFIG, samples=str(sheet))))
    proc = snakemake_cli(tmp_path, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-5000:]
    tiles = read_manifest_table(tmp_path / "results" / "tiles" / "manifest.csv").set_index("slide_id")
    read = ["OME", "DCM"] if dicom else ["OME"]
    assert (tiles.loc[read, "n_tiles"] > 0).all() and tiles.loc["DPI72", "n_tiles"] == 0
    excluded = pd.read_csv(tmp_path / "results" / "report" / "excluded.csv").set_index("slide_id")["reason"]
    assert "placeholder" in excluded["DPI72"] and "add an 'mpp' column" in excluded["DPI72"]
    assert not set(read) & set(excluded.index)
    html = (tmp_path / "results" / "report" / "report.html").read_text()
    assert "Slide warnings" in html and html_escape(tiles.loc["FALSE", "warning"]) in html


def test_a_dropped_tifffile_slide_frees_its_file(rgb, tmp_path):
    import gc
    import os

    path = write_plain_tiff(tmp_path / "strips.tif", rgb, mpp=0.5)
    before = len(os.listdir("/proc/self/fd"))
    slides = [TiffSlide(path) for _ in range(5)]
    assert len(os.listdir("/proc/self/fd")) > before
    del slides
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before
    slide = TiffSlide(path)
    slide.close()
    slide.close()  # twice is harmless, as OpenSlide's
    assert len(os.listdir("/proc/self/fd")) == before
