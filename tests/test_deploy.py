"""Issue 24, without Snakemake: deploy config and sheets, leakage, predictions from checkpoints, the deploy report."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score

from factories import (direct_probability, tiled_slide, train_two_folds, untrained_checkpoint, write_deploy_cohort,
                       write_sheet)
from slidemil.cli import main as cli
from slidemil.cohort.deploy import leakage_problems, load_deploy_sheet
from slidemil.cohort.sheet import load_sheet
from slidemil.config import ConfigError, check_config
from slidemil.deploy.predict import ENSEMBLE, SPREAD, patient_probabilities, predict_cohort
from slidemil.deploy.report import build_deploy_report, extreme_slides, slide_scores
from slidemil.demo.external import plan_external_cohort, shift_colours
from slidemil.demo.plan import plan_cohort
from slidemil.features.extract import extract_features
from slidemil.files.features import read_features
from slidemil.report.stats import bootstrap_mean_auc


# ---- config and sheets ----

@pytest.mark.parametrize("deploy, key", [
    ({"cohorts": {"ext/1": {"samples": "s.csv"}}}, "deploy.cohorts.ext/1"),
    ({"cohorts": {"ext": {"sheet": "s.csv"}}}, "deploy.cohorts.ext.sheet"),
    ({"cohorts": {"ext": {}}}, "deploy.cohorts.ext.samples"),
    ({"cohort": {}}, "deploy.cohort"),
    ({"demo_patients": -1}, "deploy.demo_patients"),
])
def test_a_deploy_typo_is_one_line_naming_the_key(deploy, key):
    with pytest.raises(ConfigError) as err:
        check_config({"deploy": deploy})
    assert str(err.value).startswith(f"config: {key}") and "\n" not in str(err.value)


def test_a_cohort_may_be_given_as_its_sheet_path():
    assert check_config({"deploy": {"cohorts": {"ext": "s.csv"}}})["deploy"]["cohorts"] == {"ext": {"samples": "s.csv"}}


def test_the_demo_cohort_is_for_the_demo_only():
    with pytest.raises(ConfigError, match="deploy.demo_patients"):
        check_config({"samples": "mine.csv", "deploy": {"demo_patients": 4}})


def test_an_unlabelled_sheet_loads_and_a_partly_labelled_one_is_refused(tmp_path):
    rows = [("A1", "PA", "a.svs", 1), ("B1", "PB", "b.svs", None)]
    sheet = write_sheet(tmp_path, rows)
    with pytest.raises(ValueError, match="missing label in row"):
        load_deploy_sheet(sheet)
    pd.read_csv(sheet).drop(columns="label").to_csv(tmp_path / "unlabelled.csv", index=False)
    loaded = load_deploy_sheet(tmp_path / "unlabelled.csv")
    assert "label" not in loaded.columns and loaded["path"].tolist() == [str(tmp_path / "a.svs"),
                                                                           str(tmp_path / "b.svs")]


def test_class_names_follow_the_training_cohorts_positive_class(tmp_path):
    sheet = write_sheet(tmp_path, [("A1", "PA", "a.svs", "tumour"), ("B1", "PB", "b.svs", "normal")])
    assert load_deploy_sheet(sheet, positive_class="tumour")["label"].tolist() == [1, 0]


def test_leakage_lists_shared_slide_files_and_patients(tmp_path):
    train = load_sheet(write_sheet(tmp_path / "train", [("T1", "P1", "t1.svs", 1), ("T2", "P2", "t2.svs", 0)]))
    deploy = load_deploy_sheet(write_sheet(tmp_path / "new", [
        ("N1", "P9", str(tmp_path / "train" / "t1.svs"), 1), ("N2", "P2", "n2.svs", 0), ("N3", "P3", "n3.svs", 1)]))
    problems = leakage_problems(train, deploy)
    assert any("slide N1" in p and "training slide T1" in p for p in problems)
    assert any("patient id(s) also in the training cohort: P2" in p for p in problems)
    assert not any("N3" in p for p in problems)
    clean = deploy[deploy["slide_id"] == "N3"]
    assert leakage_problems(train, clean) == []


# ---- predictions ----

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    checkpoints = train_two_folds(root / "train")
    cohort = write_deploy_cohort(root / "new", empty="N04_0")
    return {"root": root, "checkpoints": checkpoints, **cohort}


def test_predictions_are_the_checkpoints_and_the_ensemble_their_mean(trained, tmp_path):
    out = tmp_path / "slides.csv", tmp_path / "patients.csv"
    slides = predict_cohort(trained["checkpoints"], trained["manifest"], trained["sheet"], *out, device="cpu")
    usable = slides[slides["excluded"] == ""]
    assert len(usable) == len(trained["table"]) - 1
    for row in usable.head(5).itertuples():
        feats = read_features(trained["root"] / "new" / f"{row.slide_id}.h5", ("features",))[0]["features"]
        for fold, ckpt in enumerate(trained["checkpoints"]):
            assert getattr(row, f"prob_fold_{fold}") == pytest.approx(direct_probability(ckpt, feats), abs=1e-5)
    assert np.allclose(usable[ENSEMBLE], usable[["prob_fold_0", "prob_fold_1"]].mean(axis=1))
    assert np.allclose(usable[SPREAD], usable[["prob_fold_0", "prob_fold_1"]].std(axis=1, ddof=0))
    empty = slides.set_index("slide_id").loc["N04_0"]
    assert empty["excluded"] == "no tissue tiles" and np.isnan(empty[ENSEMBLE])
    patients = pd.read_csv(out[1], dtype={"patient_id": str})
    two = usable[usable["patient_id"] == "NP00"]
    assert patients.set_index("patient_id").loc["NP00", "prob_fold_1"] == pytest.approx(two["prob_fold_1"].mean())
    assert "NP04" not in set(patients["patient_id"])  # its only slide has no tiles
    # The signal of make_bag survives: the models rank the new cohort's patients.
    assert roc_auc_score(patients["label"], patients[ENSEMBLE]) > 0.8


def test_features_of_another_extractor_are_refused(trained, tmp_path):
    train_manifest, new_manifest = tmp_path / "train_manifest.csv", tmp_path / "new_manifest.csv"
    table = pd.read_csv(trained["manifest"])
    table.assign(extractor="uni", weights_digest="abc").to_csv(train_manifest, index=False)
    table.assign(extractor="uni", weights_digest="def").to_csv(new_manifest, index=False)
    with pytest.raises(ValueError, match="features made with weights_digest def, but the models were trained on abc"):
        predict_cohort(trained["checkpoints"], new_manifest, trained["sheet"], tmp_path / "s.csv",
                       tmp_path / "p.csv", training_manifest=str(train_manifest), device="cpu")


def test_command_line_predicts_a_folder_and_refuses_wrong_sizes(trained, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    assert cli(["predict", "--checkpoints", *trained["checkpoints"], "--features", str(trained["root"] / "new"),
                "--out", str(out), "--sheet", str(trained["sheet"]), "--out-patients", str(tmp_path / "p.csv")]) == 0
    table = pd.read_csv(out)
    assert len(table) == len(trained["table"]) and set(table["patient_id"]) == set(trained["table"]["patient_id"])
    wrong = tmp_path / "wrong.h5"
    from slidemil.files import write_h5
    write_h5(wrong, {"features": np.zeros((3, 5), np.float32), "coords": np.zeros((3, 2))}, {})
    assert cli(["predict", "--checkpoints", trained["checkpoints"][0], "--features", str(wrong),
                "--out", str(tmp_path / "x.csv")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "wrong.h5" in err and "16-d" in err


def test_patient_ensemble_is_the_mean_of_fold_patient_probabilities():
    slides = pd.DataFrame({"slide_id": ["a", "b", "c"], "patient_id": ["p", "p", "q"],
                           "prob_fold_0": [0.2, 0.4, 0.9], "prob_fold_1": [0.6, 0.8, np.nan]})
    slides[ENSEMBLE] = [0.4, 0.6, 0.9]
    patients = patient_probabilities(slides).set_index("patient_id")
    assert patients.loc["p", "prob_fold_0"] == pytest.approx(0.3)
    assert patients.loc["p", ENSEMBLE] == pytest.approx(0.5) and patients.loc["p", SPREAD] == pytest.approx(0.2)
    assert patients.loc["p", "n_slides"] == 2


# ---- the deploy report ----

def test_labelled_report_numbers_match_a_direct_computation(trained, tmp_path):
    out = tmp_path / "pred"
    runs = []
    for model in ("abmil", "abmil_gated"):
        files = out / f"{model}_slides.csv", out / f"{model}_patients.csv"
        predict_cohort(trained["checkpoints"], trained["manifest"], trained["sheet"], *files, device="cpu")
        if model == "abmil_gated":  # a second "model": the same predictions, shifted ranks for one patient
            p = pd.read_csv(files[1], dtype={"patient_id": str})
            p.loc[0, ["prob_fold_0", "prob_fold_1", ENSEMBLE]] = 1 - p.loc[0, ENSEMBLE]
            p.to_csv(files[1], index=False)
        runs.append({"extractor": "e", "model": model, "slides": str(files[0]), "patients": str(files[1]),
                     "checkpoint": trained["checkpoints"][0], "features": str(trained["manifest"]), "tiles": None})
    settings = {"n_bootstrap": 200, "reference_model": "abmil", "heatmaps_per_model": 1, "heatmap_top_k": 2}
    doc = build_deploy_report("ext", runs, tmp_path / "report", settings, seed=3, sheet=trained["sheet"])
    metrics = pd.read_csv(tmp_path / "report" / "metrics.csv", dtype={"fold": str})
    patients = pd.read_csv(runs[0]["patients"], dtype={"patient_id": str})
    row = metrics[(metrics["model"] == "abmil") & (metrics["fold"] == "ensemble")].iloc[0]
    test = patients[["patient_id", "label", ENSEMBLE]].rename(columns={ENSEMBLE: "prob"})
    assert row.auc == pytest.approx(roc_auc_score(test["label"], test["prob"]))
    assert (row.ci_low, row.ci_high) == pytest.approx(bootstrap_mean_auc([test], 200, 3)[:2])
    assert row.brier == pytest.approx(brier_score_loss(test["label"], test["prob"]))
    assert set(metrics["fold"]) == {"0", "1", "ensemble"} and len(metrics) == 6
    comparison = pd.read_csv(tmp_path / "report" / "comparison.csv", dtype={"fold": str})
    assert set(comparison["fold"]) == {"0", "1", "mean", "ensemble"}
    assert (comparison["auc_diff"] <= 1e-12).all() and (comparison["auc_diff"] < 0).any()
    assert doc["n_usable"] == len(trained["table"]) - 1 and doc["excluded"][0]["slide_id"] == "N04_0"
    html = (tmp_path / "report" / "report.html").read_text()
    assert "External validation" in html and f"{row.auc:.3f}" in html and "N04_0" in html


def test_extreme_slides_are_the_highest_and_lowest_without_repeats():
    slides = pd.DataFrame({"slide_id": list("abcde"), ENSEMBLE: [0.5, 0.9, np.nan, 0.1, 0.3],
                           SPREAD: [0.0, 0.1, np.nan, 0.2, 0.3]})
    scores = slide_scores(slides)
    assert scores["slide_id"].tolist() == list("abde") and scores["spread"].tolist() == [0.0, 0.1, 0.2, 0.3]
    assert extreme_slides(scores, 2) == [("b", "highest"), ("a", "highest"), ("d", "lowest"), ("e", "lowest")]
    assert extreme_slides(scores.head(2), 2) == [("b", "highest"), ("a", "highest")]


# ---- the demo's second cohort ----

def test_external_demo_cohort_has_its_own_patients_and_shifted_stains():
    table = plan_external_cohort(8, {"seed": 7})
    assert table["patient_id"].str.startswith("EXT-P").all() and table["path"].str.startswith("slides/EXT-").all()
    # New patients: the plan of the next seed, not the training cohort's under other names.
    training = plan_cohort(8, 7, patterns=True).drop_duplicates("patient_id")
    planned = plan_external_cohort(8, {"seed": 7}, patterns=True).drop_duplicates("patient_id")
    assert not np.allclose(planned["lymphoid_tile_fraction"], training["lymphoid_tile_fraction"])
    rgb = np.array([[[255, 255, 255], [180, 90, 160]]], dtype=np.uint8)
    shifted = shift_colours(rgb)
    assert (shifted[0, 0] == 255).all()   # white stays white: background is still background
    assert 3 <= np.abs(shifted[0, 1].astype(int) - rgb[0, 1]).max() <= 20


def test_slides_are_tiled_and_extracted_as_the_training_features_were(tmp_path):
    slide = tiled_slide(tmp_path, "NEW1", slide_px=768)
    like = tmp_path / "like.h5"
    extract_features(slide["slide"], slide["tiles"], str(like), extractor="shufflenet_v2", weights="random",
                     input_px=64, device="cpu", slide_id="NEW1")
    ckpt = untrained_checkpoint(tmp_path / "model.pt", in_dim=1024)
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide")
    out = tmp_path / "from_slides.csv"
    assert cli(["predict", "--checkpoints", ckpt, "--slides", slide["slide"], str(broken), "--like", str(like),
                "--out", str(out), "--device", "cpu"]) == 0
    table = pd.read_csv(out, keep_default_na=False, na_values=[""]).set_index("slide_id")
    bag = read_features(like, ("features",))[0]["features"]
    assert table.loc["NEW1", "prob_fold_0"] == pytest.approx(direct_probability(ckpt, bag), abs=1e-5)
    assert "broken.svs" in table.loc["broken", "excluded"] and np.isnan(table.loc["broken", ENSEMBLE])
    assert cli(["predict", "--checkpoints", ckpt, "--slides", slide["slide"], "--like", str(like), "--seed", "5",
                "--out", str(tmp_path / "other_seed.csv"), "--device", "cpu"]) == 1


# ---- the main report's links ----

def test_main_report_links_each_deploy_cohort_page(tmp_path):
    import re

    from factories import shared_runs
    from slidemil.report.page import build_report

    runs = shared_runs(tmp_path, "e", "abmil", 2, 12, 2.0, 0)
    doc = build_report(runs, tmp_path / "report", {"n_bootstrap": 20}, deploy_cohorts=["ext", "real"])
    html = (tmp_path / "report" / "report.html").read_text()
    assert re.findall(r'href="(deploy/[^"]+)"', html) == ["deploy/ext/report.html", "deploy/real/report.html"]
    assert "<a href='#deploy'>Deploy cohorts</a>" in html and [d["cohort"] for d in doc["deploy"]] == ["ext", "real"]
    plain = build_report(runs, tmp_path / "plain", {"n_bootstrap": 20})
    assert "deploy" not in plain and "Deploy cohorts" not in (tmp_path / "plain" / "report.html").read_text()


# ---- deploy.refit ----

def test_refit_trains_the_median_fold_epoch_count_on_all_non_test_patients(trained, tmp_path):
    from factories import MODEL_KWARGS, FAST
    from slidemil.files.checkpoint import read_checkpoint, write_checkpoint
    from slidemil.files.splits import read_splits
    from slidemil.mil.refit import SPLITS_NAME, refit_epochs, refit_model
    from slidemil.mil.train import Recipe

    epochs = [read_checkpoint(p)["epoch"] for p in trained["checkpoints"]]
    odd = []
    for k, epoch in enumerate((2, 3, 7)):
        odd.append(tmp_path / f"e{k}.pt")
        write_checkpoint(odd[-1], {**read_checkpoint(trained["checkpoints"][0]), "epoch": epoch})
    assert refit_epochs(odd) == 3 and refit_epochs(odd[:2]) == 3  # the median; 2.5 rounds up
    root = trained["root"] / "train"
    features = {p.stem: str(p) for p in root.glob("S*.h5")}
    summary = refit_model(features, str(root / "splits.csv"), trained["checkpoints"],
                          Recipe("abmil", MODEL_KWARGS, {**FAST, "patience": 1}, 0), str(tmp_path / "refit"),
                          device="cpu")
    expected = int(np.floor(np.median(epochs) + 0.5))
    assert summary["refit_epochs"] == expected
    assert len(pd.read_csv(tmp_path / "refit" / "history.csv")) == expected  # no early stopping (patience 1)
    assert read_checkpoint(tmp_path / "refit" / "model.pt")["epoch"] == expected
    splits, refit = read_splits(root / "splits.csv"), read_splits(tmp_path / "refit" / SPLITS_NAME)
    test = (splits[["fold_0", "fold_1"]] == "test").any(axis=1)
    assert (refit.loc[test, "fold_0"] == "val").all() and (refit.loc[~test, "fold_0"] == "train").all()


def test_refit_is_scored_beside_the_folds_and_left_out_of_the_ensemble(trained, tmp_path):
    from factories import untrained_checkpoint

    refit = untrained_checkpoint(tmp_path / "refit.pt", in_dim=16, seed=4)
    files = tmp_path / "s.csv", tmp_path / "p.csv"
    slides = predict_cohort(trained["checkpoints"], trained["manifest"], trained["sheet"], *files, device="cpu",
                            refit_checkpoint=refit)
    usable = slides[slides["excluded"] == ""]
    row = usable.iloc[0]
    feats = read_features(trained["root"] / "new" / f"{row.slide_id}.h5", ("features",))[0]["features"]
    assert row["prob_refit"] == pytest.approx(direct_probability(refit, feats), abs=1e-5)
    assert np.allclose(usable[ENSEMBLE], usable[["prob_fold_0", "prob_fold_1"]].mean(axis=1))
    runs = [{"extractor": "e", "model": "abmil", "slides": str(files[0]), "patients": str(files[1]),
             "checkpoint": trained["checkpoints"][0], "features": str(trained["manifest"]), "tiles": None}]
    build_deploy_report("ext", runs, tmp_path / "report", {"n_bootstrap": 50, "reference_model": "abmil",
                        "heatmaps_per_model": 0, "heatmap_top_k": 2}, seed=0, sheet=trained["sheet"])
    metrics = pd.read_csv(tmp_path / "report" / "metrics.csv", dtype={"fold": str}).set_index("fold")
    patients = pd.read_csv(files[1], dtype={"patient_id": str})
    assert list(metrics.index) == ["0", "1", "refit", "ensemble"]
    assert metrics.loc["refit", "auc"] == pytest.approx(roc_auc_score(patients["label"], patients["prob_refit"]))
