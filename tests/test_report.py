"""Tests for slidemil.report.stats on small synthetic prediction/history files."""

from __future__ import annotations

import json
import logging
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from slidemil.report import stats as report  # noqa: E402
from slidemil.report.stats import _auc_rows, bootstrap_mean_auc, main, make_report  # noqa: E402
from factories import both_class_labels, shared_runs, test_rows, write_run


# ---------------------------------------------------------------------------
# Synthetic inputs
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Per-fold and summary numbers
# ---------------------------------------------------------------------------

def test_per_fold_and_summary_match_sklearn_and_numpy(tmp_path):
    runs = (shared_runs(tmp_path, "uni", "abmil", 3, 30, signal=3.0, seed=1)
            + shared_runs(tmp_path, "ctp", "mean", 3, 30, signal=0.5, seed=2))
    summary = make_report(runs, str(tmp_path / "out"), n_bootstrap=100, seed=0)

    per_fold = pd.read_csv(tmp_path / "out" / "per_fold.csv")
    assert list(per_fold.columns) == report.PER_FOLD_COLUMNS
    assert len(per_fold) == 6
    for run in runs:
        row = per_fold[(per_fold["extractor"] == run["extractor"]) & (per_fold["model"] == run["model"])
                       & (per_fold["fold"] == run["fold"])].iloc[0]
        test = test_rows(run)
        assert row["test_auc"] == pytest.approx(roc_auc_score(test["label"], test["prob"]), abs=1e-12)
        assert row["n_test_patients"] == 30
        assert row["n_test_positive"] == test["label"].sum()
        assert row["best_val_auc"] == pytest.approx(0.8)

    on_disk = pd.read_csv(tmp_path / "out" / "summary.csv")
    pd.testing.assert_frame_equal(on_disk, summary, check_dtype=False)
    for row in summary.itertuples():
        aucs = per_fold[(per_fold["extractor"] == row.extractor) & (per_fold["model"] == row.model)]["test_auc"]
        assert row.n_folds == 3
        assert row.auc_mean == pytest.approx(np.mean(aucs), abs=1e-12)
        assert row.auc_std == pytest.approx(np.std(aucs, ddof=1), abs=1e-12)
        assert row.ci_low <= row.auc_mean <= row.ci_high
        assert 0 < row.n_bootstrap_used <= 100
    # Sorted best first; the strong-signal model must come out on top.
    assert summary["auc_mean"].is_monotonic_decreasing
    assert summary.iloc[0]["model"] == "abmil"


def test_one_fold_model_has_undefined_std(tmp_path):
    runs = shared_runs(tmp_path, "uni", "abmil", 1, 20, signal=2.0, seed=3)
    summary = make_report(runs, str(tmp_path / "out"), n_bootstrap=50, seed=0)
    assert summary.loc[0, "n_folds"] == 1
    assert math.isnan(summary.loc[0, "auc_std"])
    assert summary.loc[0, "auc_mean"] == pytest.approx(pd.read_csv(tmp_path / "out" / "per_fold.csv")["test_auc"][0])
    assert "± n/a" in (tmp_path / "out" / "summary.md").read_text()


# ---------------------------------------------------------------------------
# Bootstrap CI
# ---------------------------------------------------------------------------

def test_auc_rows_matches_sklearn_with_ties_and_repeats():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(40, 15))
    # Rounded scores give many ties, as repeated bootstrap patients do.
    scores = np.round(rng.uniform(size=(40, 15)), 1)
    labels[0] = 1  # single-class row -> NaN
    got = _auc_rows(labels, scores)
    assert math.isnan(got[0])
    expected = [roc_auc_score(y, s) for y, s in zip(labels[1:], scores[1:])]
    np.testing.assert_allclose(got[1:], expected, atol=1e-12)


def _direct_bootstrap_shared(tests, n_bootstrap, seed):
    """Plain-loop reference: same patient draws for every fold, sklearn AUCs."""
    rng = np.random.default_rng(seed)
    ids = np.array(sorted(tests[0]["patient_id"]))
    aligned = [t.set_index("patient_id").loc[ids] for t in tests]
    means = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(ids), size=len(ids))
        aucs = []
        for t in aligned:
            y, p = t["label"].to_numpy()[idx], t["prob"].to_numpy()[idx]
            if y.min() == y.max():
                aucs = None
                break
            aucs.append(roc_auc_score(y, p))
        if aucs is not None:
            means.append(np.mean(aucs))
    return np.percentile(means, 2.5), np.percentile(means, 97.5), len(means)


def _direct_bootstrap_separate(tests, n_bootstrap, seed):
    """Plain-loop reference when folds have different test patients."""
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n_bootstrap):
        draws = [rng.integers(0, len(t), size=len(t)) for t in tests]
        ys = [t["label"].to_numpy()[d] for t, d in zip(tests, draws)]
        if any(y.min() == y.max() for y in ys):
            continue
        means.append(np.mean([roc_auc_score(y, t["prob"].to_numpy()[d]) for y, t, d in zip(ys, tests, draws)]))
    return np.percentile(means, 2.5), np.percentile(means, 97.5), len(means)


def test_ci_equals_direct_reimplementation_shared_test_set(tmp_path):
    # 8 patients with 2 positives: many replicates are single-class, so the skip rule is exercised.
    rng = np.random.default_rng(5)
    ids = [f"p{i}" for i in range(8)]
    labels = np.array([0, 1, 0, 0, 1, 0, 0, 0])
    runs = [write_run(tmp_path, "uni", "abmil", k, ids, labels, 1.0, rng) for k in range(3)]
    summary = make_report(runs, str(tmp_path / "out"), n_bootstrap=200, seed=7)

    tests = [test_rows(r).reset_index(drop=True) for r in runs]
    low, high, used = _direct_bootstrap_shared(tests, 200, 7)
    assert 0 < used < 200  # some replicates really were skipped
    assert summary.loc[0, "n_bootstrap_used"] == used
    assert summary.loc[0, "ci_low"] == pytest.approx(low, abs=1e-12)
    assert summary.loc[0, "ci_high"] == pytest.approx(high, abs=1e-12)


def test_ci_equals_direct_reimplementation_separate_test_sets(tmp_path):
    rng = np.random.default_rng(6)
    runs = []
    for k, n in enumerate((10, 12, 9)):
        ids = [f"f{k}_p{i}" for i in range(n)]
        runs.append(write_run(tmp_path, "uni", "abmil", k, ids, both_class_labels(n, rng), 1.5, rng))
    summary = make_report(runs, str(tmp_path / "out"), n_bootstrap=150, seed=3)

    tests = [test_rows(r).reset_index(drop=True) for r in runs]
    low, high, used = _direct_bootstrap_separate(tests, 150, 3)
    assert summary.loc[0, "n_bootstrap_used"] == used
    assert summary.loc[0, "ci_low"] == pytest.approx(low, abs=1e-12)
    assert summary.loc[0, "ci_high"] == pytest.approx(high, abs=1e-12)


def test_ci_deterministic_for_seed(tmp_path):
    runs = shared_runs(tmp_path, "uni", "abmil", 3, 25, signal=1.5, seed=4)
    first = make_report(runs, str(tmp_path / "a"), n_bootstrap=200, seed=11)
    again = make_report(runs, str(tmp_path / "b"), n_bootstrap=200, seed=11)
    other = make_report(runs, str(tmp_path / "c"), n_bootstrap=200, seed=12)
    pd.testing.assert_frame_equal(first, again)
    assert (first.loc[0, "ci_low"], first.loc[0, "ci_high"]) != (other.loc[0, "ci_low"], other.loc[0, "ci_high"])
    # The CI of one model does not depend on which other models share the report.
    extra = shared_runs(tmp_path / "x", "ctp", "mean", 2, 25, signal=0.5, seed=9)
    mixed = make_report(extra + runs, str(tmp_path / "d"), n_bootstrap=200, seed=11)
    row = mixed[mixed["model"] == "abmil"].iloc[0]
    assert (row["ci_low"], row["ci_high"]) == (first.loc[0, "ci_low"], first.loc[0, "ci_high"])


def test_ci_contains_mean_and_narrows_with_more_patients(tmp_path):
    small = make_report(shared_runs(tmp_path / "s", "uni", "abmil", 3, 30, signal=1.5, seed=8),
                        str(tmp_path / "small"), n_bootstrap=300, seed=0).iloc[0]
    large = make_report(shared_runs(tmp_path / "l", "uni", "abmil", 3, 600, signal=1.5, seed=8),
                        str(tmp_path / "large"), n_bootstrap=300, seed=0).iloc[0]
    for row in (small, large):
        assert row["ci_low"] < row["auc_mean"] < row["ci_high"]
    # Width shrinks roughly like 1/sqrt(n): 20x the patients should give well under half the width.
    assert (large["ci_high"] - large["ci_low"]) < 0.5 * (small["ci_high"] - small["ci_low"])


def test_bootstrap_without_replicates_is_nan():
    test = pd.DataFrame({"patient_id": ["a", "b"], "label": [0, 1], "prob": [0.2, 0.9]})
    low, high, used = bootstrap_mean_auc([test], n_bootstrap=0, seed=0)
    assert math.isnan(low) and math.isnan(high) and used == 0


# ---------------------------------------------------------------------------
# Single-class fold
# ---------------------------------------------------------------------------

def test_single_class_fold_is_nan_and_excluded(tmp_path, caplog):
    good = shared_runs(tmp_path, "uni", "abmil", 3, 20, signal=2.0, seed=10)
    rng = np.random.default_rng(0)
    bad = write_run(tmp_path, "uni", "abmil", 3, [f"q{i}" for i in range(6)], np.zeros(6, int), 2.0, rng)
    with caplog.at_level(logging.WARNING, logger="slidemil.report.stats"):
        summary = make_report(good + [bad], str(tmp_path / "out"), n_bootstrap=100, seed=0)
    assert any("fold 3" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)

    per_fold = pd.read_csv(tmp_path / "out" / "per_fold.csv")
    assert math.isnan(per_fold.loc[per_fold["fold"] == 3, "test_auc"].iloc[0])
    valid = per_fold.loc[per_fold["fold"] != 3, "test_auc"]
    row = summary.iloc[0]
    assert row["n_folds"] == 3 and row["n_folds_excluded"] == 1
    assert row["auc_mean"] == pytest.approx(valid.mean(), abs=1e-12)
    assert row["auc_std"] == pytest.approx(valid.std(ddof=1), abs=1e-12)
    # The CI is exactly the one of the valid folds alone (and they keep the shared-patient path).
    alone = make_report(good, str(tmp_path / "alone"), n_bootstrap=100, seed=0).iloc[0]
    assert (row["ci_low"], row["ci_high"], row["n_bootstrap_used"]) == (
        alone["ci_low"], alone["ci_high"], alone["n_bootstrap_used"])

    md = (tmp_path / "out" / "summary.md").read_text()
    assert "3: n/a" in md
    assert "single class" in md and "uni/abmil fold 3" in md


# ---------------------------------------------------------------------------
# Markdown, figures, CLI, input checks
# ---------------------------------------------------------------------------

def test_summary_md_contains_numbers(tmp_path):
    runs = (shared_runs(tmp_path, "uni", "abmil", 2, 20, signal=2.0, seed=12)
            + shared_runs(tmp_path, "ctp", "clam", 2, 20, signal=1.0, seed=13))
    summary = make_report(runs, str(tmp_path / "out"), n_bootstrap=80, seed=0)
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "patient level" in md and "held-out test set" in md
    per_fold = pd.read_csv(tmp_path / "out" / "per_fold.csv")
    table = [line for line in md.splitlines() if line.startswith("| ")][1:]  # skip header
    assert len(table) == 2
    for line, row in zip(table, summary.itertuples()):
        # Rows appear in summary order, each with its own numbers.
        assert f"| {row.extractor} | {row.model} |" in line
        assert f"{row.auc_mean:.3f} ± {row.auc_std:.3f}" in line
        assert f"{row.ci_low:.3f}–{row.ci_high:.3f}" in line
        folds = per_fold[(per_fold["extractor"] == row.extractor) & (per_fold["model"] == row.model)]
        for f in folds.itertuples():
            assert f"{f.fold}: {f.test_auc:.3f}" in line


def test_roc_png_is_valid_image(tmp_path):
    runs = (shared_runs(tmp_path, "uni", "abmil", 3, 25, signal=2.0, seed=14)
            + shared_runs(tmp_path, "ctp", "mean", 2, 25, signal=1.0, seed=15))
    make_report(runs, str(tmp_path / "out"), n_bootstrap=20, seed=0)
    for name in ("roc_uni_abmil.png", "roc_ctp_mean.png"):
        png = tmp_path / "out" / name
        assert png.stat().st_size > 10_000
        image = mpimg.imread(png)
        assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 300 and image.shape[2] in (3, 4)
        assert image[..., :3].std() > 0.01  # not a blank canvas
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "per_fold.csv", "roc_ctp_mean.png", "roc_uni_abmil.png", "summary.csv", "summary.md"]


def test_cli_writes_report(tmp_path, capsys):
    runs = shared_runs(tmp_path, "uni", "abmil", 2, 15, signal=2.0, seed=16)
    runs_json = tmp_path / "runs.json"
    runs_json.write_text(json.dumps(runs))
    assert main(["--runs", str(runs_json), "--out", str(tmp_path / "out"), "--n-bootstrap", "30", "--seed", "2"]) == 0
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    direct = make_report(runs, str(tmp_path / "direct"), n_bootstrap=30, seed=2)
    pd.testing.assert_frame_equal(summary, direct, check_dtype=False)

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--n-bootstrap" in capsys.readouterr().out


def test_invalid_inputs_raise(tmp_path):
    runs = shared_runs(tmp_path, "uni", "abmil", 1, 10, signal=1.0, seed=17)
    with pytest.raises(ValueError, match="duplicate"):
        make_report(runs + runs, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="no runs"):
        make_report([], str(tmp_path / "out"))
    frame = pd.read_csv(runs[0]["predictions"], dtype={"patient_id": str})
    test = frame[frame["partition"] == "test"]
    pd.concat([frame, test.iloc[:1]]).to_csv(runs[0]["predictions"], index=False)
    with pytest.raises(ValueError, match="listed twice"):
        make_report(runs, str(tmp_path / "out"))


# ---------------------------------------------------------------------------
# Paired comparison with a reference model
# ---------------------------------------------------------------------------

def _fold_tests(ids, labels, prob):
    return pd.DataFrame({"patient_id": ids, "label": labels, "prob": prob})


def test_paired_difference_of_identical_models_is_exactly_zero():
    rng = np.random.default_rng(20)
    ids = [f"p{i}" for i in range(30)]
    folds = {k: _fold_tests(ids, both_class_labels(30, rng), rng.uniform(size=30)) for k in range(3)}
    rows = report.paired_auc_difference(folds, folds, n_bootstrap=300, seed=0)
    assert [r["fold"] for r in rows] == [0, 1, 2, "mean"]
    for row in rows:
        assert row["auc_diff"] == 0 and row["ci_low"] == 0 and row["ci_high"] == 0
        assert 0 < row["n_bootstrap_used"] <= 300
    assert rows[-1]["auc_model"] == pytest.approx(np.mean([roc_auc_score(f["label"], f["prob"])
                                                           for f in folds.values()]))


def test_paired_ci_is_above_zero_for_a_clearly_better_model():
    rng = np.random.default_rng(21)
    ids = [f"p{i}" for i in range(80)]
    labels = both_class_labels(80, rng)
    noise = rng.normal(size=80)
    better = {k: _fold_tests(ids, labels, 3.0 * labels + rng.normal(size=80)) for k in range(2)}
    worse = {k: _fold_tests(ids, labels, 0.3 * labels + noise) for k in range(2)}
    rows = report.paired_auc_difference(better, worse, n_bootstrap=400, seed=1)
    for row in rows:
        assert row["auc_diff"] > 0.2 and row["ci_low"] > 0 and row["ci_low"] <= row["auc_diff"] <= row["ci_high"]
    # Swapping the roles mirrors the difference.
    swapped = report.paired_auc_difference(worse, better, n_bootstrap=400, seed=1)
    assert swapped[-1]["auc_diff"] == pytest.approx(-rows[-1]["auc_diff"])
    assert swapped[-1]["ci_high"] < 0


def test_paired_ci_equals_direct_reimplementation():
    """Plain loop over replicates: one draw of the shared patients, both models scored on it."""
    rng = np.random.default_rng(22)
    ids = [f"p{i:02d}" for i in range(12)]
    labels = np.array([0, 1] * 6)
    a = {k: _fold_tests(ids, labels, rng.uniform(size=12) + 0.3 * labels) for k in range(2)}
    b = {k: _fold_tests(ids, labels, rng.uniform(size=12)) for k in range(2)}
    # The reference lists its patients in another order and has one extra patient: only shared ones count.
    b = {k: pd.concat([t.iloc[::-1], _fold_tests(["zz"], [1], [0.5])]) for k, t in b.items()}
    rows = report.paired_auc_difference(a, b, n_bootstrap=150, seed=9)

    draw = np.random.default_rng(9)
    y = labels  # ids are already sorted
    pa = [a[k]["prob"].to_numpy() for k in range(2)]
    pb = [b[k].set_index("patient_id").loc[ids, "prob"].to_numpy() for k in range(2)]
    means, per_fold = [], [[], []]
    for _ in range(150):
        idx = draw.integers(0, 12, size=12)
        if y[idx].min() == y[idx].max():
            continue
        d = [roc_auc_score(y[idx], pa[k][idx]) - roc_auc_score(y[idx], pb[k][idx]) for k in range(2)]
        means.append(np.mean(d))
        for k in range(2):
            per_fold[k].append(d[k])
    assert rows[-1]["n_bootstrap_used"] == len(means) < 150
    assert rows[-1]["ci_low"] == pytest.approx(np.percentile(means, 2.5), abs=1e-12)
    assert rows[-1]["ci_high"] == pytest.approx(np.percentile(means, 97.5), abs=1e-12)
    for k in range(2):
        assert rows[k]["n_test_patients"] == 12
        assert rows[k]["auc_diff"] == pytest.approx(roc_auc_score(y, pa[k]) - roc_auc_score(y, pb[k]), abs=1e-12)
        assert rows[k]["ci_low"] == pytest.approx(np.percentile(per_fold[k], 2.5), abs=1e-12)


def test_compare_models_pairs_within_extractor(tmp_path):
    runs = (shared_runs(tmp_path, "uni", "abmil", 2, 25, signal=1.0, seed=30)
            + shared_runs(tmp_path / "g", "uni", "abmil_gated", 2, 25, signal=1.0, seed=30)
            + shared_runs(tmp_path / "c", "ctp", "abmil_gated", 2, 25, signal=1.0, seed=31))
    _, tests = report.load_tests(runs)
    table = report.compare_models(tests, "abmil", n_bootstrap=50, seed=0)
    assert list(table.columns) == report.COMPARISON_COLUMNS
    # ctp has no abmil: nothing to compare it with; uni/abmil_gated gets two folds and the mean.
    assert set(table["extractor"]) == {"uni"} and list(table["fold"]) == ["0", "1", "mean"]
    for row in table[table["fold"] != "mean"].itertuples():
        gated = test_rows(runs[2 + int(row.fold)])
        base = test_rows(runs[int(row.fold)])
        assert row.auc_model == pytest.approx(roc_auc_score(gated["label"], gated["prob"]))
        assert row.auc_reference == pytest.approx(roc_auc_score(base["label"], base["prob"]))


def test_paired_difference_rejects_disagreeing_labels():
    a = {0: _fold_tests(["a", "b", "c"], [0, 1, 1], [0.1, 0.8, 0.7])}
    b = {0: _fold_tests(["a", "b", "c"], [0, 1, 0], [0.2, 0.6, 0.4])}
    with pytest.raises(ValueError, match="different labels"):
        report.paired_auc_difference(a, b, 10, 0)
