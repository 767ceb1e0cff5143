"""The report's encoder comparison (issue 22): each model's extractors against the first, checked against a
direct paired bootstrap written here as a plain loop over replicates with sklearn's AUC; for multiclass, survival
and regression (issue 23), on the task's primary metric, checked against sklearn's and lifelines' metrics."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from lifelines.utils import concordance_index
from sklearn.metrics import r2_score, roc_auc_score

from factories import shared_runs, test_rows, write_task_run
from slidemil import names
from slidemil.report import endpoints
from slidemil.report import page as report_page
from slidemil.report import stats as report

N_TEST, N_FOLDS, N_BOOT, SEED = 30, 2, 300, 4


def direct_paired_bootstrap(candidate: list[pd.DataFrame], reference: list[pd.DataFrame], n_bootstrap: int,
                            seed: int) -> dict:
    """Per fold and mean: AUC difference and percentile CI, every replicate one draw of the shared (sorted)
    test patients on which both are scored; replicates with one class skipped."""
    cand = [c.set_index("patient_id").sort_index() for c in candidate]
    ref = [r.set_index("patient_id").loc[c.index] for r, c in zip(reference, cand)]
    y = cand[0]["label"].to_numpy()
    rng = np.random.default_rng(seed)
    replicates = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(y), size=len(y))
        if y[idx].min() == y[idx].max():
            continue
        replicates.append([roc_auc_score(y[idx], c["prob"].to_numpy()[idx])
                           - roc_auc_score(y[idx], r["prob"].to_numpy()[idx]) for c, r in zip(cand, ref)])
    replicates = np.array(replicates)
    out = {}
    for k, (c, r) in enumerate(zip(cand, ref)):
        diff = roc_auc_score(y, c["prob"]) - roc_auc_score(y, r["prob"])
        out[str(k)] = (diff, *np.percentile(replicates[:, k], [2.5, 97.5]), len(replicates))
    diffs = [out[str(k)][0] for k in range(len(cand))]
    out["mean"] = (np.mean(diffs), *np.percentile(replicates.mean(axis=1), [2.5, 97.5]), len(replicates))
    return out


def _study(tmp_path, extractors: dict[str, float], models=("abmil", "abmil_gated")) -> list[dict]:
    """Runs of every model on every extractor (signal per extractor), all folds on the same test patients."""
    runs = []
    for e, (extractor, signal) in enumerate(extractors.items()):
        for m, model in enumerate(models):
            # One seed for the patients and labels of all runs; the probabilities differ with the signal.
            runs += shared_runs(tmp_path / f"{e}{m}", extractor, model, N_FOLDS, N_TEST, signal * (1 + 0.5 * m),
                                seed=SEED)
    return runs


def _tests_of(runs, extractor, model) -> list[pd.DataFrame]:
    return [test_rows(r)[["patient_id", "label", "prob"]] for r in runs
            if (r["extractor"], r["model"]) == (extractor, model)]


def test_encoder_comparison_equals_a_direct_paired_bootstrap(tmp_path):
    runs = _study(tmp_path, {"resnet50_trunc": 0.6, "uni2_h": 2.5, "virchow2": 1.0})
    runs += shared_runs(tmp_path / "x", "uni2_h", "transmil", N_FOLDS, N_TEST, 1.0, seed=SEED)
    _, tests = report.load_tests(runs)
    table = report.compare_encoders(tests, "resnet50_trunc", N_BOOT, SEED)

    assert list(table.columns) == report.ENCODER_COMPARISON_COLUMNS
    # transmil has one extractor only: nothing to compare; every other pair of model and extractor is there.
    pairs = sorted(set(zip(table["model"], table["extractor"])))
    assert pairs == [(m, e) for m in ("abmil", "abmil_gated") for e in ("uni2_h", "virchow2")]
    assert set(table["reference"]) == {"resnet50_trunc"}
    for (model, extractor), rows in table.groupby(["model", "extractor"]):
        expected = direct_paired_bootstrap(_tests_of(runs, extractor, model), _tests_of(runs, "resnet50_trunc", model),
                                           N_BOOT, SEED)
        assert list(rows["fold"]) == ["0", "1", "mean"]
        for row in rows.itertuples():
            diff, low, high, used = expected[row.fold]
            assert row.n_test_patients == N_TEST and row.n_bootstrap_used == used
            assert (row.auc_diff, row.ci_low, row.ci_high) == pytest.approx((diff, low, high), abs=1e-12)
    # The strong encoder is clearly better than the weak reference under both models.
    means = table[(table["fold"] == "mean") & (table["extractor"] == "uni2_h")]
    assert (means["ci_low"] > 0).all()


def test_model_comparison_is_the_same_paired_bootstrap_with_roles_swapped(tmp_path):
    """One implementation: comparing models on an extractor and encoders under a model give the same numbers
    for the same pair of prediction sets."""
    runs = _study(tmp_path, {"resnet50_trunc": 0.6, "uni2_h": 2.5})
    _, tests = report.load_tests(runs)
    # Rename so that uni2_h/abmil becomes a "model" of resnet50_trunc: the same two prediction sets.
    as_models = {("resnet50_trunc", "abmil"): tests[("resnet50_trunc", "abmil")],
                 ("resnet50_trunc", "uni"): tests[("uni2_h", "abmil")]}
    by_model = report.compare_models(as_models, "abmil", N_BOOT, SEED)
    by_encoder = report.compare_encoders(tests, "resnet50_trunc", N_BOOT, SEED)
    by_encoder = by_encoder[by_encoder["model"] == "abmil"]
    pd.testing.assert_frame_equal(by_model[report.PAIRED_COLUMNS].reset_index(drop=True),
                                  by_encoder[report.PAIRED_COLUMNS].reset_index(drop=True))
    with pytest.raises(ValueError, match="vary"):
        report.compare_runs(tests, "fold", "0", N_BOOT, SEED)


def _row(page: str, row_id: str) -> list[str]:
    match = re.search(rf'<tr id="{re.escape(row_id)}"[^>]*>(.*?)</tr>', page)
    assert match, f"no table row {row_id}"
    return [re.sub("<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", match.group(1))]


def test_report_page_shows_the_encoder_comparison(tmp_path):
    # The first extractor of the runs (the workflow's order: features.extractors) is the reference.
    runs = _study(tmp_path, {"uni2_h": 0.5, "resnet50_trunc": 2.0})
    out = tmp_path / "report"
    doc = report_page.build_report(runs, out, {"n_bootstrap": N_BOOT}, seed=SEED)

    on_disk = json.loads((out / "report.json").read_text())["encoder_comparison"]
    assert on_disk == doc["encoder_comparison"] and len(on_disk) == 2 * (N_FOLDS + 1)
    csv = pd.read_csv(out / "encoder_comparison.csv", dtype={"fold": str})
    assert list(csv.columns) == report.ENCODER_COMPARISON_COLUMNS and len(csv) == len(on_disk)
    page = (out / "report.html").read_text()
    assert "<a href='#encoders'>" in page and doc["figures"]["encoder_comparison"] == "encoder_comparison.png"
    for model in ("abmil", "abmil_gated"):
        expected = direct_paired_bootstrap(_tests_of(runs, "resnet50_trunc", model), _tests_of(runs, "uni2_h", model),
                                           N_BOOT, SEED)
        for row in (r for r in on_disk if r["model"] == model):
            diff, low, high, _ = expected[row["fold"]]
            assert row["reference"] == "uni2_h" and row["extractor"] == "resnet50_trunc"
            assert (row["auc_diff"], row["ci_low"], row["ci_high"]) == pytest.approx((diff, low, high), abs=1e-12)
            cells = _row(page, f"encoders-{model}-resnet50_trunc-{row['fold']}")
            assert cells[6] == f"{diff:+.3f}" and cells[7] == f"{low:+.3f} – {high:+.3f}"


def test_one_extractor_says_there_is_nothing_to_compare(tmp_path):
    runs = _study(tmp_path, {"resnet50_trunc": 1.0})
    out = tmp_path / "report"
    doc = report_page.build_report(runs, out, {"n_bootstrap": 50}, seed=0)
    assert doc["encoder_comparison"] == [] and doc["figures"]["encoder_comparison"] is None
    assert list(pd.read_csv(out / "encoder_comparison.csv").columns) == report.ENCODER_COMPARISON_COLUMNS
    assert not (out / "encoder_comparison.png").exists()
    assert "One extractor: nothing to compare" in (out / "report.html").read_text()


def test_the_missing_reference_note_only_when_the_reference_model_is_missing(tmp_path):
    note = "is not among the trained models"
    # One model (the reference) on two extractors: no model comparison, and nothing missing either.
    one_model = _study(tmp_path / "a", {"uni2_h": 0.5, "resnet50_trunc": 2.0}, models=("abmil",))
    doc = report_page.build_report(one_model, tmp_path / "ra", {"n_bootstrap": 50}, seed=0)
    assert doc["comparison"] == [] and not any(note in n for n in doc["notes"])
    # Two models, neither the reference: the note says so.
    others = _study(tmp_path / "b", {"resnet50_trunc": 1.0}, models=("abmil_gated", "meanpool"))
    doc = report_page.build_report(others, tmp_path / "rb", {"n_bootstrap": 50}, seed=0)
    assert any(note in n and "'abmil'" in n for n in doc["notes"])


# ---------------------------------------------------------------- multiclass, survival, regression

TASK_BOOT, REFERENCE, OTHER = 60, "resnet50_trunc", "uni2_h"
TASK_COLUMNS = ["model", "extractor", "reference", *endpoints.PAIRED_COLUMNS]


def direct_metric(task_name: str, test: pd.DataFrame) -> float:
    """The task's primary metric written out: mean one-vs-rest AUC, Harrell's C (higher risk, earlier event), R²."""
    if task_name == "multiclass":
        probs = test.filter(like="prob_").to_numpy()
        return float(np.mean([roc_auc_score(test["label"] == k, probs[:, k]) for k in range(probs.shape[1])]))
    if task_name == "survival":
        return concordance_index(test["time"], -test["risk"], test["label"])
    return r2_score(test["label"], test["pred"])


def _task_study(tmp_path, task_name: str, extractors: dict[str, float]) -> list[dict]:
    """Two folds of abmil and meanpool on every extractor (signal per extractor, the same test patients, another seed
    per run), and transmil on the last extractor only."""
    runs = []
    for e, (extractor, signal) in enumerate(extractors.items()):
        models = ["abmil", "meanpool"] + (["transmil"] if e == len(extractors) - 1 and e else [])
        runs += [dict(write_task_run(tmp_path / extractor, task_name, model, fold, signal=signal,
                                     seed=100 * e + 10 * m + fold), extractor=extractor)
                 for m, model in enumerate(models) for fold in (0, 1)]
    return runs


def _task_test(run) -> pd.DataFrame:
    frame = pd.read_csv(run["predictions"], dtype={"patient_id": str})
    return frame[frame["partition"] == "test"]


@pytest.mark.parametrize("task_name", ["multiclass", "survival", "regression"])
def test_task_encoder_comparison_on_the_primary_metric(tmp_path, task_name):
    # The first extractor of the runs (the workflow's order: features.extractors) is the reference.
    # write_task_run's regression prediction is label * signal / 2 + noise: R² is best at signal 2.
    strong = 2.0 if task_name == "regression" else 3.0
    runs = _task_study(tmp_path, task_name, {REFERENCE: 0.2, OTHER: strong})
    out = tmp_path / "report"
    doc = report_page.build_report(runs, out, {"n_bootstrap": TASK_BOOT}, seed=SEED)

    table = pd.read_csv(out / "encoder_comparison.csv", dtype={"fold": str})
    assert list(table.columns) == TASK_COLUMNS
    assert json.loads((out / "report.json").read_text())["encoder_comparison"] == doc["encoder_comparison"]
    assert len(doc["encoder_comparison"]) == len(table)
    # transmil has one extractor only; abmil and meanpool: a row per fold and the mean.
    expected_rows = [(m, f) for m in ("abmil", "meanpool") for f in ("0", "1", "mean")]
    assert list(zip(table["model"], table["fold"])) == expected_rows
    assert set(table["extractor"]) == {OTHER} and set(table["reference"]) == {REFERENCE}
    page = (out / "report.html").read_text()
    assert "<a href='#encoders'>" in page and doc["figures"]["encoder_comparison"] == "encoder_comparison.png"
    assert (out / "encoder_comparison.png").is_file()
    for model, rows in table.groupby("model"):
        tests = {e: {str(r["fold"]): _task_test(r) for r in runs if (r["extractor"], r["model"]) == (e, model)}
                 for e in (OTHER, REFERENCE)}
        expected = {f: (direct_metric(task_name, tests[OTHER][f]), direct_metric(task_name, tests[REFERENCE][f]))
                    for f in ("0", "1")}
        expected["mean"] = tuple(np.mean([expected[f][k] for f in ("0", "1")]) for k in (0, 1))
        for row in rows.itertuples():
            candidate, reference = expected[row.fold]
            assert (row.metric_model, row.metric_reference) == pytest.approx((candidate, reference), abs=1e-12)
            assert row.difference == pytest.approx(candidate - reference, abs=1e-12)
            assert row.n_test_patients == 30 and 0 < row.n_bootstrap_used <= TASK_BOOT
            cells = _row(page, f"encoders-{model}-{OTHER}-{row.fold}")
            assert cells[4:7] == [f"{candidate:.3f}", f"{reference:.3f}", f"{row.difference:+.3f}"]
            assert cells[7] == f"{row.ci_low:+.3f} – {row.ci_high:+.3f}"
        mean = rows[rows["fold"] == "mean"].iloc[0]
        assert mean.ci_low <= mean.difference <= mean.ci_high
        assert mean.difference > 0  # the strong encoder beats the weak reference
    assert f"{names.METRIC_NAMES[doc['task']['metric']]} {REFERENCE}</th>" in page


@pytest.mark.parametrize("task_name", ["multiclass", "survival", "regression"])
def test_task_with_one_extractor_has_nothing_to_compare(tmp_path, task_name):
    runs = _task_study(tmp_path, task_name, {REFERENCE: 1.0})
    out = tmp_path / "report"
    doc = report_page.build_report(runs, out, {"n_bootstrap": 20}, seed=0)
    assert doc["encoder_comparison"] == [] and doc["figures"]["encoder_comparison"] is None
    assert (out / "encoder_comparison.csv").read_text().strip() == ",".join(TASK_COLUMNS)
    assert not (out / "encoder_comparison.png").exists()
    page = (out / "report.html").read_text()
    assert "<a href='#encoders'>" in page and "One extractor: nothing to compare" in page


def test_task_compare_is_the_same_pairing_with_roles_swapped(tmp_path):
    """endpoints.compare varies the model or the extractor with one implementation: the same two prediction sets
    give the same numbers either way."""
    task = endpoints.make_task("regression")
    _, tests = endpoints.load_runs(_task_study(tmp_path, "regression", {REFERENCE: 0.5, OTHER: 2.5}), task)
    as_models = {(REFERENCE, "abmil"): tests[(REFERENCE, "abmil")], (REFERENCE, "uni"): tests[(OTHER, "abmil")]}
    by_model = endpoints.compare(task, as_models, "abmil", 40, SEED)
    by_encoder = endpoints.compare(task, tests, REFERENCE, 40, SEED, vary="extractor")
    assert list(by_model.columns[:3]) == ["extractor", "model", "reference"]
    pd.testing.assert_frame_equal(by_model[endpoints.PAIRED_COLUMNS],
                                  by_encoder[by_encoder["model"] == "abmil"][endpoints.PAIRED_COLUMNS]
                                  .reset_index(drop=True))
    with pytest.raises(ValueError, match="vary"):
        endpoints.compare(task, tests, "0", 40, SEED, vary="fold")
