"""A deploy cohort's report: how the trained models hold on it (labelled) or what they say about it (unlabelled).

Labelled cohorts: per (extractor, model), the patient-level AUC of every fold model and of the ensemble with a
percentile-bootstrap 95 % CI over the cohort's patients (``slidemil.report.stats.bootstrap_mean_auc`` on one
"fold"), the Brier score, ROC curves, a reliability curve (``sklearn.calibration.calibration_curve``, equal-count
bins) and the paired comparison with ``report.reference_model`` on the same patients
(``slidemil.report.stats.compare_models`` over the folds; ``paired_auc_difference`` for the ensembles).
Unlabelled cohorts: the per-patient ensemble with its spread over folds, and attention heatmaps of the
highest- and lowest-scored slides (first fold's model). Both: the per-slide and per-patient tables of all models.

Outputs in ``out_dir``: report.html (self-contained), report.json, metrics.csv, comparison.csv,
predictions_slides.csv, predictions_patients.csv and the figures.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from slidemil.deploy.predict import ENSEMBLE, FOLD_PREFIX, SPREAD
from slidemil.files import write_csv, write_json, write_text
from slidemil.files.deploy import (ENSEMBLE_NAME, PREDICTED_CLASS, REFIT, ensemble_column, member_column,
                                   output_names, spread_column)
from slidemil.files.deploy import fold_columns as output_fold_columns
from slidemil.report.stats import (bootstrap_mean_auc, compare_models, fold_auc, paired_auc_difference, plot_roc,
                                    square_axes)

logger = logging.getLogger(__name__)

METRIC_COLUMNS = ["extractor", "model", "fold", "n_patients", "n_positive", "auc", "ci_low", "ci_high",
                  "n_bootstrap_used", "brier"]
MAX_BINS = 10
REFIT_COLUMN = member_column("prob", REFIT)


def fold_columns(patients: pd.DataFrame) -> list[str]:
    """The fold models' probability columns of a binary table."""
    return output_fold_columns(patients, "prob")


def column_name(column: str) -> str:
    if column == REFIT_COLUMN:
        return REFIT
    return ENSEMBLE_NAME if column == ENSEMBLE else column[len(FOLD_PREFIX):]


def scored_columns(patients: pd.DataFrame) -> list[str]:
    """The fold models', the refit model's (deploy.refit) and the ensemble's probability columns."""
    return fold_columns(patients) + ([REFIT_COLUMN] if REFIT_COLUMN in patients.columns else []) + [ENSEMBLE]


def scored(patients: pd.DataFrame, column: str) -> pd.DataFrame:
    """patient_id, label, prob of one model column (patients without a probability left out)."""
    frame = patients[["patient_id", "label", column]].rename(columns={column: "prob"})
    return frame.dropna(subset=["prob"]).reset_index(drop=True)


def model_metrics(patients: pd.DataFrame, n_bootstrap: int, seed: int, label: str = "") -> list[dict]:
    """AUC with its bootstrap CI and the Brier score of every fold model and the ensemble."""
    from sklearn.metrics import brier_score_loss

    rows = []
    for column in scored_columns(patients):
        test = scored(patients, column)
        auc = fold_auc(test, f"{label} {column_name(column)}")
        undefined = (math.nan, math.nan, 0)
        low, high, used = bootstrap_mean_auc([test], n_bootstrap, seed) if math.isfinite(auc) else undefined
        brier = float(brier_score_loss(test["label"], test["prob"])) if len(test) else math.nan
        rows.append({"fold": column_name(column), "n_patients": len(test), "n_positive": int(test["label"].sum()),
                     "auc": auc, "ci_low": low, "ci_high": high, "n_bootstrap_used": used, "brier": brier})
    return rows


def plot_calibration(patients: pd.DataFrame, title: str, png: str | os.PathLike) -> None:
    """Reliability curves (equal-count bins) of the ensemble, bold, and of each fold model."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    with square_axes(png, title, "mean predicted probability", "fraction positive", diagonal="perfectly calibrated",
                     legend_loc="upper left") as ax:
        for column in scored_columns(patients):
            test = scored(patients, column)
            if test["label"].nunique() < 2:
                continue
            bins = max(2, min(MAX_BINS, len(test) // 5))
            observed, predicted = calibration_curve(test["label"], test["prob"], n_bins=bins, strategy="quantile")
            bold = column == ENSEMBLE
            brier = brier_score_loss(test["label"], test["prob"])
            ax.plot(predicted, observed, marker="o", lw=2.5 if bold else 1, alpha=1 if bold else 0.6,
                    label=f"{'' if bold else 'fold '}{column_name(column)}, Brier {brier:.3f}")
        ax.text(0.98, 0.02, f"equal-count bins of {len(test)} patients", ha="right", fontsize=8, color="grey")


def _tests(patients: pd.DataFrame, columns: list[str]) -> list[tuple[str, pd.DataFrame, float]]:
    return [(column_name(c), t, fold_auc(t)) for c in columns for t in [scored(patients, c)]]


def comparison(tables: dict[tuple[str, str], pd.DataFrame], reference: str, n_bootstrap: int,
               seed: int) -> pd.DataFrame:
    """Every model against ``reference`` on the cohort's patients: per fold, the fold mean and the ensembles."""
    folds = {key: _tests(p, fold_columns(p)) for key, p in tables.items()}
    frame = compare_models(folds, reference, n_bootstrap, seed)
    rows = []
    for (extractor, model), patients in sorted(tables.items()):
        ref = tables.get((extractor, reference))
        if model == reference or ref is None:
            continue
        diff = paired_auc_difference({ENSEMBLE_NAME: scored(patients, ENSEMBLE)},
                                     {ENSEMBLE_NAME: scored(ref, ENSEMBLE)}, n_bootstrap, seed)
        rows += [{"extractor": extractor, "model": model, "reference": reference, **diff[0]}] if diff else []
    return pd.concat([frame, pd.DataFrame(rows, columns=frame.columns)], ignore_index=True)


def labelled_section(tables: dict, out: Path, settings: dict, seed: int) -> dict:
    """metrics.csv, comparison.csv, ROC and calibration figures; the page's numbers."""
    rows, figures = [], []
    for (extractor, model), patients in tables.items():
        metrics = model_metrics(patients, settings["n_bootstrap"], seed, f"{extractor}/{model}")
        rows += [{"extractor": extractor, "model": model, **m} for m in metrics]
        title = f"{extractor} / {model}"
        roc, calibration = f"roc_{extractor}_{model}.png", f"calibration_{extractor}_{model}.png"
        plot_roc(_tests(patients, scored_columns(patients)), title, out / roc)
        plot_calibration(patients, title, out / calibration)
        figures.append({"extractor": extractor, "model": model, "roc": roc, "calibration": calibration})
    metrics = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    compared = comparison(tables, settings["reference_model"], settings["n_bootstrap"], seed)
    write_csv(out / "metrics.csv", metrics)
    write_csv(out / "comparison.csv", compared)
    return {"metrics": metrics.to_dict("records"), "comparison": compared.to_dict("records"), "figures": figures}


def slide_scores(slides: pd.DataFrame) -> pd.DataFrame:
    """slide_id, score and spread of each scored slide: the ensemble of the task's one output (binary P(positive),
    risk, predicted value) and its spread over folds; with several outputs (multiclass), the ensemble's
    probability of its predicted class, so the extremes are the most and the least confident slides."""
    outputs = output_names(slides)
    ensemble = slides[[ensemble_column(o) for o in outputs]].to_numpy(float)
    spread = slides[[spread_column(o) for o in outputs]].to_numpy(float)
    scored = ~np.isnan(ensemble).all(axis=1)
    pick = np.nanargmax(np.where(scored[:, None], ensemble, 0.0), axis=1)
    rows = np.arange(len(slides))
    return pd.DataFrame({"slide_id": slides["slide_id"].to_numpy(), "score": ensemble[rows, pick],
                         "spread": spread[rows, pick]})[scored]


def extreme_slides(scores: pd.DataFrame, n: int) -> list[tuple[str, str]]:
    """(slide_id, "highest"/"lowest") of the ``n`` highest- and ``n`` lowest-scored slides (``slide_scores``)."""
    ranked = scores.sort_values(["score", "slide_id"], ascending=[False, True])
    top = ranked["slide_id"].head(n).tolist()
    bottom = [s for s in ranked["slide_id"].tail(n).tolist()[::-1] if s not in top]
    return [(s, "highest") for s in top] + [(s, "lowest") for s in bottom]


def draw_heatmaps(run: dict, slides: pd.DataFrame, paths: dict, out: Path, settings: dict, device: str) -> list:
    """Heatmaps of the extreme slides with the run's first checkpoint; [] for models without attention."""
    from slidemil.cohort.manifest import read_manifest
    from slidemil.report.heatmap import HeatmapSettings, make_heatmap

    features, tiles = read_manifest(run["features"]), read_manifest(run["tiles"])
    drawing = HeatmapSettings(top_k=settings["heatmap_top_k"], device=device)
    scores = slide_scores(slides)
    by_slide = scores.set_index("slide_id")
    drawn = []
    for slide_id, which in extreme_slides(scores, settings["heatmaps_per_model"]):
        png = f"heatmaps/{run['extractor']}_{run['model']}_{slide_id}.png"
        heat = make_heatmap(paths[slide_id], features[slide_id], run["checkpoint"], out / png, tiles[slide_id],
                            slide_id=slide_id, settings=drawing)
        if heat.png is None:
            logger.info("%s: %s", run["model"], heat.note)
            return []
        drawn.append({"slide_id": slide_id, "which": which, "png": png,
                      "score": float(by_slide.at[slide_id, "score"]),
                      "spread": float(by_slide.at[slide_id, "spread"]), "prediction": heat.prediction})
    return drawn


def unlabelled_heatmaps(runs: list[dict], slides: dict, sheet: pd.DataFrame, out: Path, settings: dict,
                        device: str) -> list[dict]:
    """Each run's heatmaps of its extreme slides (runs with tiles, when heatmaps_per_model > 0)."""
    paths = dict(zip(sheet["slide_id"], sheet["path"]))
    return [{"extractor": r["extractor"], "model": r["model"],
             "slides": draw_heatmaps(r, slides[(r["extractor"], r["model"])], paths, out, settings, device)}
            for r in runs if r.get("tiles") and settings["heatmaps_per_model"] > 0]


def read_runs(runs: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, dict, dict]:
    """All runs' slide and patient tables (extractor and model columns first) and the per-run ones."""
    slides, patients = {}, {}
    for run in runs:
        key = (run["extractor"], run["model"])
        slides[key] = pd.read_csv(run["slides"], dtype={"slide_id": str, "patient_id": str}, keep_default_na=False,
                                  na_values=[""])
        patients[key] = pd.read_csv(run["patients"], dtype={"patient_id": str})
        slides[key]["excluded"] = slides[key]["excluded"].fillna("")

    def stacked(tables):
        return pd.concat([t.assign(extractor=e, model=m) for (e, m), t in tables.items()], ignore_index=True) \
            .pipe(lambda f: f[["extractor", "model", *[c for c in f.columns if c not in ("extractor", "model")]]])

    return stacked(slides), stacked(patients), slides, patients


def build_deploy_report(cohort: str, runs: list[dict], out_dir: str | os.PathLike, settings: dict, seed: int,
                        sheet: str | os.PathLike, positive_class=None, device: str = "cpu",
                        endpoint: dict | None = None, training_predictions: list | None = None) -> dict:
    """The report of one deploy cohort from its predict jobs' tables; ``runs`` has one entry per
    (extractor, model): extractor, model, slides, patients (the predict tables), checkpoint (first fold's),
    features and tiles (the cohort's manifests; tiles None for imported features). ``sheet``: the cohort's;
    ``endpoint``: the config's task and survival columns (``slidemil.cohort.sheet.Endpoint``);
    ``training_predictions``: survival, optional, the training runs' predictions_patients.csv, each run's folds
    in turn in the runs' order (the Kaplan-Meier split at the training cohort's median risk)."""
    from slidemil.cohort.deploy import load_deploy_sheet
    from slidemil.cohort.sheet import Endpoint

    out = Path(out_dir)
    task = deploy_task(runs)
    sheet = load_deploy_sheet(sheet, check_files=False, positive_class=positive_class,
                              endpoint=Endpoint(**(endpoint or {})), class_names=task.class_names)
    all_slides, all_patients, slides, patients = read_runs(runs)
    write_csv(out / "predictions_slides.csv", all_slides)
    write_csv(out / "predictions_patients.csv", all_patients)
    labelled = "label" in sheet.columns
    first = next(iter(slides.values()))
    excluded = first.loc[first["excluded"] != "", ["slide_id", "excluded"]].to_dict("records")
    doc = {"cohort": cohort, "labelled": labelled, "n_slides": len(first),
           "n_patients": int(sheet["patient_id"].nunique()),
           "n_usable": int(first[ensemble_column(task.output_columns[0])].notna().sum()),
           "excluded": excluded, "settings": settings,
           "models": [{"extractor": r["extractor"], "model": r["model"]} for r in runs]}
    if labelled and task.name == "binary":
        doc.update(labelled_section(patients, out, settings, seed))
    elif labelled:
        from slidemil.deploy.endpoints import task_section

        per_run = len(training_predictions or []) // len(runs)
        training = {(r["extractor"], r["model"]): training_predictions[k * per_run:(k + 1) * per_run]
                    for k, r in enumerate(runs)} if per_run else {}
        doc.update(task_section(task, patients, training, out, settings, seed))
    else:
        if task.name == "binary":
            doc["patients"] = _patient_rows(all_patients)
        else:
            doc |= {"task": task.name, "patients": task_patient_rows(all_patients, task)}
        doc["heatmaps"] = unlabelled_heatmaps(runs, slides, sheet, out, settings, device)
    write_json(out / "report.json", doc)
    write_text(out / "report.html", render_page(doc, out))
    return doc


def deploy_task(runs: list[dict]):
    """The task the deployed models were trained for, from the first run's checkpoint (its class names too)."""
    from slidemil.files.checkpoint import read_checkpoint
    from slidemil.tasks import task_from_checkpoint

    return task_from_checkpoint(read_checkpoint(runs[0]["checkpoint"]))


def task_patient_rows(patients: pd.DataFrame, task) -> list[dict]:
    """An unlabelled cohort's patients, each with its ensemble outputs and their spread over folds (and, for
    multiclass, the predicted class), ordered by the first output's ensemble, highest first."""
    outputs = output_names(patients)
    ordered = patients.sort_values(["extractor", "model", ensemble_column(outputs[0])], ascending=[True, True, False])
    rows = []
    for record in ordered.to_dict("records"):
        row = {k: record[k] for k in ("extractor", "model", "patient_id", "n_slides")}
        row["outputs"] = [{"name": output_title(o, task), "ensemble": record[ensemble_column(o)],
                           "spread": record[spread_column(o)]} for o in outputs]
        row["predicted_class"] = record.get(PREDICTED_CLASS)
        rows.append(row)
    return rows


def output_title(output: str, task) -> str:
    """What the page calls an output: P(<class>), risk, predicted value."""
    if task.name == "multiclass":
        return f"P({task.class_names[int(output.removeprefix('prob_'))]})"
    return {"risk": "risk", "pred": "predicted value"}.get(output, output)


def _patient_rows(patients: pd.DataFrame) -> list[dict]:
    keep = ["extractor", "model", "patient_id", "n_slides", ENSEMBLE, SPREAD]
    ordered = patients.sort_values(["extractor", "model", ENSEMBLE], ascending=[True, True, False])
    return ordered[keep].rename(columns={ENSEMBLE: "ensemble", SPREAD: "spread"}).to_dict("records")


def render_page(doc: dict, out: Path) -> str:
    from slidemil.report.page import _environment, _jpeg_uri, _png_uri

    return _environment().get_template("deploy.html.j2").render(
        doc=doc, s=doc["settings"], png=lambda name: _png_uri(out / name),
        heat=lambda name: _jpeg_uri(out / name, None), isfinite=lambda v: v is not None and np.isfinite(v))
