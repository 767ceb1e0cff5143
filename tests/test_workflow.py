"""The whole DAG through the Snakemake command line on a tiny demo cohort."""


import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score
from factories import snakemake_cli, snakemake_report_text, TINY


pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workflow")
    (workdir / "config.yaml").write_text(yaml.safe_dump(TINY))
    proc = snakemake_cli(workdir, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-5000:]
    return workdir


def test_dry_run_lists_dag_and_until(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY))
    proc = snakemake_cli(tmp_path, "--cores", "2", "-n", "--until", "splits")
    assert proc.returncode == 0, proc.stderr
    assert "demo_cohort" in proc.stdout and "splits" in proc.stdout
    # the splits are drawn over the usable slides, so tiling comes before them; features and training do not
    assert "tile_manifest" in proc.stdout
    assert "extract_features" not in proc.stdout and "train" not in proc.stdout


def test_report_numbers_match_predictions(run):
    report = run / "results" / "report"
    per_fold = pd.read_csv(report / "per_fold.csv")
    summary = pd.read_csv(report / "summary.csv")
    assert len(per_fold) == 4 and set(per_fold["model"]) == {"abmil", "mhim_abmil"}
    assert sorted(per_fold.loc[per_fold["model"] == "mhim_abmil", "fold"]) == [0, 1]
    for row in per_fold.itertuples():
        preds = pd.read_csv(run / "results" / "train" / row.extractor / row.model / f"fold_{row.fold}"
                            / "predictions_patients.csv")
        test = preds[preds["partition"] == "test"]
        assert row.test_auc == pytest.approx(roc_auc_score(test["label"], test["prob"]))
        assert row.n_test_patients == len(test) == 4   # 25 % of 16 patients
    assert set(summary["model"]) == {"abmil", "mhim_abmil"}
    for s in summary.itertuples():
        assert s.auc_mean == pytest.approx(per_fold.loc[per_fold["model"] == s.model, "test_auc"].mean())
        assert s.ci_low <= s.auc_mean <= s.ci_high
        assert f"{s.auc_mean:.3f}" in (report / "summary.md").read_text()
    # The tiny cohort still carries the demo's signal.
    assert summary.set_index("model").loc["abmil", "auc_mean"] > 0.5


def test_every_stage_output_is_consistent(run):
    res = run / "results"
    sheet = pd.read_csv(res / "demo" / "samples.csv")
    splits = pd.read_csv(res / "splits" / "splits.csv")
    assert set(splits["slide_id"]) == set(sheet["slide_id"])
    import h5py
    for slide in sheet["slide_id"]:
        with h5py.File(res / "tiles" / f"{slide}.h5") as t, \
                h5py.File(res / "features" / "shufflenet_v2" / f"{slide}.h5") as f:
            np.testing.assert_array_equal(t["coords"][()], f["coords"][()])
            assert f["features"].shape == (len(t["coords"]), 1024)
        assert (res / "logs" / "tiling" / f"{slide}.log").exists()
    # No temporary files left behind by the atomic writes.
    assert not [p for p in res.rglob("*.tmp")]


def test_second_run_does_nothing(run):
    proc = snakemake_cli(run, "--cores", "2", "-n")
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_report_page_and_snakemake_report(run, tmp_path):
    """report.json/html agree with the prediction and feature files; `snakemake --report` holds the figures."""
    import json
    import re
    import zipfile
    from pathlib import Path

    import h5py

    res = run / "results"
    doc = json.loads((res / "report" / "report.json").read_text())
    page = (res / "report" / "report.html").read_text()
    for row in doc["per_fold"]:
        preds = pd.read_csv(res / "train" / row["extractor"] / row["model"] / f"fold_{row['fold']}"
                            / "predictions_patients.csv")
        test = preds[preds["partition"] == "test"]
        assert row["test_auc"] == pytest.approx(roc_auc_score(test["label"], test["prob"]))
    s = doc["summary"][0]
    assert re.search(rf"<tr id=\"summary-shufflenet_v2-abmil\".*?{s['auc_mean']:.3f} ± {s['auc_std']:.3f}", page)
    sheet = pd.read_csv(res / "demo" / "samples.csv")
    assert doc["cohort"]["n_slides"] == len(sheet) and doc["cohort"]["n_patients"] == sheet["patient_id"].nunique()
    for row in doc["cohort"]["slides"]:
        with h5py.File(res / "features" / "shufflenet_v2" / f"{row['slide_id']}.h5") as f:
            assert row["n_tiles"] == len(f["features"]) and row["excluded"] == ("" if len(f["features"]) else
                                                                                "no tissue tiles")
    test0 = [r for r in doc["splits"] if r["fold"] == 0 and r["partition"] == "test"][0]
    assert test0["n_patients"] == 4
    splits = pd.read_csv(res / "splits" / "splits.csv")
    # heatmaps_per_model (2) test slides for each model, the same slides for every model of the extractor.
    assert len(doc["heatmaps"]) == 2 * len(TINY["mil"]["models"])
    assert {h["model"] for h in doc["heatmaps"]} == set(TINY["mil"]["models"])
    slides_per_model = {m: sorted(h["slide_id"] for h in doc["heatmaps"] if h["model"] == m) for m in TINY["mil"]["models"]}
    assert len({tuple(v) for v in slides_per_model.values()}) == 1
    for item in doc["heatmaps"]:
        assert (res / "report" / item["file"]).stat().st_size > 10_000
        assert splits.set_index("slide_id").loc[item["slide_id"], "fold_0"] == "test"
    assert all(src.startswith("data:image/") for src in re.findall(r'src="([^"]*)"', page))

    proc = snakemake_cli(run, "--cores", "2", "--report", str(tmp_path / "report.zip"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [Path(n).name for n in zipfile.ZipFile(tmp_path / "report.zip").namelist()]
    captions = snakemake_report_text(tmp_path / "report.zip")  # the binary captions of workflow/report/*.rst
    for phrase in ("Patient-level ROC curves on the held-out", "validation AUC at the patient level",
                   "predicted probability of the positive class", "(task: binary)"):
        assert phrase in captions, phrase
    for figure in ["report.html", "roc_shufflenet_v2_abmil.png", "history_shufflenet_v2_abmil.png"] + [
            Path(h["file"]).name for h in doc["heatmaps"]]:
        assert figure in names, figure
