"""Endpoints beyond binary (issue 23): metrics against direct computations, the survival loss, every model x task
in memory (shapes, padding, learning a planted signal), checkpoints, sheet checks and stratified splits."""

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import pearsonr
from sklearn.metrics import r2_score, roc_auc_score

from slidemil.cohort.sheet import Endpoint, check_sheet
from slidemil.cohort.splits import make_splits
from slidemil.config import ConfigError, Splits, check_config
from slidemil.errors import SplitError
from slidemil.files.checkpoint import read_checkpoint
from slidemil.files.splits import read_fold, split_task
from slidemil.mil.models import create_model
from slidemil.mil.train import Recipe, checkpoint, collate, train_bags, train_fold
from slidemil.names import MIL_MODELS, base_model
from slidemil.tasks import c_index, class_order, discrete_time_nll, macro_auc, make_task
from factories import DIM, TASK_CLASSES, task_cohort, task_feature_files

TASKS = ("binary", "multiclass", "survival", "regression")
FAST_TASK = {"epochs": 6, "lr": 1e-3, "patience": 6}
SMALL = {"embed_dim": 64}  # every MIL model takes embed_dim except varmil (None: the input's)


# ---------------------------------------------------------------- metrics against direct computations


def brute_force_c_index(time, risk, event) -> float:
    """Harrell: over pairs where the shorter time is an event (or a tied time censored on the other side: that
    patient outlived the event), concordant if the event's risk is higher (tied risks 0.5)."""
    concordant, pairs = 0.0, 0
    for i, j in itertools.permutations(range(len(time)), 2):
        if event[i] and (time[i] < time[j] or (time[i] == time[j] and not event[j])):
            pairs += 1
            concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return concordant / pairs


def test_c_index_equals_a_brute_force_pairwise_count():
    rng = np.random.default_rng(1)
    time = rng.exponential(size=60).round(2)  # rounded: tied times too
    event = rng.integers(0, 2, size=60)
    risk = (-time + rng.normal(size=60)).round(1)  # tied risks too
    assert c_index(time, risk, event) == pytest.approx(brute_force_c_index(time, risk, event), abs=1e-12)
    assert c_index(time, -time, np.ones(60)) == 0.0 or c_index(time, time, np.ones(60)) < 0.05
    assert c_index([1.0, 2.0], [0.0, 1.0], [0, 0]) is None  # no event: no comparable pair


def test_macro_auc_equals_sklearn_one_vs_rest():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, size=80)
    probs = rng.dirichlet(np.ones(4), size=80) + np.eye(4)[labels] * 0.3
    probs /= probs.sum(1, keepdims=True)
    expected = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert macro_auc(labels, probs) == pytest.approx(expected, abs=1e-12)


def test_regression_metrics_equal_their_definitions():
    task = make_task("regression")
    rng = np.random.default_rng(3)
    y = rng.normal(size=40)
    pred = y + rng.normal(scale=0.5, size=40)
    got = task.metrics(pd.DataFrame({"label": y, "pred": pred}))
    assert got["r2"] == pytest.approx(r2_score(y, pred))
    assert got["pearson_r"] == pytest.approx(pearsonr(y, pred)[0])
    assert got["mae"] == pytest.approx(np.abs(y - pred).mean())


def test_discrete_time_nll_is_the_likelihood_written_out():
    logits = torch.tensor([[0.2, -1.0, 0.5, 0.0], [1.0, 0.3, -0.2, 0.1]])
    h = torch.sigmoid(logits)
    # patient 0: event in bin 2 = survived bins 0, 1, then the event; patient 1: censored in bin 1 = survived 0, 1
    expected = torch.stack([-torch.log((1 - h[0, 0]) * (1 - h[0, 1]) * h[0, 2]),
                            -torch.log((1 - h[1, 0]) * (1 - h[1, 1]))])
    got = discrete_time_nll(logits, torch.tensor([2, 1]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(got, expected)


def test_class_order_numbers_numerically_names_alphabetically():
    assert class_order(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert class_order(["tiger", "fox", "other"]) == ["fox", "other", "tiger"]


# ---------------------------------------------------------------- every model x task in memory


def _model_kwargs(model: str) -> dict:
    if base_model(model):
        return {"base_kwargs": _model_kwargs(base_model(model))}
    return {} if model == "varmil" else dict(SMALL)


def _task(name: str):
    return make_task(name, list(TASK_CLASSES) if name == "multiclass" else None)


@pytest.mark.parametrize("task_name", TASKS)
@pytest.mark.parametrize("model", MIL_MODELS)
def test_every_model_gives_the_tasks_head_whatever_the_padding(model, task_name):
    task = _task(task_name)
    torch.manual_seed(0)
    net = create_model(model, in_dim=DIM, n_classes=task.head_size, **_model_kwargs(model)).eval()
    if base_model(model):
        net.init_from_checkpoint({"model": base_model(model), "state_dict": net.student.state_dict(),
                                  "model_kwargs": _model_kwargs(base_model(model))})
    bags = [torch.randn(n, DIM) for n in (7, 12, 3)]
    x, mask = collate(bags)
    with torch.no_grad():
        batched = net(x, mask)["logits"]
        alone = torch.cat([net(b[None])["logits"] for b in bags])
    assert batched.shape == (3, task.head_size)
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    assert task.outputs(batched).shape == (3, len(task.output_columns))


def _split(task_name: str, n_patients: int = 24, seed: int = 0):
    bags, sheet = task_cohort(task_name, n_patients, seed)
    endpoint = Endpoint(task_name, 3)
    splits = make_splits(sheet.assign(path="x"), Splits(folds=3, test_fraction=0.25), seed=0,
                         endpoint=endpoint if task_name != "binary" else None)
    split = splits.rename(columns={"fold_0": "partition"})
    columns = ["slide_id", "patient_id", "label", "partition"] + (["time"] if task_name == "survival" else [])
    name, classes = split_task(splits)
    return {k: torch.from_numpy(v) for k, v in bags.items()}, split[columns], make_task(name, classes)


@pytest.mark.parametrize("task_name", TASKS)
@pytest.mark.parametrize("model", [m for m in MIL_MODELS if not base_model(m)])
def test_every_model_learns_each_tasks_planted_signal(model, task_name):
    bags, split, task = _split(task_name)
    run = train_bags(bags, split, Recipe(model, _model_kwargs(model), FAST_TASK, 0), "cpu", task=task)
    losses = [h["train_loss"] for h in run.history]
    assert min(losses[-3:]) < losses[0], losses  # the loss falls
    assert run.best.auc is not None and np.isfinite(run.best.auc)
    assert list(run.slides.columns[-len(task.output_columns):]) == task.output_columns


@pytest.mark.parametrize("task_name", ["multiclass", "survival", "regression"])
def test_mhim_trains_on_each_task_from_its_baseline(task_name):
    bags, split, task = _split(task_name)
    base = train_bags(bags, split, Recipe("abmil", SMALL, FAST_TASK, 0), "cpu", task=task)
    state = checkpoint(base, 0)
    mhim = train_bags(bags, split, Recipe("mhim_abmil", {"base_kwargs": SMALL}, FAST_TASK, 0), "cpu",
                      init_state=state, task=_split(task_name)[2])
    assert np.isfinite([h["train_loss"] for h in mhim.history]).all()
    assert mhim.net.student.classifier.out_features == task.head_size


# Survival is left out: on 15 test patients the planted cohort's C-index is too noisy to hold a floor (0.56 seen);
# its loss falls (above) and the DAG test checks its report.
@pytest.mark.parametrize("task_name, metric, floor",
                         [("multiclass", "macro_auc", 0.9), ("regression", "pearson_r", 0.7)])
def test_abmil_finds_the_planted_signal_on_test_patients(task_name, metric, floor):
    bags, split, task = _split(task_name, n_patients=60, seed=4)
    run = train_bags(bags, split, Recipe("abmil", SMALL, {"epochs": 20, "lr": 1e-3, "patience": 20}, 0), "cpu",
                     task=task)
    patients = task.patients(run.slides)
    assert task.metrics(patients[patients["partition"] == "test"])[metric] > floor


# ---------------------------------------------------------------- files: splits, checkpoints, predictions


@pytest.mark.parametrize("task_name", ["multiclass", "survival", "regression"])
def test_train_fold_records_the_task_in_checkpoint_history_and_predictions(tmp_path, task_name):
    features = task_feature_files(tmp_path, task_name, 24)
    summary = train_fold(features, str(tmp_path / "splits.csv"), 1, Recipe("meanpool", SMALL, {"epochs": 2}, 0),
                         str(tmp_path / "run"), device="cpu")
    task = make_task(task_name, list(TASK_CLASSES) if task_name == "multiclass" else None)
    ckpt = read_checkpoint(tmp_path / "run" / "model.pt")
    assert ckpt["task"] == task_name and ckpt["n_classes"] == task.head_size
    assert ckpt["class_names"] == (list(TASK_CLASSES) if task_name == "multiclass" else None)
    assert f"test_{task.metric}" in summary
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert task.history_column in history.columns
    patients = pd.read_csv(tmp_path / "run" / "predictions_patients.csv")
    assert set(task.output_columns) <= set(patients.columns)
    if task_name == "multiclass":
        assert np.allclose(patients[task.output_columns].sum(1), 1.0)
    fold = read_fold(tmp_path / "splits.csv", 1)
    assert ("time" in fold.columns) == (task_name == "survival")


def test_mhim_refuses_a_baseline_of_another_task(tmp_path):
    from slidemil.files.checkpoint import write_checkpoint
    from slidemil.mil.train import load_init_checkpoint

    write_checkpoint(tmp_path / "m.pt", {"state_dict": {}, "model": "abmil", "in_dim": DIM, "task": "binary"})
    with pytest.raises(ValueError, match="trained for task binary, not survival"):
        load_init_checkpoint(str(tmp_path / "m.pt"), "mhim_abmil", 0, "survival")


# ---------------------------------------------------------------- config and sheet checks


def test_config_task_is_checked_once_with_one_line():
    assert check_config({})["task"] == "binary"
    with pytest.raises(ConfigError, match=r"^config: task must be one of binary, multiclass, survival, regression"):
        check_config({"task": "multi"})
    # The tile-supervised baseline classifies tiles: binary and multiclass, and survival and regression refused.
    for task_name in ("survival", "regression"):
        with pytest.raises(ConfigError, match=r"^config: mil.models: tile_supervised scores slides by their tiles' "
                                              rf"predicted classes, so it learns binary or multiclass tasks only: "
                                              rf"task {task_name} needs a MIL model; allowed: abmil") as err:
            check_config({"task": task_name, "demo": {"task": task_name},
                          "mil": {"models": ["abmil", "tile_supervised"]}})
        assert "\n" not in str(err.value)
    multiclass = check_config({"task": "multiclass", "demo": {"task": "multiclass"},
                               "mil": {"models": ["abmil", "tile_supervised"]}})
    assert multiclass["mil"]["models"] == ["abmil", "tile_supervised"]
    with pytest.raises(ConfigError, match=r"^config: splits.binarize: makes two classes, but task is regression"):
        check_config({"task": "regression", "splits": {"binarize": "median"}})


def test_multiclass_dag_trains_the_tile_supervised_baseline_into_the_report(tmp_path):
    """A dry run (seconds) of the tiny multiclass demo with tile_supervised: one train_tiles job per fold, then
    the report; the tile CNN has no heatmap job (heatmaps are of MIL models on features)."""
    import yaml

    from factories import TINY, job_counts, snakemake_cli

    tile = {"init": "random", "input_px": 64, "tiles_per_slide": 4, "eval_tiles_per_slide": 8, "epochs": 1}
    config = {**TINY, "task": "multiclass", "demo": {**TINY["demo"], "task": "multiclass"},
              "mil": {**TINY["mil"], "models": ["abmil", "tile_supervised"], "settings": {"tile_supervised": tile}},
              "report": {**TINY["report"], "heatmaps_per_model": 1}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake_cli(tmp_path, "-n", "--cores", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["train_tiles"] == 2 and counts["train"] == 2 and counts["report"] == 1
    assert counts["heatmaps"] == 1  # abmil's alone


def _sheet(rows, columns):
    frame = pd.DataFrame(rows, columns=columns)
    return frame.assign(path=[f"{s}.svs" for s in frame["slide_id"]])


def test_sheet_check_lists_every_multiclass_problem():
    rows = [("a", "p1", "x"), ("b", "p2", "x"), ("c", "p3", "y"), ("d", "p4", "y"), ("e", "p5", "z"),
            ("f", "p5", "y"), ("g", "p6", None)]
    problems = check_sheet(_sheet(rows, ["slide_id", "patient_id", "label"]), check_files=False,
                           endpoint=Endpoint("multiclass", 2))
    text = "\n".join(problems)
    assert "missing label in row(s) 8" in text
    assert "patient(s) with different labels on their slides: p5" in text
    assert "class(es) with fewer patients than the 2 folds (splits.folds): 'z' (1)" in text


def test_sheet_check_lists_every_survival_problem():
    rows = [("a", "p1", 3.0, 1), ("b", "p2", -1.0, 0), ("c", "p3", "soon", 1), ("d", "p4", 2.0, 2)]
    problems = check_sheet(_sheet(rows, ["slide_id", "patient_id", "os_months", "dead"]), check_files=False,
                           endpoint=Endpoint("survival", 2, "os_months", "dead"))
    text = "\n".join(problems)
    assert "os_months must be a number >= 0 (splits.time_column); row(s) 3, 4 hold -1.0, soon" in text
    assert "dead must be 1 (event) or 0 (censored) (splits.event_column); row(s) 5 hold 2" in text
    missing = check_sheet(_sheet(rows, ["slide_id", "patient_id", "time", "dead"]), check_files=False,
                          endpoint=Endpoint("survival", 2))
    assert missing and missing[0].startswith("missing column(s) event")


def test_sheet_check_lists_non_numeric_regression_targets():
    rows = [("a", "p1", "1.5"), ("b", "p2", "high"), ("c", "p3", "2"), ("d", "p4", "n/a")]
    problems = check_sheet(_sheet(rows, ["slide_id", "patient_id", "label"]), check_files=False,
                           endpoint=Endpoint("regression", 2))
    assert problems == ["task regression needs a numeric label; non-numeric value(s) high, n/a in row(s) 3, 5"]


# ---------------------------------------------------------------- stratified splits


def _patients(splits, column="fold_0"):
    return splits.drop_duplicates("patient_id").set_index("patient_id")


def test_multiclass_splits_stratify_by_class_and_name_the_classes():
    _, sheet = task_cohort("multiclass", 45)
    splits = make_splits(sheet.assign(path="x"), Splits(folds=3), seed=1, endpoint=Endpoint("multiclass", 3))
    assert split_task(splits) == ("multiclass", list(TASK_CLASSES))
    patients = _patients(splits)
    for column in ("fold_0", "fold_1", "fold_2"):
        counts = patients.groupby([column, "label"]).size().unstack()
        for part in ("train", "val", "test"):  # each class as evenly spread as the counts allow
            assert counts.loc[part].max() - counts.loc[part].min() <= 1, counts
    assert set(patients["label_value"]) == set(TASK_CLASSES)


def test_survival_splits_balance_events_and_keep_times():
    _, sheet = task_cohort("survival", 48, seed=2)
    splits = make_splits(sheet.assign(path="x"), Splits(folds=3), seed=0, endpoint=Endpoint("survival", 3))
    patients = _patients(splits)
    event_rate = patients["label"].mean()
    for column in ("fold_0", "fold_1", "fold_2"):
        rates = patients.groupby(column)["label"].mean()
        assert (abs(rates - event_rate) < 0.2).all(), rates
    merged = patients.join(sheet.drop_duplicates("patient_id").set_index("patient_id")[["time"]], rsuffix="_sheet")
    assert np.allclose(merged["time"], merged["time_sheet"])


def test_regression_splits_spread_the_target_over_partitions():
    _, sheet = task_cohort("regression", 48, seed=3)
    splits = make_splits(sheet.assign(path="x"), Splits(folds=3), seed=0, endpoint=Endpoint("regression", 3))
    patients = _patients(splits)
    assert splits["label"].dtype == float
    quartile = pd.qcut(patients["label"], 4, labels=False)
    test = quartile[patients["fold_0"] == "test"]
    assert test.nunique() == 4  # every quartile of the target has test patients


def test_binarise_and_positive_class_are_refused_for_other_tasks():
    _, sheet = task_cohort("regression", 24)
    with pytest.raises(SplitError, match="task regression takes neither"):
        make_splits(sheet.assign(path="x"), Splits(folds=2, binarize="median"), endpoint=Endpoint("regression", 2))


# ---------------------------------------------------------------- through the DAG


@pytest.mark.workflow
@pytest.mark.parametrize("task_name", ["multiclass", "survival", "regression"])
def test_workflow_runs_each_task_to_its_report(tmp_path, task_name):
    """A precomputed-features cohort with a planted signal (factories) through import, splits, abmil and
    mhim_abmil training and the report; the report's numbers are the prediction files' metrics."""
    import yaml

    from factories import snakemake_cli, snakemake_report_text, write_task_cohort

    sheet = write_task_cohort(tmp_path / "cohort", task_name, n_patients=18)
    if task_name == "survival":  # the column names are settings
        pd.read_csv(sheet).rename(columns={"time": "os_days", "event": "died"}).to_csv(sheet, index=False)
    config = {
        "samples": str(sheet), "results": "results", "task": task_name,
        "features": {"precomputed": "planted"},
        "splits": {"folds": 2, "test_fraction": 0.3,
                   **({"time_column": "os_days", "event_column": "died"} if task_name == "survival" else {})},
        "mil": {"models": ["abmil", "mhim_abmil"], "training": {"epochs": 4, "patience": 4, "lr": 0.001},
                "settings": {"abmil": {"embed_dim": 32, "attn_dim": 16, "dropout": 0.0}}},
        "report": {"n_bootstrap": 50},
        "compute": {"train_threads": 1},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake_cli(tmp_path, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = tmp_path / "results" / "report"
    task = make_task(task_name, list(TASK_CLASSES) if task_name == "multiclass" else None)
    per_fold = pd.read_csv(report / "per_fold.csv")
    assert sorted(set(per_fold["model"])) == ["abmil", "mhim_abmil"] and len(per_fold) == 4
    for row in per_fold.itertuples():
        preds = pd.read_csv(tmp_path / "results" / "train" / "planted" / row.model / f"fold_{row.fold}"
                            / "predictions_patients.csv", dtype={"patient_id": str})
        expected = task.metrics(preds[preds["partition"] == "test"])[task.metric]
        assert getattr(row, task.metric) == pytest.approx(expected)
    summary = pd.read_csv(report / "summary.csv")
    assert {f"{task.metric}_mean", f"{task.metric}_ci_low"} <= set(summary.columns)
    comparison = pd.read_csv(report / "comparison.csv")
    assert set(comparison["model"]) == {"mhim_abmil"} and "mean" in set(comparison["fold"].astype(str))
    kind = {"multiclass": "confusion", "survival": "km", "regression": "scatter"}[task_name]
    assert (report / f"{kind}_planted_abmil.png").stat().st_size > 5000
    page = (report / "report.html").read_text()
    assert f"Results: {task_name}" in page and "Comparison with abmil" in page
    if task_name == "multiclass":
        assert "fox, other, tiger" in page
    # `snakemake --report`: each figure's caption is its task's (workflow/report/*.rst).
    proc = snakemake_cli(tmp_path, "--cores", "1", "--report", str(tmp_path / "report.zip"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    captions = snakemake_report_text(tmp_path / "report.zip")
    words = {"multiclass": ["one-vs-rest ROC curve of each class", "validation macro AUC (one-vs-rest)"],
             "survival": ["Kaplan-Meier curves of the held-out test patients", "test C-index (Harrell) between"],
             "regression": ["Predicted against true target", "validation R"]}[task_name]
    for phrase in words + [f"(task: {task_name})"]:
        assert phrase in captions, phrase
    assert "ROC curves on the held-out" not in captions and "validation AUC" not in captions


@pytest.mark.workflow
def test_survival_demo_draws_heatmaps_titled_with_the_risk(tmp_path):
    """The tiny demo as a survival cohort through tiling, features, abmil and the report: the heatmap job runs
    for a task other than binary, and each heatmap's risk is the one the fold's predictions hold for its slide."""
    import json

    import yaml

    from factories import TINY, snakemake_cli

    # With the demo's second cohort (deploy.demo_patients), planned as a survival cohort too.
    config = {**TINY, "task": "survival", "demo": {**TINY["demo"], "task": "survival"},
              "mil": {**TINY["mil"], "models": ["abmil"]}, "report": {**TINY["report"], "heatmaps_per_model": 2},
              "deploy": {"demo_patients": 8}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake_cli(tmp_path, "--cores", "2", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-5000:]
    _check_survival_demo_deployed(tmp_path / "results")
    report = tmp_path / "results" / "report"
    index = json.loads((report / "heatmaps" / "shufflenet_v2" / "abmil.json").read_text())
    preds = pd.read_csv(tmp_path / "results" / "train" / "shufflenet_v2" / "abmil" / "fold_0"
                        / "predictions_slides.csv").set_index("slide_id")
    assert len(index["items"]) == 2 and "prob" not in index["items"][0]
    page = (report / "report.html").read_text()
    assert "alternating patients with an event and censored ones" in page
    for item, kind in zip(index["items"], ("event", "censored")):
        row = preds.loc[item["slide_id"]]
        assert item["label"] == f"{kind} at {row['time']:g}" and row["partition"] == "test"
        assert item["score"] == pytest.approx(row["risk"], abs=1e-4)
        assert item["prediction"].startswith(f"risk {item['score']:.3f}") and item["prediction"] in page
        assert (report / "heatmaps" / "shufflenet_v2" / item["file"]).stat().st_size > 20000


def _check_survival_demo_deployed(results):
    """The second demo cohort has survival targets, and its deploy report's ensemble C-index is lifelines' on
    the ensemble risks it wrote."""
    from lifelines.utils import concordance_index

    sheet = pd.read_csv(results / "demo_external" / "samples.csv", dtype={"patient_id": str})
    assert {"time", "event"} <= set(sheet.columns) and sheet["patient_id"].str.startswith("EXT-").all()
    patients = pd.read_csv(results / "deploy" / "demo_external" / "predictions" / "shufflenet_v2" / "abmil"
                           / "predictions_patients.csv")
    metrics = pd.read_csv(results / "report" / "deploy" / "demo_external" / "metrics.csv", dtype={"fold": str})
    ensemble = metrics[metrics["fold"] == "ensemble"].iloc[0]
    # Deploy predictions carry the event as `label` (slidemil.files.deploy.OUTCOME_COLUMNS), beside `time`.
    direct = concordance_index(patients["time"], -patients["risk_ensemble"], patients["label"])
    assert ensemble["c_index"] == pytest.approx(direct, abs=1e-9)


# ---------------------------------------------------------------- bring your own features


@pytest.mark.parametrize("labels, task_name", [(np.arange(30) % 3, "multiclass"),
                                               (np.linspace(0.5, 9.5, 30), "regression")])
def test_from_npz_keeps_class_indices_and_targets(tmp_path, labels, task_name):
    from slidemil.features.byof import npz_to_cohort

    rng = np.random.default_rng(0)
    index = np.repeat(np.arange(30), 3)
    masks = np.ones((1, 3, 30), bool)
    masks[0, np.arange(30) % 3, np.arange(30)] = False
    np.savez(tmp_path / "b.npz", features=rng.normal(size=(90, 4)), bag_index=index, bag_labels=labels,
             cv_train_masks_5x10=masks)
    sheet = npz_to_cohort(tmp_path / "b.npz", tmp_path / "out", 0)
    on_disk = pd.read_csv(tmp_path / "out" / "samples.csv")
    assert on_disk["label"].tolist() == pytest.approx(labels.tolist())
    assert (on_disk["label"].dtype.kind == "i") == (task_name == "multiclass")
    splits = make_splits(sheet, Splits(fold_column="fold"), endpoint=Endpoint(task_name))
    name, classes = split_task(splits)
    assert name == task_name and classes == (["0", "1", "2"] if task_name == "multiclass" else None)
    assert (splits.loc[splits["fold_1"] == "test", "slide_id"] == sheet.loc[sheet["fold"] == 1, "slide_id"]).all()


# ---------------------------------------------------------------- the report of other tasks


@pytest.mark.parametrize("task_name", ["multiclass", "survival", "regression"])
def test_task_report_metrics_cis_and_paired_comparison(tmp_path, task_name):
    from factories import write_task_run
    from slidemil.report.endpoints import detect_task, write_task_summary
    from slidemil.report.page import build_report

    runs = [write_task_run(tmp_path, task_name, m, f, signal=s, seed=10 * f + k)
            for k, (m, s) in enumerate([("abmil", 2.0), ("meanpool", 0.5)]) for f in (0, 1)]
    runs += [dict(r, model="copy") for r in runs if r["model"] == "abmil"]  # the reference's own predictions
    task = detect_task([runs[0]["predictions"]])
    assert task.name == task_name
    tables = write_task_summary(task, runs, tmp_path / "report", "abmil", 100, 0)
    summary = tables["summary"].set_index("model")
    metric = task.metric
    for model in ("abmil", "meanpool"):
        row = summary.loc[model]
        assert row[f"{metric}_ci_low"] < row[f"{metric}_mean"] < row[f"{metric}_ci_high"]
    assert summary.loc["abmil", f"{metric}_mean"] > summary.loc["meanpool", f"{metric}_mean"]  # more signal
    comparison = tables["comparison"].set_index(["model", "fold"])
    same = comparison.loc[("copy", "mean")]
    assert same["difference"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0  # paired: identical = 0
    worse = comparison.loc[("meanpool", "mean")]
    assert worse["difference"] < 0 and worse["ci_low"] < worse["difference"] < worse["ci_high"]
    per_fold = tables["per_fold"]
    for run in runs:
        frame = pd.read_csv(run["predictions"], dtype={"patient_id": str})
        row = per_fold[(per_fold["model"] == run["model"]) & (per_fold["fold"] == run["fold"])].iloc[0]
        assert row[metric] == pytest.approx(task.metrics(frame[frame["partition"] == "test"])[metric])
    doc = build_report(runs, tmp_path / "page", {"n_bootstrap": 50})
    assert doc["task"]["name"] == task_name and (tmp_path / "page" / doc["figures"]["task"][0]["file"]).is_file()
    assert f"Results: {task_name}" in (tmp_path / "page" / "report.html").read_text()


def test_selection_falls_back_to_the_loss_when_the_c_index_is_undefined():
    task = make_task("survival")
    no_pair = pd.DataFrame({"patient_id": ["a", "b", "c"], "label": [0, 0, 1], "time": [1.0, 2.0, 3.0]})
    assert not task.can_select(no_pair)  # the only event comes last: no comparable pair
    assert task.can_select(no_pair.assign(label=[1, 0, 0]))
