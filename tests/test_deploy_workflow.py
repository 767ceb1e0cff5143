"""Issue 24 through the Snakemake command line: the demo's second cohort deployed after training, the real
slides as an unlabelled cohort, leakage refused, and what reruns when a deploy cohort is added or edited."""

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from factories import direct_probability, job_counts, snakemake_cli, TINY, write_deploy_cohort
from slidemil.deploy.predict import ENSEMBLE
from slidemil.files.features import read_features
from slidemil.report.stats import bootstrap_mean_auc

pytestmark = pytest.mark.workflow

CONFIG = {**TINY, "deploy": {"demo_patients": 6}}
MODELS = ("abmil", "mhim_abmil")
EXTRACTOR = "shufflenet_v2"
EXTERNAL = "demo_external"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("deploy_run")
    (workdir / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    # 76 jobs: about 12 min on 2 busy cores, so more than the runner's default 15 min limit on a slower day.
    proc = snakemake_cli(workdir, "--cores", "2", timeout=2400)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return workdir


def dry_run(workdir, config: dict) -> tuple[int, dict, str]:
    (workdir / "edited.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake_cli(workdir, "-n", "--cores", "2", configfile="edited.yaml")
    text = proc.stdout + proc.stderr
    return proc.returncode, job_counts(text) if proc.returncode == 0 else {}, text


def predictions(run, cohort, model, level="slides"):
    path = run / "results" / "deploy" / cohort / "predictions" / EXTRACTOR / model / f"predictions_{level}.csv"
    return pd.read_csv(path, dtype={"slide_id": str, "patient_id": str}, keep_default_na=False, na_values=[""])


def test_predictions_are_the_fold_checkpoints_and_their_mean(run):
    for model in MODELS:
        slides = predictions(run, EXTERNAL, model)
        assert len(slides) == len(pd.read_csv(run / "results" / "demo_external" / "samples.csv"))
        for row in slides.head(3).itertuples():
            features = run / "results" / "deploy" / EXTERNAL / "features" / EXTRACTOR / f"{row.slide_id}.h5"
            bag = read_features(features, ("features",))[0]["features"]
            for fold in (0, 1):
                ckpt = run / "results" / "train" / EXTRACTOR / model / f"fold_{fold}" / "model.pt"
                assert getattr(row, f"prob_fold_{fold}") == pytest.approx(direct_probability(ckpt, bag), abs=1e-5)
        assert np.allclose(slides[ENSEMBLE], slides[["prob_fold_0", "prob_fold_1"]].mean(axis=1))


def test_external_auc_and_ci_match_a_direct_computation(run):
    report = run / "results" / "report" / "deploy" / EXTERNAL
    metrics = pd.read_csv(report / "metrics.csv", dtype={"fold": str})
    assert set(metrics["model"]) == set(MODELS) and set(metrics["fold"]) == {"0", "1", "ensemble"}
    for row in metrics.itertuples():
        patients = predictions(run, EXTERNAL, row.model, "patients")
        column = ENSEMBLE if row.fold == "ensemble" else f"prob_fold_{row.fold}"
        test = patients[["patient_id", "label", column]].rename(columns={column: "prob"})
        assert row.auc == pytest.approx(roc_auc_score(test["label"], test["prob"]))
        low, high, _ = bootstrap_mean_auc([test], CONFIG["report"]["n_bootstrap"], 0)
        assert (row.ci_low, row.ci_high) == pytest.approx((low, high))
    html = (report / "report.html").read_text()
    assert "External validation" in html and "calibration" in html and "Comparison with abmil" in html


def test_deploy_slides_never_enter_training(run):
    res = run / "results"
    external = set(pd.read_csv(res / "demo_external" / "samples.csv")["slide_id"])
    assert all(s.startswith("EXT-") for s in external)
    assert not external & set(pd.read_csv(res / "splits" / "splits.csv")["slide_id"])
    assert not external & set(pd.read_csv(res / "features" / EXTRACTOR / "manifest.csv")["slide_id"])
    assert not external & set(pd.read_csv(res / "report" / "cohort.csv")["slide_id"])


def test_a_cohort_sharing_slides_or_patients_with_training_is_refused(run, tmp_path):
    demo = pd.read_csv(run / "results" / "demo" / "samples.csv")
    leaky = pd.DataFrame({"slide_id": ["N1", "N2"], "patient_id": ["NEW-1", demo.loc[1, "patient_id"]],
                          "path": [str(run / "results" / "demo" / demo.loc[0, "path"]),
                                   str(run / "results" / "demo" / demo.loc[1, "path"])]})
    leaky.to_csv(tmp_path / "leaky.csv", index=False)
    rc, _, text = dry_run(run, {**CONFIG, "deploy": {"cohorts": {"leaky": {"samples": str(tmp_path / "leaky.csv")}}}})
    assert rc != 0 and "deploy.cohorts.leaky" in text and "leakage" in text
    assert f"training slide {demo.loc[0, 'slide_id']}" in text and demo.loc[1, "patient_id"] in text
    assert "Traceback" not in text


def test_a_deleted_prediction_file_is_made_again(run):
    path = run / "results" / "deploy" / EXTERNAL / "predictions" / EXTRACTOR / "abmil" / "predictions_slides.csv"
    aside = path.with_name("aside.csv")
    path.rename(aside)
    try:
        assert dry_run(run, CONFIG)[1] == {"predict": 1, "deploy_report": 1}
    finally:
        aside.rename(path)


def real_slides_sheet(shared_slides, folder):
    files = sorted(p for p in shared_slides.rglob("*") if p.suffix in (".svs", ".tiff"))
    ids = [f"{p.parent.name}-{p.stem}" if p.parent != shared_slides else p.stem for p in files]
    sheet = pd.DataFrame({"slide_id": ids, "patient_id": [f"REAL-{i}" for i in ids], "path": map(str, files)})
    sheet.to_csv(folder / "real.csv", index=False)
    return sheet


def test_adding_and_editing_a_cohort_never_retrains(run, shared_slides, tmp_path_factory):
    folder = tmp_path_factory.mktemp("real_cohort")
    sheet = real_slides_sheet(shared_slides, folder)
    config = {**CONFIG, "deploy": {"demo_patients": 6, "cohorts": {"real": {"samples": str(folder / "real.csv")}}}}
    n = len(sheet)
    rc, jobs, text = dry_run(run, config)
    assert rc == 0, text[-3000:]
    # The main report too: it links to every cohort's page.
    assert jobs == {"deploy_tile_slide": n, "deploy_tile_manifest": 1, "deploy_extract_features": n,
                    "deploy_feature_manifest": 1, "predict": len(MODELS), "deploy_report": 1, "report": 1}
    proc = snakemake_cli(run, "--cores", "2", configfile="edited.yaml", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-5000:]
    # An unlabelled cohort of the real slides: a prediction per usable slide, the broken ones excluded with why.
    slides = predictions(run, "real", "abmil").set_index("slide_id")
    assert not np.isnan(slides.loc["CMU-1-Small-Region", ENSEMBLE])
    for broken in ("bad-unopenable", "bad-unreadable", "bad-broken"):
        assert slides.loc[broken, "excluded"] and np.isnan(slides.loc[broken, ENSEMBLE])
    assert (slides["excluded"].fillna("") == "").sum() == slides[ENSEMBLE].notna().sum() >= 1
    report = run / "results" / "report" / "deploy" / "real"
    html = (report / "report.html").read_text()
    assert "Predictions per patient" in html and "Attention heatmaps" in html and "bad-broken" in html
    assert not (report / "metrics.csv").exists()
    # Editing the cohort (a slide removed) reruns its manifests, predictions and report only.
    sheet[sheet["slide_id"] != "small"].to_csv(folder / "real.csv", index=False)
    rc, jobs, text = dry_run(run, config)
    assert jobs == {"deploy_tile_manifest": 1, "deploy_feature_manifest": 1, "predict": len(MODELS),
                    "deploy_report": 1}, text[-3000:]
    # A report setting reruns both reports, never training; a training setting reruns the deploy predictions too.
    _, jobs, _ = dry_run(run, {**config, "report": {"n_bootstrap": 300}})
    assert jobs.get("train") is None and jobs["deploy_report"] == 2 and jobs["report"] == 1
    _, jobs, _ = dry_run(run, {**config, "mil": {**CONFIG["mil"], "training": {"epochs": 9, "patience": 4,
                                                                            "lr": 0.0005}}})
    assert jobs["train"] == 4 and jobs["predict"] == 2 * len(MODELS) and "deploy_extract_features" not in jobs


def test_feature_sheets_are_deployed_through_the_import(tmp_path):
    training = write_deploy_cohort(tmp_path / "train", n_patients=16, prefix="T")
    new = write_deploy_cohort(tmp_path / "new", n_patients=6, prefix="N")
    unlabelled = new["table"].drop(columns="label")
    unlabelled.to_csv(tmp_path / "new" / "unlabelled.csv", index=False)
    config = {**TINY, "samples": str(training["sheet"]), "features": {"precomputed": "bags"},
              "mil": {**TINY["mil"], "models": ["abmil"]},
              "deploy": {"cohorts": {"new": {"samples": str(new["sheet"])},
                                     "new_unlabelled": {"samples": str(tmp_path / "new" / "unlabelled.csv")}}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake_cli(tmp_path, "-n", "--cores", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = job_counts(proc.stdout + proc.stderr)
    assert jobs["deploy_import_features"] == 2 * len(new["table"]) and jobs["predict"] == 2
    assert jobs["deploy_report"] == 2 and "deploy_tile_slide" not in jobs and "deploy_extract_features" not in jobs
