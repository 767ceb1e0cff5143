"""Unusable slides with tiling.on_error: exclude, and the sheet's label check."""

import logging

import h5py
import pandas as pd
import pytest

from slidemil.cohort.facts import excluded_slides
from slidemil.demo.render import make_slide
from slidemil.features.extract import extract_features
from slidemil.cohort.sheet import check_sheet
from slidemil.tiling.tile import tile_slide


def _exclude(path, tmp_path, caplog, **params):
    out, qc = tmp_path / "t.h5", tmp_path / "t.png"
    with caplog.at_level(logging.INFO):
        summary = tile_slide(str(path), str(out), str(qc), params, slide_id="S1", on_error="exclude")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "S1" in errors[0].getMessage()
    with h5py.File(out) as f:
        assert f["coords"].shape == (0, 2) and f.attrs["excluded"] == summary["excluded"]
    assert qc.read_bytes()[:4] == b"\x89PNG"
    return summary["excluded"], errors[0].getMessage()


@pytest.mark.parametrize("name, message", [
    ("unopenable.tiff", "OpenSlide cannot open"),
    ("unreadable.svs", "reading pixels"),
    ("broken.svs", "not a slide format"),
])
def test_bad_slides_are_excluded_with_one_line(shared_slides, tmp_path, caplog, name, message):
    reason, line = _exclude(shared_slides / "bad" / name, tmp_path, caplog, mpp=0.5, tile_px=8, mask_min_fraction=0)
    assert name in reason and message in reason and reason in line and "\n" not in reason


def test_no_mpp_and_no_tissue_are_excluded_with_the_fix(tmp_path, caplog):
    nompp = tmp_path / "nompp.tiff"
    make_slide(str(nompp), label=0, seed=1, slide_px=(512, 512), mpp=None, objective_power=None)
    reason, _ = _exclude(nompp, tmp_path, caplog)
    assert "nompp.tiff" in reason and "add an 'mpp' column" in reason
    caplog.clear()
    blank = tmp_path / "blank.tiff"
    make_slide(str(blank), label=0, seed=1, slide_px=(512, 512), tissue=False)
    reason, _ = _exclude(blank, tmp_path, caplog)
    assert "no tissue tiles" in reason and "QC picture" in reason


def test_exclusion_propagates_to_features_and_cohort_table(tmp_path):
    good, blank = tmp_path / "good.tiff", tmp_path / "blank.tiff"
    make_slide(str(good), label=1, seed=2, slide_px=(512, 512))
    make_slide(str(blank), label=0, seed=1, slide_px=(512, 512), tissue=False)
    feats = []
    for slide in (good, blank):
        tile_slide(str(slide), str(tmp_path / f"{slide.stem}.t.h5"), None, {"mpp": 1.0, "tile_px": 64},
                   slide_id=slide.stem, on_error="exclude")
        out = tmp_path / f"{slide.stem}.h5"
        extract_features(str(slide), str(tmp_path / f"{slide.stem}.t.h5"), str(out), "shufflenet_v2", "random",
                         input_px=64, slide_id=slide.stem, device="cpu")
        feats.append(out)
    with h5py.File(feats[0]) as g, h5py.File(feats[1]) as b:
        assert len(g["features"]) > 0 and g.attrs["excluded"] == ""
        assert b["features"].shape == (0, 1024) and "no tissue tiles" in b.attrs["excluded"]
    table = excluded_slides(feats)
    assert table["slide_id"].tolist() == ["blank"] and "no tissue tiles" in table.loc[0, "reason"]


def _sheet(labels):
    return pd.DataFrame({"slide_id": [f"s{i}" for i in range(len(labels))],
                         "patient_id": [f"p{i}" for i in range(len(labels))],
                         "path": ["x"] * len(labels), "label": labels})


@pytest.mark.parametrize("labels, settings, problem", [
    ([0, 1, 2], {}, "not binary (values: 0, 1, 2)"),
    (["tumour", "normal"], {}, "not binary"),
    (["tumour", "normal"], {"positive_class": "tumor"}, "including splits.positive_class 'tumor'"),
    (["high", 1.5], {"binarize": "median"}, "needs a numeric label; non-numeric value(s): high"),
])
def test_label_column_must_fit_split_settings(labels, settings, problem):
    problems = check_sheet(_sheet(labels), check_files=False, **settings)
    assert len(problems) == 1 and problem in problems[0]


@pytest.mark.parametrize("labels, settings", [
    ([0, 1, 1], {}), (["true", "false"], {}), (["tumour", "normal"], {"positive_class": "tumour"}),
    ([0.3, 2.5, 7.0], {"binarize": "tertiles"}),
])
def test_good_label_columns_pass(labels, settings):
    assert check_sheet(_sheet(labels), check_files=False, **settings) == []
