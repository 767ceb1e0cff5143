"""The demo cohort of each task (issue 23): targets planted through the share of a tissue pattern.

Planning is checked on large cohorts (no pixels); rendering on a few small slides.
"""

from __future__ import annotations

import cv2
import numpy as np
import openslide
import pandas as pd
import pytest

from slidemil.config import ConfigError, check_config
from slidemil.demo import plan as demo_plan
from slidemil.demo import render as demo

SIGNAL = {"tumor_tile_fraction": [0.05, 0.25], "lymphoid_tile_fraction": [0.0, 0.1], "censored_fraction": 0.3,
          "hazard_ratio": 8.0, "score_noise": 2.0, "silent_positive_fraction": 0.0}


def patients(task: str, n: int = 300, seed: int = 1, **signal) -> pd.DataFrame:
    """One row per patient of a planned cohort, with its planted pattern shares."""
    plan = demo_plan.plan_cohort(n, seed, task=task, signal={**SIGNAL, **signal}, patterns=True)
    return plan.drop(columns=["slide_id", "path"]).drop_duplicates("patient_id").reset_index(drop=True)


@pytest.mark.parametrize("task", ["binary", "multiclass", "survival", "regression"])
def test_every_task_is_planned_deterministically_with_its_columns(task):
    plan = demo_plan.plan_cohort(40, 3, task=task)
    pd.testing.assert_frame_equal(plan, demo_plan.plan_cohort(40, 3, task=task))
    target = ["time", "event"] if task == "survival" else ["label"]
    assert list(plan.columns) == ["slide_id", "patient_id", "path", *target]
    assert not plan[target].equals(demo_plan.plan_cohort(40, 4, task=task)[target])
    # A patient's slides carry the patient's target and planted shares.
    with_shares = demo_plan.plan_cohort(40, 3, task=task, patterns=True)
    per_patient = with_shares.groupby("patient_id")[target + demo_plan.PATTERN_COLUMNS].nunique()
    assert (per_patient == 1).all().all() and with_shares["patient_id"].nunique() == 40
    # The slides (and so the DAG) do not depend on the task.
    assert plan["slide_id"].equals(demo_plan.plan_cohort(40, 3)["slide_id"])


def test_binary_tumour_only_in_positives_within_the_range():
    p = patients("binary")
    pos, neg = p[p["label"] == 1], p[p["label"] == 0]
    assert len(pos) == 150 and (neg["tumor_tile_fraction"] == 0).all()
    assert pos["tumor_tile_fraction"].between(0.05, 0.25).all() and pos["tumor_tile_fraction"].std() > 0.04
    # The confounding pattern is in both classes alike.
    assert p["lymphoid_tile_fraction"].between(0.0, 0.1).all()
    assert abs(pos["lymphoid_tile_fraction"].mean() - neg["lymphoid_tile_fraction"].mean()) < 0.02


def test_silent_positives_keep_their_label_and_lose_their_tumour_only():
    shown = patients("binary")
    quiet_sets = []
    for fraction in (0.1, 0.25):
        p = patients("binary", silent_positive_fraction=fraction)
        assert p["label"].equals(shown["label"])
        assert p["lymphoid_tile_fraction"].equals(shown["lymphoid_tile_fraction"])
        quiet = (p["label"] == 1) & (p["tumor_tile_fraction"] == 0)
        assert quiet.sum() == round(150 * fraction)
        # Every other patient keeps the share the same seed gives without silent positives.
        assert p.loc[~quiet, "tumor_tile_fraction"].equals(shown.loc[~quiet, "tumor_tile_fraction"])
        quiet_sets.append(set(p.index[quiet]))
    # A larger fraction silences the same patients and more.
    assert quiet_sets[0] < quiet_sets[1]
    with pytest.raises(ConfigError, match="demo.silent_positive_fraction"):
        check_config({"demo": {"silent_positive_fraction": 1.0}})


def test_multiclass_classes_each_have_their_own_pattern():
    p = patients("multiclass", n=90)
    assert p["label"].value_counts().to_dict() == {"normal": 30, "tumor": 30, "lymphoid": 30}
    shares = p.groupby("label")[demo_plan.PATTERN_COLUMNS]
    assert (shares.max().loc["normal"] == 0).all()
    low, high = shares.min(), shares.max()
    assert low.loc["tumor", "tumor_tile_fraction"] >= 0.05 and high.loc["tumor", "lymphoid_tile_fraction"] == 0
    assert low.loc["lymphoid", "lymphoid_tile_fraction"] >= 0.05 and high.loc["lymphoid", "tumor_tile_fraction"] == 0
    with pytest.raises(ValueError, match="every class"):
        demo_plan.plan_cohort(2, 0, task="multiclass")


def test_regression_score_follows_the_tumour_share():
    p = patients("regression")
    r = np.corrcoef(p["tumor_tile_fraction"], p["label"])[0, 1]
    # Share uniform over 5-25 % (sd 5.8 points) plus noise of sd 2 points: r = 5.8 / sqrt(5.8^2 + 2^2) = 0.94.
    assert 0.9 < r < 0.97
    residual = p["label"] - 100 * p["tumor_tile_fraction"]
    assert residual.std() == pytest.approx(2.0, rel=0.15)
    noiseless = patients("regression", score_noise=0.0)
    np.testing.assert_allclose(noiseless["label"], 100 * noiseless["tumor_tile_fraction"], atol=1e-3)


@pytest.mark.parametrize("censored", [0.0, 0.3, 0.55])
def test_survival_censoring_rate_is_as_configured(censored):
    p = patients("survival", n=200, censored_fraction=censored)
    assert (p["event"] == 0).mean() == pytest.approx(censored, abs=0.5 / 200)
    assert (p["time"] > 0).all() and set(p["event"]) <= {0, 1}


def test_survival_hazard_grows_with_the_tumour_share():
    p = patients("survival", n=1200, seed=5)
    low, high = p["tumor_tile_fraction"] < 0.1, p["tumor_tile_fraction"] > 0.2
    # Exponential times: the rate's maximum-likelihood estimate is events / time at risk, censored ones included.
    rate = lambda rows: p.loc[rows, "event"].sum() / p.loc[rows, "time"].sum()  # noqa: E731
    # Shares 0.05-0.10 vs 0.20-0.25 of the 0.05-0.25 range: a hazard ratio of 8 ** (0.75 - 0.125) = 3.7 between
    # the groups' middles.
    assert 2.5 < rate(high) / rate(low) < 5.5
    flat = patients("survival", n=1200, seed=5, hazard_ratio=1.0)
    low_f, high_f = flat["tumor_tile_fraction"] < 0.1, flat["tumor_tile_fraction"] > 0.2
    flat_ratio = (flat.loc[high_f, "event"].sum() / flat.loc[high_f, "time"].sum()) / (
        flat.loc[low_f, "event"].sum() / flat.loc[low_f, "time"].sum())
    assert 0.75 < flat_ratio < 1.33


def test_rendered_slides_carry_the_planned_pattern():
    # Multiclass: each class's slides show its own pattern and no other, at about the planned share.
    settings = {"n_patients": 6, "seed": 2, "slide_px": [1536, 1536], "task": "multiclass",
                "tumor_tile_fraction": [0.15, 0.3]}
    plan = demo.plan_slides(settings)
    for row in plan.drop_duplicates("patient_id").itertuples():
        _, masks, facts = demo.render_cohort_slide(settings, row.slide_id)
        other = {"tumor": "lymphoid", "lymphoid": "tumor"}
        if row.label == "normal":
            assert facts["n_tumor_tiles"] == facts["n_lymphoid_tiles"] == 0
            continue
        assert facts[f"n_{other[row.label]}_tiles"] == 0
        assert facts[f"{row.label}_tile_fraction"] == pytest.approx(getattr(row, f"{row.label}_tile_fraction"),
                                                                    abs=0.12)
        assert facts[f"n_{row.label}_tiles"] >= 1


def _nucleus_areas(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    dark = (cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) < 90) & mask
    n, _, stats, _ = cv2.connectedComponentsWithStats(dark.astype(np.uint8))
    areas = stats[1:, cv2.CC_STAT_AREA]
    return areas[areas >= 4]


def test_tumour_and_lymphoid_patterns_differ_in_texture():
    # Both are dark and crowded (the confounder); tumour nuclei are much larger.
    rgb, masks, facts = demo.render_slide("T-1", 1, 3, (1536, 1536), patterns={"tumor": 0.2, "lymphoid": 0.2})
    assert facts["n_tumor_tiles"] >= 1 and facts["n_lymphoid_tiles"] >= 1
    assert not (masks["lesion"] & masks["lymphoid"]).any()
    tumour, lymphoid = _nucleus_areas(rgb, masks["lesion"]), _nucleus_areas(rgb, masks["lymphoid"])
    assert np.median(tumour) > 2.5 * np.median(lymphoid)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    stroma = masks["tissue"] & ~masks["lesion"] & ~masks["lymphoid"]
    # Aggregates are darker than stroma, as tumour is: colour alone does not tell the two apart.
    assert gray[masks["lymphoid"]].mean() < gray[stroma].mean() - 15
    assert gray[masks["lesion"]].mean() < gray[stroma].mean() - 15


def test_survival_cohort_files_match_the_plan_and_a_slide_rendered_alone(tmp_path):
    settings = {"n_patients": 3, "seed": 11, "slide_px": [512, 512], "task": "survival", "two_slide_fraction": 0.5}
    sheet = demo.make_cohort(tmp_path, **settings)
    expected = demo_plan.plan_cohort(3, 11, two_slide_fraction=0.5, task="survival")
    pd.testing.assert_frame_equal(sheet, expected)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "samples.csv", dtype={"slide_id": str}), expected)
    row = sheet.iloc[-1]
    with openslide.OpenSlide(str(tmp_path / row.path)) as slide:
        from_file = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    alone = tmp_path / "alone.tiff"
    demo.write_pyramidal_tiff(alone, demo.render_cohort_slide(settings, row.slide_id)[0], 0.5, 20)
    with openslide.OpenSlide(str(alone)) as slide:
        np.testing.assert_array_equal(from_file, np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB")))
    with pytest.raises(TypeError, match="unknown demo setting"):
        demo.make_cohort(tmp_path / "x", n_patient=3)


def test_config_checks_the_demo_task_and_ranges():
    assert check_config({})["demo"]["task"] == "binary"
    assert check_config({"task": "survival", "demo": {"task": "survival"}})["demo"]["censored_fraction"] == 0.3
    with pytest.raises(ConfigError, match="demo.task must be one of binary, multiclass, survival, regression, got .survial."):
        check_config({"demo": {"task": "survial"}})
    with pytest.raises(ConfigError, match="demo.lymphoid_tile_fraction"):
        check_config({"demo": {"lymphoid_tile_fraction": [0.2, 0.1]}})


def test_the_demo_cohort_task_must_be_the_run_task():
    with pytest.raises(ConfigError, match=r"^config: demo.task: makes a survival demo cohort, but task is binary;"):
        check_config({"demo": {"task": "survival"}})
    assert check_config({"task": "regression", "demo": {"task": "regression"}})["task"] == "regression"
    # Your own sheet: the demo settings do not apply.
    assert check_config({"task": "survival", "samples": "sheet.csv"})["demo"]["task"] == "binary"
