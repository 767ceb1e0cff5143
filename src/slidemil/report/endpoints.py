"""The report of a multiclass, survival or regression task: metrics per fold, mean ± std over folds, bootstrap
CIs over test patients, the paired comparisons with the reference model and with the first extractor (on the
task's primary metric), and each task's figures.

The metrics are slidemil.tasks' (one home for training's validation metric and the report's). Protocols as the
binary report's (slidemil.report.stats): every model's bootstrap starts from ``default_rng(seed)``; when all
folds share the test patients, one resample of them per replicate serves every fold (and, in the comparison,
both run groups: a paired bootstrap); a replicate where a metric is undefined is skipped for that metric.

Figures: multiclass, the confusion matrix (test patients of all folds, rows normalised to the true class) and
one-vs-rest ROC curves per class (all folds' test patients pooled); survival, Kaplan-Meier curves of each fold's
test patients split at the median risk of that fold's training patients, with the log-rank p-value; regression,
predicted against true values, one colour per fold.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless cluster nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import confusion_matrix, roc_curve  # noqa: E402

from slidemil.files import save_png, write_csv, write_text  # noqa: E402
from slidemil.names import METRIC_NAMES, RESULT_FIGURES  # noqa: E402
from slidemil.report.stats import _draws, _fmt, best_val_auc, pair_columns, run_pairs, square_axes  # noqa: E402
from slidemil.tasks import Task, make_task  # noqa: E402

logger = logging.getLogger(__name__)

# One row of paired_difference; a comparison table puts the name it holds fixed, the name it varies and the reference
# in front (slidemil.report.stats.PAIR_KEYS).
PAIRED_COLUMNS = ["fold", "n_test_patients", "metric_model", "metric_reference", "difference", "ci_low", "ci_high",
                  "n_bootstrap_used"]


def detect_task(prediction_files: list, class_names: list | None = None) -> Task | None:
    """The task of a run's predictions_patients.csv from its output columns; None for binary (``prob``)."""
    columns = pd.read_csv(prediction_files[0], nrows=0).columns
    if "risk" in columns:
        return make_task("survival")
    if "pred" in columns:
        return make_task("regression")
    probs = [c for c in columns if c.startswith("prob_")]
    if probs:
        names = class_names if class_names and len(class_names) == len(probs) else [str(k) for k in range(len(probs))]
        return make_task("multiclass", names)
    return None


def read_predictions(path: str | os.PathLike, task: Task) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(test patients, training patients) of a predictions_patients.csv, checked: one line per problem."""
    frame = pd.read_csv(path, dtype={"patient_id": str, "partition": str})
    needed = ["patient_id", "label", "partition", *task.extra_columns, *task.output_columns]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} of a {task.name} prediction file")
    values = frame[[*task.extra_columns, *task.output_columns, "label"]].apply(pd.to_numeric, errors="coerce")
    if not np.isfinite(values.to_numpy(float)).all():
        raise ValueError(f"{path}: missing or non-numeric values in {', '.join(values.columns)}")
    test = frame[frame["partition"] == "test"].reset_index(drop=True)
    if test["patient_id"].duplicated().any():
        raise ValueError(f"{path}: patient(s) listed twice in the test partition")
    return test, frame[frame["partition"] == "train"].reset_index(drop=True)


def fold_metrics(task: Task, test: pd.DataFrame) -> dict[str, float]:
    return {k: (math.nan if v is None else v) for k, v in task.metrics(test).items()} if len(test) else {}


def load_runs(runs: list[dict], task: Task) -> tuple[pd.DataFrame, dict]:
    """The per-fold table and, per (extractor, model), its (fold, test patients, training patients) items."""
    rows, tests = [], {}
    for run in runs:
        extractor, model, fold = str(run["extractor"]), str(run["model"]), run["fold"]
        test, train = read_predictions(run["predictions"], task)
        metrics = fold_metrics(task, test)
        row = {"extractor": extractor, "model": model, "fold": fold, "n_test_patients": len(test), **metrics,
               f"best_val_{task.metric}": best_val_auc(run.get("history"), task.history_column)}
        if task.name == "survival":
            row |= {"n_test_events": int(test["label"].sum()), "logrank_p": logrank_p(test, train)}
        rows.append(row)
        tests.setdefault((extractor, model), []).append((fold, test, train))
    per_fold = pd.DataFrame(rows).sort_values(["extractor", "model", "fold"], kind="stable").reset_index(drop=True)
    return per_fold, tests


# --------------------------------------------------------------------------- bootstrap


def _aligned(folds: list[pd.DataFrame]) -> tuple[list[pd.DataFrame], bool]:
    """The folds' test tables, ordered by patient id when they share their patients (then resampled together)."""
    ids = [frozenset(f["patient_id"]) for f in folds]
    shared = all(s == ids[0] for s in ids[1:])
    if shared:
        order = sorted(ids[0])
        return [f.set_index("patient_id").loc[order].reset_index() for f in folds], True
    return folds, False


def bootstrap_metrics(task: Task, folds: list[pd.DataFrame], n_bootstrap: int, seed: int) -> dict:
    """Percentile 95 % CI of each fold-mean metric, resampling test patients: {metric: (low, high, n_used)}."""
    if not folds or n_bootstrap <= 0:
        return {}
    aligned, shared = _aligned(folds)
    draws = _draws(np.random.default_rng(seed), [len(f) for f in aligned], shared, n_bootstrap)
    replicates: dict[str, list[float]] = {}
    for r in range(n_bootstrap):
        values = [fold_metrics(task, f.iloc[idx[r]]) for f, idx in zip(aligned, draws)]
        for name in values[0]:
            fold_values = [v[name] for v in values]
            if all(np.isfinite(fold_values)):
                replicates.setdefault(name, []).append(float(np.mean(fold_values)))
    return {name: (*np.percentile(v, [2.5, 97.5]).tolist(), len(v)) for name, v in replicates.items()}


def summary_rows(task: Task, per_fold: pd.DataFrame, tests: dict, n_bootstrap: int, seed: int) -> pd.DataFrame:
    """One row per (extractor, model): folds, and per metric its mean, std over folds and bootstrap CI."""
    rows = []
    for (extractor, model), items in tests.items():
        folds = per_fold[(per_fold["extractor"] == extractor) & (per_fold["model"] == model)]
        valid = [t for (fold, t, _) in items if np.isfinite(folds.loc[folds["fold"] == fold, task.metric]).all()]
        row = {"extractor": extractor, "model": model, "n_folds": len(valid),
               "n_folds_excluded": len(items) - len(valid)}
        cis = bootstrap_metrics(task, valid, n_bootstrap, seed)
        for name in task.metrics(items[0][1]):
            values = pd.to_numeric(folds[name], errors="coerce").dropna()
            low, high, used = cis.get(name, (math.nan, math.nan, 0))
            row |= {f"{name}_mean": values.mean() if len(values) else math.nan,
                    f"{name}_std": values.std(ddof=1) if len(values) > 1 else math.nan,
                    f"{name}_ci_low": low, f"{name}_ci_high": high, f"{name}_n_bootstrap_used": used}
        rows.append(row)
    key = f"{task.metric}_mean"
    return pd.DataFrame(rows).sort_values([key, "extractor", "model"], ascending=[False, True, True],
                                          na_position="last", kind="stable").reset_index(drop=True)


def paired_difference(task: Task, model_folds: dict, reference_folds: dict, n_bootstrap: int, seed: int) -> list[dict]:
    """Primary metric(model) - metric(reference) on the same test patients, per fold and as the mean over folds,
    with a paired bootstrap CI (both models scored on each resample)."""
    metric, rows, pairs = task.metric, [], []
    for fold in sorted(set(model_folds) & set(reference_folds), key=str):
        m = model_folds[fold].set_index("patient_id")
        r = reference_folds[fold].set_index("patient_id")
        ids = sorted(set(m.index) & set(r.index))
        m, r = m.loc[ids].reset_index(), r.loc[ids].reset_index()
        a, b = fold_metrics(task, m).get(metric, math.nan), fold_metrics(task, r).get(metric, math.nan)
        rows.append({"fold": fold, "n_test_patients": len(ids), "metric_model": a, "metric_reference": b,
                     "difference": a - b, "ci_low": math.nan, "ci_high": math.nan, "n_bootstrap_used": 0})
        if np.isfinite(a - b):
            pairs.append((len(rows) - 1, m, r))
    if not rows:
        return []
    mean = {"fold": "mean", "n_test_patients": int(np.mean([r["n_test_patients"] for r in rows])),
            "ci_low": math.nan, "ci_high": math.nan, "n_bootstrap_used": 0}
    for key in ("metric_model", "metric_reference", "difference"):
        mean[key] = float(np.mean([rows[i][key] for i, _, _ in pairs])) if pairs else math.nan
    if pairs and n_bootstrap > 0:
        shared = all(list(p[1]["patient_id"]) == list(pairs[0][1]["patient_id"]) for p in pairs)
        draws = _draws(np.random.default_rng(seed), [len(p[1]) for p in pairs], shared, n_bootstrap)
        diffs = np.array([[fold_metrics(task, m.iloc[idx[k]]).get(metric, math.nan)
                           - fold_metrics(task, r.iloc[idx[k]]).get(metric, math.nan) for k in range(n_bootstrap)]
                          for (_, m, r), idx in zip(pairs, draws)])
        for (i, _, _), d in zip(pairs, diffs):
            ok = d[np.isfinite(d)]
            if len(ok):
                rows[i].update(ci_low=float(np.percentile(ok, 2.5)), ci_high=float(np.percentile(ok, 97.5)),
                               n_bootstrap_used=len(ok))
        usable = np.isfinite(diffs).all(axis=0)
        if usable.any():
            means = diffs[:, usable].mean(axis=0)
            mean.update(ci_low=float(np.percentile(means, 2.5)), ci_high=float(np.percentile(means, 97.5)),
                        n_bootstrap_used=int(usable.sum()))
    return rows + [mean]


def compare(task: Task, tests: dict, reference: str, n_bootstrap: int, seed: int, vary: str = "model") -> pd.DataFrame:
    """Every run group against the one differing only in ``vary`` ("model": ``reference`` is the reference model,
    trained on the same extractor; "extractor": the reference extractor, under the same model), paired on the
    primary metric (:func:`paired_difference`). Columns: the name held fixed, the name varied, ``reference``, then
    :data:`PAIRED_COLUMNS` (``metric_model`` is the compared run group's, whatever it varies)."""
    rows = []
    for names, folds, ref in run_pairs(tests, vary, reference):
        rows += [{**names, **row} for row in paired_difference(task, folds, ref, n_bootstrap, seed)]
    frame = pd.DataFrame(rows, columns=[*pair_columns(vary), *PAIRED_COLUMNS])
    frame["fold"] = frame["fold"].astype(str)
    return frame


# --------------------------------------------------------------------------- survival


def logrank_p(test: pd.DataFrame, train: pd.DataFrame) -> float:
    """Log-rank p-value between the test patients above and at or below the training patients' median risk."""
    from lifelines.statistics import logrank_test

    if train.empty or test.empty:
        return math.nan
    high = test["risk"] > train["risk"].median()
    if high.all() or not high.any():
        return math.nan
    result = logrank_test(test.loc[high, "time"], test.loc[~high, "time"], test.loc[high, "label"],
                          test.loc[~high, "label"])
    return float(result.p_value)


def plot_kaplan_meier(items: list, title: str, png: str | os.PathLike) -> None:
    """One panel per fold: Kaplan-Meier curves of the test patients at high and low predicted risk."""
    from lifelines import KaplanMeierFitter

    fig, axes = plt.subplots(1, len(items), figsize=(3.6 * len(items), 3.4), dpi=100, squeeze=False)
    try:
        for ax, (fold, test, train) in zip(axes[0], items):
            threshold = train["risk"].median() if len(train) else test["risk"].median()
            for high, colour, name in ((True, "C3", "high risk"), (False, "C0", "low risk")):
                group = test[(test["risk"] > threshold) == high]
                if len(group):
                    km = KaplanMeierFitter().fit(group["time"], group["label"], label=f"{name} (n={len(group)})")
                    km.plot_survival_function(ax=ax, ci_show=False, color=colour)
            p = logrank_p(test, train)
            ax.set_title(f"{member_title(fold)}: log-rank p {_fmt(p)}", fontsize=9)
            ax.set_xlabel("time")
            ax.set_ylim(0, 1.02)
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("survival probability")
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        save_png(fig, png)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- multiclass and regression figures


def plot_confusion(task: Task, items: list, title: str, png: str | os.PathLike) -> None:
    """Confusion matrix of all folds' test patients (rows: true class, normalised) and one-vs-rest ROC curves."""
    pooled = pd.concat([t for _, t, _ in items], ignore_index=True)
    labels = pooled["label"].to_numpy(int)
    probs = pooled[task.output_columns].to_numpy(float)
    k = len(task.class_names)
    counts = confusion_matrix(labels, probs.argmax(1), labels=list(range(k)))
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, (ax_cm, ax_roc) = plt.subplots(1, 2, figsize=(10, 4.4), dpi=100)
    try:
        ax_cm.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                ax_cm.text(j, i, f"{counts[i, j]}\n{rates[i, j]:.2f}", ha="center", va="center", fontsize=8,
                           color="white" if rates[i, j] > 0.5 else "black")
        ax_cm.set_xticks(range(k), task.class_names, rotation=30, fontsize=8)
        ax_cm.set_yticks(range(k), task.class_names, fontsize=8)
        ax_cm.set_xlabel("predicted class")
        ax_cm.set_ylabel("true class")
        for c, name in enumerate(task.class_names):
            positive = labels == c
            if 0 < positive.sum() < len(labels):
                fpr, tpr, _ = roc_curve(positive, probs[:, c])
                ax_roc.plot(fpr, tpr, lw=1.5, label=f"{name} vs rest")
        ax_roc.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        ax_roc.set_xlabel("False positive rate")
        ax_roc.set_ylabel("True positive rate")
        ax_roc.set_aspect("equal")
        ax_roc.legend(fontsize=7, loc="lower right")
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        save_png(fig, png)
    finally:
        plt.close(fig)


def plot_scatter(items: list, title: str, png: str | os.PathLike) -> None:
    """Predicted against true target of the test patients, one colour per fold, with the identity line."""
    with square_axes(png, title, "true value", "predicted value", legend_loc="best", limits=None) as ax:
        for k, (fold, test, _) in enumerate(items):
            ax.scatter(test["label"], test["pred"], s=14, alpha=0.7, color=f"C{k % 10}", label=member_title(fold))


def member_title(fold) -> str:
    """A figure's name for a fold model ("fold 0"), or for a deploy cohort's "ensemble" and "refit" models."""
    return f"fold {fold}" if str(fold).isdigit() else str(fold)


def figure_name(task: Task, extractor: str, model: str) -> str:
    return f"{RESULT_FIGURES[task.name][0]}_{extractor}_{model}.png"


def draw_figure(task: Task, items: list, title: str, png: Path) -> None:
    # Fold models in fold order, then any named model (a deploy cohort's refit and ensemble) as given.
    items = sorted(items, key=lambda item: (not str(item[0]).isdigit(), str(item[0]) if str(item[0]).isdigit() else ""))
    if task.name == "multiclass":
        plot_confusion(task, items, title, png)
    elif task.name == "survival":
        plot_kaplan_meier(items, title, png)
    else:
        plot_scatter(items, title, png)


# --------------------------------------------------------------------------- the report's results


def write_task_summary(task: Task, runs: list[dict], out_dir: str | os.PathLike, reference: str, n_bootstrap: int,
                       seed: int) -> dict:
    """per_fold.csv, summary.csv, summary.md, comparison.csv, encoder_comparison.csv and each model's figure;
    returns their tables."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_fold, tests = load_runs(runs, task)
    summary = summary_rows(task, per_fold, tests, n_bootstrap, seed)
    comparison = compare(task, tests, reference, n_bootstrap, seed)
    # The encoders' reference: the first extractor of the runs (the workflow's order, features.extractors), as binary.
    encoders = compare(task, tests, next(iter(tests))[0], n_bootstrap, seed, vary="extractor")
    figures = []
    for (extractor, model), items in sorted(tests.items()):
        name = figure_name(task, extractor, model)
        draw_figure(task, items, f"{extractor} / {model}", out / name)
        figures.append({"extractor": extractor, "model": model, "file": name})
    write_csv(out / "per_fold.csv", per_fold)
    write_csv(out / "summary.csv", summary)
    write_csv(out / "comparison.csv", comparison)
    write_csv(out / "encoder_comparison.csv", encoders)
    write_text(out / "summary.md", markdown(task, summary, n_bootstrap))
    logger.info("%s report: %d model(s), %d fold run(s)", task.name, len(summary), len(per_fold))
    return {"per_fold": per_fold, "summary": summary, "comparison": comparison, "encoder_comparison": encoders,
            "figures": figures}


def metric_title(name: str) -> str:
    """A metric as the report names it (per-class AUCs: "<class> AUC")."""
    return METRIC_NAMES.get(name, name.removeprefix("auc_") + " AUC")


def metric_names(task: Task, summary: pd.DataFrame) -> list[str]:
    """The task's metrics in the summary's columns, the primary one first."""
    return [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]


def markdown(task: Task, summary: pd.DataFrame, n_bootstrap: int) -> str:
    names = metric_names(task, summary)
    lines = [f"# Model comparison ({task.name})", "",
             f"Patient-level test metrics, mean ± sample standard deviation over folds; 95 % CI: percentile "
             f"bootstrap ({n_bootstrap} replicates) of the fold mean, resampling test patients.", "",
             "| Extractor | Model | Folds | " + " | ".join(metric_title(n) for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for row in summary.to_dict(orient="records"):
        cells = [f"{_fmt(row[f'{n}_mean'])} ± {_fmt(row[f'{n}_std'])} ({_fmt(row[f'{n}_ci_low'])}–"
                 f"{_fmt(row[f'{n}_ci_high'])})" for n in names]
        lines.append(f"| {row['extractor']} | {row['model']} | {row['n_folds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
