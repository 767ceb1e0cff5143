"""Issue 24 for every task of issue 23, without Snakemake: multiclass, survival and regression models deployed
on a new cohort (predictions against the checkpoints loaded directly, the ensemble as the mean of the folds) and
the deploy report's metrics against scikit-learn, SciPy and lifelines."""

import numpy as np
import pandas as pd
import pytest
from lifelines.statistics import logrank_test
from lifelines.utils import concordance_index
from scipy.stats import pearsonr
from sklearn.metrics import balanced_accuracy_score, mean_absolute_error, r2_score, roc_auc_score

from factories import (TASK_CLASSES, direct_outputs, train_task_folds, write_task_deploy_cohort)
from slidemil.cli import main as cli
from slidemil.cohort.deploy import load_deploy_sheet
from slidemil.cohort.sheet import Endpoint
from slidemil.config import ConfigError, check_config
from slidemil.deploy.predict import predict_cohort
from slidemil.deploy.report import build_deploy_report, extreme_slides, slide_scores
from slidemil.demo.external import plan_external_cohort
from slidemil.errors import SheetError
from slidemil.files.deploy import ensemble_column, fold_column, spread_column

TASKS = ("multiclass", "survival", "regression")
OUTPUTS = {"multiclass": ["prob_0", "prob_1", "prob_2"], "survival": ["risk"], "regression": ["pred"]}
SETTINGS = {"n_bootstrap": 100, "reference_model": "abmil", "heatmaps_per_model": 1, "heatmap_top_k": 2}


@pytest.fixture(scope="module", params=TASKS)
def deployed(request, tmp_path_factory):
    """Per task: abmil trained on two folds, a labelled new cohort and its predict tables."""
    task = request.param
    root = tmp_path_factory.mktemp(f"deploy_{task}")
    trained = train_task_folds(root / "train", task)
    cohort = write_task_deploy_cohort(root / "new", task)
    files = root / "slides.csv", root / "patients.csv"
    predict_cohort(trained["checkpoints"], cohort["manifest"], cohort["sheet"], *files, device="cpu",
                   endpoint={"task": task})
    slides = pd.read_csv(files[0], dtype={"slide_id": str, "patient_id": str})
    patients = pd.read_csv(files[1], dtype={"patient_id": str})
    return {"task": task, "root": root, **trained, **cohort, "files": files, "slides": slides, "patients": patients}


def test_predictions_are_the_checkpoints_and_the_ensemble_their_mean(deployed):
    slides, outputs = deployed["slides"], OUTPUTS[deployed["task"]]
    assert len(slides) == len(deployed["table"])
    for row in slides.head(6).to_dict("records"):
        for fold, ckpt in enumerate(deployed["checkpoints"]):
            expected = direct_outputs(ckpt, deployed["bags"][row["slide_id"]])
            got = [row[fold_column(o, fold)] for o in outputs]
            assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
    for o in outputs:
        folds = slides[[fold_column(o, 0), fold_column(o, 1)]]
        assert np.allclose(slides[ensemble_column(o)], folds.mean(axis=1))
        assert np.allclose(slides[spread_column(o)], folds.std(axis=1, ddof=0))
    patients = deployed["patients"].set_index("patient_id")
    two = slides[slides["patient_id"] == "NP00"]  # every fourth patient has two slides
    assert len(two) == 2
    assert patients.loc["NP00", fold_column(outputs[0], 1)] == pytest.approx(two[fold_column(outputs[0], 1)].mean())


def test_each_task_has_its_outcome_and_output_meaning(deployed):
    task, patients = deployed["task"], deployed["patients"]
    if task == "multiclass":
        probs = patients[[ensemble_column(o) for o in OUTPUTS[task]]].to_numpy()
        assert np.allclose(probs.sum(axis=1), 1.0)
        assert patients["predicted_class"].tolist() == [TASK_CLASSES[k] for k in probs.argmax(axis=1)]
        assert set(patients["label"]) <= set(TASK_CLASSES)
    elif task == "survival":
        assert {"label", "time"} <= set(patients.columns) and set(patients["label"]) <= {0, 1}
        assert (patients[ensemble_column("risk")] < 0).all()  # minus the sum of survival probabilities
    else:
        # In the target's units (task_cohort's targets lie in [0, 4)), not standardised around 0.
        assert patients[ensemble_column("pred")].mean() == pytest.approx(patients["label"].mean(), abs=1.0)


def _report(deployed, tmp_path, training=True):
    files = deployed["files"]
    runs = [{"extractor": "e", "model": model, "slides": str(files[0]), "patients": str(files[1]),
             "checkpoint": deployed["checkpoints"][0], "features": str(deployed["manifest"]), "tiles": None}
            for model in ("abmil", "meanpool")]
    training_files = deployed["predictions"] * 2 if training else None
    return build_deploy_report("ext", runs, tmp_path, SETTINGS, seed=3, sheet=deployed["sheet"],
                               endpoint={"task": deployed["task"]}, training_predictions=training_files)


def test_report_metrics_match_sklearn_scipy_and_lifelines(deployed, tmp_path):
    task = deployed["task"]
    doc = _report(deployed, tmp_path)
    metrics = pd.read_csv(tmp_path / "metrics.csv", dtype={"fold": str})
    assert set(metrics["fold"]) == {"0", "1", "ensemble"} and set(metrics["model"]) == {"abmil", "meanpool"}
    patients = deployed["patients"]
    for row in metrics[metrics["model"] == "abmil"].to_dict("records"):
        member = "ensemble" if row["fold"] == "ensemble" else int(row["fold"])
        column = (lambda o: ensemble_column(o)) if member == "ensemble" else (lambda o: fold_column(o, member))
        if task == "multiclass":
            labels = patients["label"].map({c: k for k, c in enumerate(TASK_CLASSES)})
            probs = patients[[column(o) for o in OUTPUTS[task]]].to_numpy()
            assert row["macro_auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))
            assert row["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, probs.argmax(1)))
        elif task == "survival":
            expected = concordance_index(patients["time"], -patients[column("risk")], patients["label"])
            assert row["c_index"] == pytest.approx(expected)
        else:
            y, pred = patients["label"], patients[column("pred")]
            assert row["r2"] == pytest.approx(r2_score(y, pred))
            assert row["pearson_r"] == pytest.approx(pearsonr(y, pred)[0])
            assert row["mae"] == pytest.approx(mean_absolute_error(y, pred))
        primary = doc["metric_names"][0]
        assert row[f"{primary}_ci_low"] <= row[primary] <= row[f"{primary}_ci_high"]
        assert 0 < row[f"{primary}_n_bootstrap_used"] <= SETTINGS["n_bootstrap"]
    comparison = pd.read_csv(tmp_path / "comparison.csv", dtype={"fold": str})
    # The "meanpool" run holds abmil's own predictions: every difference is zero, the ensemble's included.
    assert set(comparison["fold"]) == {"0", "1", "mean", "ensemble"}
    assert np.allclose(comparison["difference"], 0.0)
    html = (tmp_path / "report.html").read_text()
    assert f"External validation: {task}" in html and "Comparison with abmil" in html
    assert f"{metrics.loc[metrics['fold'] == 'ensemble', doc['metric_names'][0]].iloc[0]:.3f}" in html


@pytest.mark.parametrize("deployed", ["survival"], indirect=True)
def test_survival_groups_split_at_the_training_cohorts_median_risk(deployed, tmp_path):
    doc = _report(deployed, tmp_path / "with")
    assert doc["km_split"] == "training cohort" and "training cohort" in (tmp_path / "with" / "report.html").read_text()
    patients = deployed["patients"]
    train = pd.read_csv(deployed["predictions"][1])
    high = patients[fold_column("risk", 1)] > train.loc[train["partition"] == "train", "risk"].median()
    expected = logrank_test(patients.loc[high, "time"], patients.loc[~high, "time"], patients.loc[high, "label"],
                            patients.loc[~high, "label"]).p_value
    metrics = pd.read_csv(tmp_path / "with" / "metrics.csv", dtype={"fold": str})
    row = metrics[(metrics["model"] == "abmil") & (metrics["fold"] == "1")].iloc[0]
    assert row["logrank_p"] == pytest.approx(expected)
    assert _report(deployed, tmp_path / "without", training=False)["km_split"] == "this cohort"


def test_unlabelled_cohort_gets_each_tasks_predictions(deployed, tmp_path):
    task = deployed["task"]
    unlabelled = write_task_deploy_cohort(tmp_path / "new", task, labelled=False)
    files = tmp_path / "s.csv", tmp_path / "p.csv"
    predict_cohort(deployed["checkpoints"], unlabelled["manifest"], unlabelled["sheet"], *files, device="cpu",
                   endpoint={"task": task})
    runs = [{"extractor": "e", "model": "abmil", "slides": str(files[0]), "patients": str(files[1]),
             "checkpoint": deployed["checkpoints"][0], "features": str(unlabelled["manifest"]), "tiles": None}]
    doc = build_deploy_report("new", runs, tmp_path / "report", SETTINGS, 0, unlabelled["sheet"],
                              endpoint={"task": task})
    assert not doc["labelled"] and len(doc["patients"]) == unlabelled["table"]["patient_id"].nunique()
    first = doc["patients"][0]["outputs"]
    assert len(first) == len(OUTPUTS[task])
    ensembles = [p["outputs"][0]["ensemble"] for p in doc["patients"]]
    assert ensembles == sorted(ensembles, reverse=True)
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Predictions per patient" in html and (task != "multiclass" or "P(fox), ensemble" in html)


def test_unlabelled_heatmaps_pick_the_slides_the_tasks_score_ranks_first_and_last(deployed):
    """Heatmaps of an unlabelled cohort show its extreme slides: by the ensemble's risk or predicted value, and
    for multiclass by the ensemble's probability of its predicted class (most and least confident)."""
    slides = deployed["slides"].copy()
    slides.loc[0, [ensemble_column(o) for o in OUTPUTS[deployed["task"]]]] = np.nan  # an excluded slide
    ensemble = slides[[ensemble_column(o) for o in OUTPUTS[deployed["task"]]]].to_numpy(float)
    spread = slides[[spread_column(o) for o in OUTPUTS[deployed["task"]]]].to_numpy(float)
    kept = ~np.isnan(ensemble[:, 0])
    best = np.argmax(np.nan_to_num(ensemble, nan=-np.inf), axis=1)
    scores = slide_scores(slides)
    assert scores["slide_id"].tolist() == slides.loc[kept, "slide_id"].tolist()
    assert np.allclose(scores["score"], ensemble[kept, best[kept]])
    assert np.allclose(scores["spread"], spread[kept, best[kept]])
    picked = extreme_slides(scores, 2)
    order = scores.sort_values("score", ascending=False)["slide_id"].tolist()
    assert [s for s, which in picked if which == "highest"] == order[:2]
    assert [s for s, which in picked if which == "lowest"] == order[::-1][:2]


def test_command_line_predicts_every_task(deployed, tmp_path):
    out, patients = tmp_path / "p.csv", tmp_path / "patients.csv"
    assert cli(["predict", "--checkpoints", *deployed["checkpoints"], "--features", str(deployed["root"] / "new"),
                "--out", str(out), "--sheet", str(deployed["sheet"]), "--out-patients", str(patients)]) == 0
    expected = deployed["patients"].set_index("patient_id")
    got = pd.read_csv(patients, dtype={"patient_id": str}).set_index("patient_id").loc[expected.index]
    for o in OUTPUTS[deployed["task"]]:
        assert np.allclose(got[ensemble_column(o)], expected[ensemble_column(o)])


# ---- sheets and config ----

def test_deploy_sheets_take_each_tasks_outcome(tmp_path):
    rows = pd.DataFrame({"slide_id": ["A", "B"], "patient_id": ["PA", "PB"], "path": ["a.h5", "b.h5"]})
    rows.assign(label=["fox", "wolf"]).to_csv(tmp_path / "mc.csv", index=False)
    with pytest.raises(SheetError, match=r"label\(s\) wolf are not among the training classes \(fox, other, tiger\)"):
        load_deploy_sheet(tmp_path / "mc.csv", check_files=False, endpoint=Endpoint("multiclass"),
                          class_names=list(TASK_CLASSES))
    rows.assign(os_days=[3.5, 7], died=[1, 0]).to_csv(tmp_path / "surv.csv", index=False)
    loaded = load_deploy_sheet(tmp_path / "surv.csv", check_files=False,
                               endpoint=Endpoint("survival", time_column="os_days", event_column="died"))
    assert loaded["time"].tolist() == [3.5, 7.0] and loaded["label"].tolist() == [1, 0]
    rows.assign(label=["1.5", "high"]).to_csv(tmp_path / "reg.csv", index=False)
    with pytest.raises(SheetError, match="task regression needs a numeric label; non-numeric value.s. high"):
        load_deploy_sheet(tmp_path / "reg.csv", check_files=False, endpoint=Endpoint("regression"))
    unlabelled = load_deploy_sheet(tmp_path / "mc.csv", check_files=False,
                                   endpoint=Endpoint("survival", time_column="os_days", event_column="died"))
    assert "time" not in unlabelled.columns and "label" not in unlabelled.columns


def test_every_task_deploys_and_the_demo_second_cohort_has_the_task_and_signal():
    for task in TASKS:
        cfg = check_config({"task": task, "samples": "train.csv", "deploy": {"cohorts": {"ext": "s.csv"}}})
        assert cfg["deploy"]["cohorts"] == {"ext": {"samples": "s.csv"}}
        demo = check_config({"task": task, "demo": {"task": task}, "deploy": {"demo_patients": 30}})["demo"]
        table = plan_external_cohort(30, demo, patterns=True).drop_duplicates("patient_id")
        target = ["time", "event"] if task == "survival" else ["label"]
        assert table[target].notna().all().all() and (table["lymphoid_tile_fraction"] > 0).any()
        if task == "multiclass":
            assert set(table["label"]) == {"normal", "tumor", "lymphoid"}
        if task == "binary":
            # The demo's silent positives are planted here too: positives without tumour.
            positives = table[table["label"] == 1]
            silent = (positives["tumor_tile_fraction"] == 0).sum()
            assert silent == round(len(positives) * demo["silent_positive_fraction"])


# ---- through the DAG ----

@pytest.mark.workflow
def test_a_survival_cohort_is_deployed_through_the_workflow(tmp_path):
    """A precomputed-features survival cohort (its own column names) trained as test_tasks trains it, and a
    labelled new cohort deployed beside it: predictions are the checkpoints, the C-index lifelines', the
    Kaplan-Meier split the training cohort's; adding the cohort after training retrains nothing."""
    import yaml

    from factories import job_counts, snakemake_cli, write_task_cohort

    names = {"time": "os_days", "event": "died"}
    sheet = write_task_cohort(tmp_path / "cohort", "survival", n_patients=18)
    pd.read_csv(sheet).rename(columns=names).to_csv(sheet, index=False)
    new = write_task_deploy_cohort(tmp_path / "new", "survival", n_patients=10)
    new["table"].rename(columns=names).to_csv(new["sheet"], index=False)
    config = {"samples": str(sheet), "results": "results", "task": "survival", "seed": 0,
              "features": {"precomputed": "planted"},
              "splits": {"folds": 2, "test_fraction": 0.3, "time_column": "os_days", "event_column": "died"},
              "mil": {"models": ["abmil"], "training": {"epochs": 4, "patience": 4, "lr": 0.001},
                      "settings": {"abmil": {"embed_dim": 32, "attn_dim": 16, "dropout": 0.0}}},
              "report": {"n_bootstrap": 50}, "compute": {"train_threads": 1}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake_cli(tmp_path, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-5000:]
    config["deploy"] = {"cohorts": {"ext": {"samples": str(new["sheet"])}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    dry = snakemake_cli(tmp_path, "-n", "--cores", "2")
    assert job_counts(dry.stdout + dry.stderr) == {"deploy_import_features": len(new["table"]),
                                                   "deploy_feature_manifest": 1, "predict": 1, "deploy_report": 1,
                                                   "report": 1}
    proc = snakemake_cli(tmp_path, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-5000:]
    res = tmp_path / "results"
    patients = pd.read_csv(res / "deploy" / "ext" / "predictions" / "planted" / "abmil" / "predictions_patients.csv",
                           dtype={"patient_id": str})
    slides = pd.read_csv(res / "deploy" / "ext" / "predictions" / "planted" / "abmil" / "predictions_slides.csv")
    for row in slides.head(3).to_dict("records"):
        for fold in (0, 1):
            ckpt = res / "train" / "planted" / "abmil" / f"fold_{fold}" / "model.pt"
            assert row[fold_column("risk", fold)] == pytest.approx(
                direct_outputs(ckpt, new["bags"][row["slide_id"]])[0], rel=1e-4, abs=1e-5)
    metrics = pd.read_csv(res / "report" / "deploy" / "ext" / "metrics.csv", dtype={"fold": str})
    ensemble = metrics[metrics["fold"] == "ensemble"].iloc[0]
    assert ensemble["c_index"] == pytest.approx(concordance_index(patients["time"], -patients["risk_ensemble"],
                                                                  patients["label"]))
    doc = pd.read_json(res / "report" / "deploy" / "ext" / "report.json", typ="series")
    assert doc["task"] == "survival" and doc["km_split"] == "training cohort"
    # The main report links to the cohort's page, relative to its own folder.
    main = (res / "report" / "report.html").read_text()
    assert 'href="deploy/ext/report.html"' in main and (res / "report" / "deploy" / "ext" / "report.html").is_file()
    # deploy.refit added afterwards: one refit job per model, the deploy predictions and report; no fold retrains.
    config["deploy"]["refit"] = True
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    dry = snakemake_cli(tmp_path, "-n", "--cores", "2")
    assert job_counts(dry.stdout + dry.stderr) == {"refit": 1, "predict": 1, "deploy_report": 1}
    proc = snakemake_cli(tmp_path, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-5000:]
    folds = [torch_epoch(res / "train" / "planted" / "abmil" / f"fold_{k}" / "model.pt") for k in (0, 1)]
    history = pd.read_csv(res / "train" / "planted" / "abmil" / "refit" / "history.csv")
    assert len(history) == int(np.floor(np.median(folds) + 0.5))
    metrics = pd.read_csv(res / "report" / "deploy" / "ext" / "metrics.csv", dtype={"fold": str})
    assert metrics["fold"].tolist() == ["0", "1", "refit", "ensemble"]


def torch_epoch(checkpoint) -> int:
    from slidemil.files.checkpoint import read_checkpoint

    return int(read_checkpoint(checkpoint)["epoch"])
