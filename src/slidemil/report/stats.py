"""Compare trained models: per-fold and summary test AUCs, bootstrap CIs, ROC plots.

Input is one entry per trained (extractor, model, fold) with the paths of its
``predictions_patients.csv`` (patient_id, label, partition, n_slides, prob) and
``history.csv`` (epoch, train_loss, val_loss, val_auc, lr). Every AUC here is
patient level and computed on the ``test`` partition only.

Command line::

    python -m slidemil.report.stats --runs RUNS.json --out DIR [--n-bootstrap N] [--seed S]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless cluster nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.stats import rankdata  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from slidemil.files import save_png, write_csv, write_text  # noqa: E402

logger = logging.getLogger(__name__)

RUN_KEYS = ("extractor", "model", "fold", "predictions", "history")
PREDICTION_COLUMNS = ("patient_id", "label", "partition", "prob")
PER_FOLD_COLUMNS = [
    "extractor", "model", "fold", "n_test_patients", "n_test_positive", "test_auc", "best_val_auc",
    "threshold", "test_accuracy", "test_balanced_accuracy",
]
SUMMARY_COLUMNS = [
    "extractor", "model", "n_folds", "n_folds_excluded", "auc_mean", "auc_std",
    "ci_low", "ci_high", "n_bootstrap_used",
    "accuracy_mean", "accuracy_std", "balanced_accuracy_mean", "balanced_accuracy_std",
]
# One row of paired_auc_difference; a comparison table puts what it holds fixed, what it varies and the reference
# (a model, or an extractor) in front.
PAIRED_COLUMNS = [
    "fold", "n_test_patients", "auc_model", "auc_reference", "auc_diff", "ci_low", "ci_high", "n_bootstrap_used",
]
# A comparison table's leading columns by the name it varies: the name held fixed, the name varied, the reference.
PAIR_KEYS = {"model": ["extractor", "model", "reference"], "extractor": ["model", "extractor", "reference"]}
COMPARISON_COLUMNS = [*PAIR_KEYS["model"], *PAIRED_COLUMNS]
ENCODER_COMPARISON_COLUMNS = [*PAIR_KEYS["extractor"], *PAIRED_COLUMNS]
# Bootstrap AUCs are computed on this many replicates at a time so that the
# (replicates x patients) rank matrices stay small for large cohorts.
_BOOTSTRAP_CHUNK = 256


# ---------------------------------------------------------------------------
# Reading inputs
# ---------------------------------------------------------------------------

def _check_runs(runs: list[dict]) -> None:
    if not runs:
        raise ValueError("no runs given: nothing to report")
    problems = []
    seen = set()
    for i, run in enumerate(runs):
        missing = [k for k in RUN_KEYS if k not in run]
        if missing:
            problems.append(f"run {i}: missing key(s) {', '.join(missing)}")
            continue
        for key in ("extractor", "model"):
            # The names become part of the ROC file name; a separator would
            # silently write outside out_dir or into a missing folder.
            if any(sep in str(run[key]) for sep in ("/", "\\", os.sep)):
                problems.append(f"run {i}: {key} {run[key]!r} contains a path separator")
        ident = (str(run["extractor"]), str(run["model"]), str(run["fold"]))
        if ident in seen:
            problems.append(f"run {i}: duplicate extractor/model/fold {ident}")
        seen.add(ident)
    if problems:
        raise ValueError("invalid runs:\n" + "\n".join(f"  - {p}" for p in problems))


def read_test_predictions(path: str | os.PathLike) -> pd.DataFrame:
    """The test-partition rows of a predictions_patients.csv, one row per patient (see read_fold_predictions)."""
    return read_fold_predictions(path)[0]


def read_fold_predictions(path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(test, validation) rows of a predictions_patients.csv, one row per patient, the file read once.

    Raises ValueError when the file cannot yield a well-defined patient-level
    AUC (missing columns, repeated patients, non-binary labels, missing probs):
    a silently wrong AUC in a model comparison is worse than a failed report.
    """
    frame = pd.read_csv(path, dtype={"patient_id": str, "partition": str})
    partition = frame["partition"].str.strip().str.lower() if "partition" in frame.columns else None
    missing = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    test = frame.loc[partition == "test"].copy()
    problems = []
    duplicated = test["patient_id"][test["patient_id"].duplicated()].unique()
    if len(duplicated):
        problems.append(f"patient(s) listed twice in the test partition: {', '.join(duplicated[:5])}")
    if not test["label"].isin([0, 1]).all():
        problems.append(f"labels must be 0/1, got {sorted(test['label'].unique().tolist())}")
    if not np.isfinite(pd.to_numeric(test["prob"], errors="coerce")).all():
        problems.append("prob has missing or non-numeric values")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    test["label"] = test["label"].astype(int)
    test["prob"] = test["prob"].astype(float)
    return test[["patient_id", "label", "prob"]].reset_index(drop=True), frame.loc[partition == "val"]


def fold_threshold_metrics(val: pd.DataFrame, test: pd.DataFrame) -> dict[str, float]:
    """The fold's threshold, chosen on its validation patients (the ``val`` rows of the fold's
    predictions_patients.csv), and the test patients' accuracy and balanced accuracy at it."""
    threshold = validation_threshold(val["label"].astype(int), val["prob"].astype(float))
    metrics = binary_metrics(test["label"], test["prob"], threshold) if len(test) else \
        {"accuracy": math.nan, "balanced_accuracy": math.nan}
    return {"threshold": threshold, "test_accuracy": metrics["accuracy"],
            "test_balanced_accuracy": metrics["balanced_accuracy"]}


def best_val_auc(path: str | os.PathLike | None, column: str = "val_auc") -> float:
    """Highest validation AUC (``column``: another task's metric) over the epochs of a history.csv (NaN if none)."""
    if path is None:
        return math.nan
    history = pd.read_csv(path)
    if column not in history.columns:
        raise ValueError(f"{path}: missing column {column}")
    # Epochs where the validation AUC was undefined are stored as NaN; skip them.
    value = pd.to_numeric(history[column], errors="coerce").max()
    return float(value) if pd.notna(value) else math.nan


def fold_auc(test: pd.DataFrame, label: str = "") -> float:
    """Patient-level test AUC, NaN (with a warning) when the test set has one class."""
    n_pos = int(test["label"].sum())
    if len(test) == 0:
        logger.warning("%s: no test patients; AUC undefined, fold left out of mean/std/CI", label or "fold")
        return math.nan
    if n_pos == 0 or n_pos == len(test):
        logger.warning(
            "%s: test set has %d patient(s), all of class %s; AUC undefined, fold left out of mean/std/CI",
            label or "fold", len(test), "1" if n_pos else "0",
        )
        return math.nan
    return float(roc_auc_score(test["label"], test["prob"]))


def validation_threshold(labels, probs) -> float:
    """The probability threshold (positive: prob >= threshold) chosen on validation patients: the highest
    balanced accuracy (Youden's J), placed midway between that cut's two neighbouring scores; among equal
    cuts, the one nearest 0.5. 0.5 when the validation patients are of one class.

    The report (per fold) and bench/mil_benchmarks.py apply it to the test patients, which it never sees.
    """
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=float)
    if len(np.unique(labels)) < 2:
        return 0.5
    fpr, tpr, cuts = roc_curve(labels, probs, drop_intermediate=False)
    # cuts[0] is +inf (nothing positive); a cut's midpoint with the next lower score generalises better.
    lower = np.append(cuts[1:], cuts[-1] - 1e-6)
    mids = np.where(np.isfinite(cuts), (cuts + lower) / 2, cuts[1] + 1e-6)
    j = tpr - fpr
    best = np.flatnonzero(np.isclose(j, j.max()))
    return float(min(mids[best], key=lambda t: abs(t - 0.5)))


def binary_metrics(labels, probs, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy and balanced accuracy of ``prob >= threshold`` (balanced: the mean of the two classes' recalls)."""
    labels, predicted = np.asarray(labels).astype(int), (np.asarray(probs) >= threshold).astype(int)
    recalls = [float((predicted[labels == c] == c).mean()) for c in (0, 1) if (labels == c).any()]
    return {"accuracy": float((predicted == labels).mean()), "balanced_accuracy": float(np.mean(recalls))}


# ---------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------

def _auc_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUC of each row (Mann-Whitney U with mid-ranks); NaN for single-class rows.

    Equals sklearn's roc_auc_score row by row, ties and repeated samples
    included, but handles all bootstrap replicates in one vectorised pass.
    """
    aucs = np.empty(labels.shape[0])
    for start in range(0, labels.shape[0], _BOOTSTRAP_CHUNK):
        y = labels[start:start + _BOOTSTRAP_CHUNK]
        ranks = rankdata(scores[start:start + _BOOTSTRAP_CHUNK], axis=1)
        n_pos = y.sum(axis=1)
        n_neg = y.shape[1] - n_pos
        u = (ranks * y).sum(axis=1) - n_pos * (n_pos + 1) / 2.0
        with np.errstate(divide="ignore", invalid="ignore"):
            aucs[start:start + _BOOTSTRAP_CHUNK] = np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)
    return aucs


def bootstrap_mean_auc(
    folds: list[pd.DataFrame], n_bootstrap: int, seed: int
) -> tuple[float, float, int]:
    """Percentile 95 % CI of the fold-mean test AUC by resampling test patients.

    ``folds`` are test predictions (patient_id, label, prob) of the folds that
    enter the mean. Returns (ci_low, ci_high, n_replicates_used).

    Resampling protocol, with ``rng = np.random.default_rng(seed)``:

    * all folds have the same test patients: the ids are sorted and, for each
      replicate, ``rng.integers(0, n, size=n)`` picks the patients; every fold
      is scored on these same patients, so the CI reflects the uncertainty of
      one shared test set rather than treating folds as independent samples;
    * otherwise each fold, in order, draws its own ``rng.integers(0, n_f, size=n_f)``
      within each replicate.

    A replicate in which any fold's resample has a single class is skipped:
    its AUC is undefined and substituting a value would bias the interval.
    """
    if not folds or n_bootstrap <= 0:
        return math.nan, math.nan, 0
    rng = np.random.default_rng(seed)
    id_sets = [frozenset(f["patient_id"]) for f in folds]
    shared = all(s == id_sets[0] for s in id_sets[1:])

    if shared:
        ids = np.array(sorted(id_sets[0]))
        aligned = [f.set_index("patient_id").loc[ids] for f in folds]
    else:
        aligned = folds
    indices = _draws(rng, [len(f) for f in aligned], shared, n_bootstrap)

    fold_aucs = np.stack([
        _auc_rows(f["label"].to_numpy()[idx], f["prob"].to_numpy()[idx])
        for f, idx in zip(aligned, indices)
    ])
    usable = ~np.isnan(fold_aucs).any(axis=0)
    n_used = int(usable.sum())
    if n_used < n_bootstrap:
        logger.info("bootstrap: %d of %d replicates skipped (single class)", n_bootstrap - n_used, n_bootstrap)
    if n_used == 0:
        return math.nan, math.nan, 0
    means = fold_aucs[:, usable].mean(axis=0)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high), n_used


def _draws(rng: np.random.Generator, sizes: list[int], shared: bool, n_bootstrap: int) -> list[np.ndarray]:
    """Resample indices [n_bootstrap, n_f] per fold; one draw shared by all folds when ``shared``."""
    if shared:
        index = np.stack([rng.integers(0, sizes[0], size=sizes[0]) for _ in range(n_bootstrap)])
        return [index] * len(sizes)
    per_replicate = [[rng.integers(0, n, size=n) for n in sizes] for _ in range(n_bootstrap)]
    return [np.stack([rep[k] for rep in per_replicate]) for k in range(len(sizes))]


def paired_auc_difference(
    model_folds: dict, reference_folds: dict, n_bootstrap: int, seed: int
) -> list[dict]:
    """AUC(model) - AUC(reference) on the same test patients, per fold and as the mean over folds.

    ``model_folds`` / ``reference_folds`` map fold -> test predictions
    (patient_id, label, prob). Folds present for both enter; within a fold,
    the patients both models were scored on (their labels must agree).

    Paired bootstrap, with ``rng = np.random.default_rng(seed)``: each
    replicate draws one resample of a fold's patients (``rng.integers(0, n,
    size=n)``, the ids sorted) and scores *both* models on it, so what the two
    models share (which patients are easy) cancels in the difference and only
    their disagreement is left. When every fold has the same patients, one
    draw per replicate serves all folds (as in :func:`bootstrap_mean_auc`);
    otherwise each fold draws its own, in fold order. A fold's CI is the
    2.5/97.5 percentile of its replicate differences, skipping replicates in
    which its resample has one class; the CI of the mean uses the mean over
    folds of the replicate differences, skipping replicates where any fold's
    resample has one class. Folds where either AUC is undefined are listed
    but left out of the mean.

    Returns one row per fold and a last row with ``fold`` "mean": fold,
    n_test_patients, auc_model, auc_reference, auc_diff, ci_low, ci_high,
    n_bootstrap_used.
    """
    folds = sorted(set(model_folds) & set(reference_folds), key=lambda f: (str(type(f)), f))
    rows, aligned = [], []
    for fold in folds:
        row, scored = _paired_fold(fold, model_folds[fold], reference_folds[fold])
        rows.append(row)
        if scored is not None:
            aligned.append((len(rows) - 1, *scored))
    if not rows:
        return []
    mean_row = {"fold": "mean", "n_test_patients": int(np.mean([r["n_test_patients"] for r in rows])),
                "ci_low": math.nan, "ci_high": math.nan, "n_bootstrap_used": 0}
    for key in ("auc_model", "auc_reference", "auc_diff"):
        mean_row[key] = float(np.mean([rows[i][key] for i, *_ in aligned])) if aligned else math.nan
    if aligned and n_bootstrap > 0:
        _paired_bootstrap(rows, mean_row, aligned, n_bootstrap, seed)
    return rows + [mean_row]


def _paired_fold(fold, model: pd.DataFrame, reference: pd.DataFrame) -> tuple[dict, tuple | None]:
    """A fold's row of :func:`paired_auc_difference`, CI not yet drawn, and, when both AUCs are defined, the
    scored patients sorted by id: (patient ids, labels, model probs, reference probs)."""
    both = model.merge(reference, on="patient_id", suffixes=("_model", "_ref"))
    if (both["label_model"] != both["label_ref"]).any():
        raise ValueError(f"fold {fold}: the two runs' prediction files give different labels "
                         "for the same patient(s)")
    both = both.sort_values("patient_id").reset_index(drop=True)
    y = both["label_model"].to_numpy(int)
    pm, pr = both["prob_model"].to_numpy(float), both["prob_ref"].to_numpy(float)
    defined = 0 < y.sum() < len(y)
    auc_m = float(_auc_rows(y[None], pm[None])[0]) if defined else math.nan
    auc_r = float(_auc_rows(y[None], pr[None])[0]) if defined else math.nan
    row = {"fold": fold, "n_test_patients": len(both), "auc_model": auc_m, "auc_reference": auc_r,
           "auc_diff": auc_m - auc_r, "ci_low": math.nan, "ci_high": math.nan, "n_bootstrap_used": 0}
    return row, ((both["patient_id"].to_numpy(), y, pm, pr) if defined else None)


def _paired_bootstrap(rows: list[dict], mean_row: dict, aligned: list[tuple], n_bootstrap: int, seed: int) -> None:
    """Fill in the CIs of ``rows`` and ``mean_row`` from the paired replicates of the ``aligned`` folds
    ((row index, patient ids, labels, model probs, reference probs) each), as :func:`paired_auc_difference` says."""
    rng = np.random.default_rng(seed)
    shared = all(np.array_equal(a[1], aligned[0][1]) for a in aligned[1:])
    draws = _draws(rng, [len(a[2]) for a in aligned], shared, n_bootstrap)
    diffs = np.stack([
        _auc_rows(y[idx], pm[idx]) - _auc_rows(y[idx], pr[idx])
        for (_, _, y, pm, pr), idx in zip(aligned, draws)
    ])  # [folds, replicates], NaN where a resample has one class
    for (i, *_), fold_diffs in zip(aligned, diffs):
        ok = fold_diffs[~np.isnan(fold_diffs)]
        if len(ok):
            rows[i].update(ci_low=float(np.percentile(ok, 2.5)), ci_high=float(np.percentile(ok, 97.5)),
                           n_bootstrap_used=len(ok))
    usable = ~np.isnan(diffs).any(axis=0)
    if usable.any():
        means = diffs[:, usable].mean(axis=0)
        mean_row.update(ci_low=float(np.percentile(means, 2.5)), ci_high=float(np.percentile(means, 97.5)),
                        n_bootstrap_used=int(usable.sum()))


def compare_runs(
    tests: dict[tuple[str, str], list[tuple[object, pd.DataFrame, float]]],
    vary: str,
    reference: str,
    n_bootstrap: int,
    seed: int,
) -> pd.DataFrame:
    """Every run group against the one that differs from it only in ``vary`` ("model" or "extractor"),
    where that name is ``reference``: :func:`paired_auc_difference` rows on the same test patients.

    ``tests`` maps (extractor, model) to (fold, test predictions, AUC) items. Each comparison starts its
    bootstrap from ``seed``, so its CI does not depend on which other runs are in the report. Columns:
    the name held fixed, the name varied, ``reference``, then :data:`PAIRED_COLUMNS`.
    """
    rows = []
    for names, folds, ref in run_pairs(tests, vary, reference):
        rows += [{**names, **row} for row in paired_auc_difference(folds, ref, n_bootstrap, seed)]
    frame = pd.DataFrame(rows, columns=[*pair_columns(vary), *PAIRED_COLUMNS])
    frame["fold"] = frame["fold"].astype(str)
    return frame


def pair_columns(vary: str) -> list[str]:
    """:data:`PAIR_KEYS` of ``vary`` ("model" or "extractor"), checked."""
    if vary not in PAIR_KEYS:
        raise ValueError(f"vary must be 'model' or 'extractor', got {vary!r}")
    return list(PAIR_KEYS[vary])


def run_pairs(tests: dict, vary: str, reference: str):
    """Each run group of ``tests`` ((extractor, model) -> (fold, test table, ...) items) that has a partner differing
    only in ``vary``, where that name is ``reference``: ({fixed, varied, reference names}, {fold: test table},
    {fold: the partner's test table}), ordered by the fixed name, then the varied one. One home for the pairing
    of the binary comparisons and of the other tasks' (slidemil.report.endpoints)."""
    fixed = pair_columns(vary)[0]
    for (extractor, model), folds in sorted(tests.items(), key=lambda item: _names(item[0], fixed, vary)):
        names = {"extractor": extractor, "model": model}
        ref = tests.get(tuple({**names, vary: reference}[k] for k in ("extractor", "model")))
        if names[vary] == reference or ref is None:
            continue
        yield ({fixed: names[fixed], vary: names[vary], "reference": reference}, {f: t for f, t, _ in folds},
               {f: t for f, t, _ in ref})


def _names(key: tuple[str, str], *order: str) -> tuple[str, ...]:
    names = dict(zip(("extractor", "model"), key))
    return tuple(names[k] for k in order)


def compare_models(tests: dict, reference: str, n_bootstrap: int, seed: int) -> pd.DataFrame:
    """Every model against ``reference`` trained on the same extractor (:data:`COMPARISON_COLUMNS`)."""
    return compare_runs(tests, "model", reference, n_bootstrap, seed)


def compare_encoders(tests: dict, reference: str, n_bootstrap: int, seed: int) -> pd.DataFrame:
    """Every extractor against ``reference`` under the same model, for each model trained on two or more
    extractors' features (:data:`ENCODER_COMPARISON_COLUMNS`; ``auc_model`` is the compared extractor's)."""
    return compare_runs(tests, "extractor", reference, n_bootstrap, seed)


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------

def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _md_cell(text) -> str:
    # A literal pipe would split the Markdown table cell.
    return str(text).replace("|", "\\|")


@contextlib.contextmanager
def square_axes(png: str | os.PathLike, title: str, xlabel: str, ylabel: str, diagonal: str | None = None,
                legend_loc: str = "lower right", limits: tuple[float, float] | None = (0, 1)):
    """A square figure's axes for curves against the identity line (ROC, reliability, predicted against true):
    the caller draws on the yielded axes; then the dashed grey diagonal (labelled ``diagonal`` in the legend),
    equal scales over ``limits`` (the y axis 1 % higher, so a curve along the top stays visible; None: the
    drawn data's range), labels, title and legend, saved to ``png``."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=100)
    try:
        yield ax
        if limits is None:
            ax.autoscale_view()
            low, high = min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])
        else:
            low, high = limits
        ax.plot([low, high], [low, high], ls="--", color="grey", lw=1, label=diagonal)
        ax.set_xlim(low, high)
        ax.set_ylim(low, high + (0.01 * (high - low) if limits is not None else 0))
        ax.set_aspect("equal")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(loc=legend_loc, fontsize=8)
        fig.tight_layout()
        save_png(fig, png)
    finally:
        plt.close(fig)


def plot_roc(
    folds: list[tuple[object, pd.DataFrame, float]], title: str, png: str | os.PathLike
) -> None:
    """One figure with the ROC curve of every fold; single-class folds are listed but not drawn."""
    with square_axes(png, title, "False positive rate", "True positive rate", diagonal="chance") as ax:
        for fold, test, auc in folds:
            if np.isfinite(auc):
                fpr, tpr, _ = roc_curve(test["label"], test["prob"])
                ax.plot(fpr, tpr, lw=1.5, label=f"fold {fold} (AUC {auc:.3f})")
            else:
                # Invisible handle so the legend still shows the fold was excluded.
                ax.plot([], [], " ", label=f"fold {fold} (single class, no ROC)")


def plot_history(folds: list[tuple[object, str | os.PathLike]], title: str, png: str | os.PathLike) -> None:
    """Validation AUC (left) and training/validation loss (right) per epoch, one line per fold."""
    fig, (ax_auc, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    try:
        for k, (fold, path) in enumerate(folds):
            history = pd.read_csv(path)
            # val_auc, or another task's validation metric (slidemil.tasks): the history's one val_ column but loss.
            metric = next(c for c in history.columns if c.startswith("val_") and c != "val_loss")
            color = f"C{k % 10}"
            ax_auc.plot(history["epoch"], pd.to_numeric(history[metric], errors="coerce"),
                        marker="o", ms=3, color=color, label=f"fold {fold}")
            ax_loss.plot(history["epoch"], history["train_loss"], color=color, label=f"fold {fold} train")
            ax_loss.plot(history["epoch"], history["val_loss"], color=color, ls="--", label=f"fold {fold} val")
        if metric == "val_auc":
            ax_auc.set_ylim(0, 1.02)
        ax_auc.set_xlabel("epoch")
        ax_auc.set_ylabel(f"validation {'AUC' if metric == 'val_auc' else metric[4:]} (patient level)")
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("loss (train solid, val dashed)")
        ax_auc.legend(fontsize=7, loc="lower right")
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        save_png(fig, png)
    finally:
        plt.close(fig)


def plot_comparison(comparison: pd.DataFrame, png: str | os.PathLike, column: str = "auc_diff",
                    metric: str = "test AUC") -> None:
    """Forest plot of a :func:`compare_runs` table (or another task's comparison): each row group's ``column``
    (the ``metric`` difference) to its reference, mean over folds (with CI) and per fold; groups are labelled by
    the table's first two columns (held fixed / varied)."""
    fixed, varied = comparison.columns[:2]
    means = comparison[comparison["fold"] == "mean"].reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(7, 1.3 + 0.4 * max(len(means), 1)), dpi=100)
    try:
        for i, row in means.iterrows():
            y = len(means) - 1 - i
            if np.isfinite(row.ci_low):
                ax.plot([row.ci_low, row.ci_high], [y, y], color="C0", lw=2)
            ax.plot([getattr(row, column)], [y], "D", color="C0", ms=7,
                    label="mean over folds, 95 % CI" if i == 0 else None)
            folds = comparison[(comparison[fixed] == row[fixed]) & (comparison[varied] == row[varied])
                               & (comparison["fold"] != "mean")]
            ax.plot(folds[column], [y] * len(folds), "o", color="C1", ms=4, alpha=0.8,
                    label="single folds" if i == 0 else None)
        ax.axvline(0, color="grey", ls="--", lw=1)
        ax.set_ylim(-0.6, max(len(means), 1) - 0.4)
        ax.set_yticks(range(len(means)))
        ax.set_yticklabels([f"{a} / {b}" for a, b in zip(means[fixed], means[varied])][::-1], fontsize=8)
        ref = ", ".join(sorted(comparison["reference"].unique())) or "reference"
        ax.set_xlabel(f"{metric} difference to {ref} (paired bootstrap over patients)")
        if len(means):
            # Right of the axes, so it never hides an interval or the axis label.
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        save_png(fig, png, bbox_inches="tight")
    finally:
        plt.close(fig)


def _markdown(summary: pd.DataFrame, per_fold: pd.DataFrame, n_bootstrap: int,
              excluded: pd.DataFrame | None = None) -> str:
    lines = [
        "# Model comparison",
        "",
        "Test AUCs are patient level on the held-out test set, as mean ± sample standard "
        f"deviation over folds; the 95 % CI is a percentile bootstrap ({n_bootstrap} replicates "
        "requested) of the fold-mean AUC, resampling test patients. Accuracy and balanced accuracy "
        "(mean ± std over folds) call a test patient positive at the threshold chosen on the fold's "
        "validation patients (highest balanced accuracy there).",
        "",
        "| Extractor | Model | Folds | Test AUC (mean ± std) | 95 % CI | Accuracy | Balanced accuracy "
        "| Per-fold test AUCs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary.itertuples(index=False):
        folds = per_fold[(per_fold["extractor"] == row.extractor) & (per_fold["model"] == row.model)]
        per = ", ".join(f"{f.fold}: {_fmt(f.test_auc)}" for f in folds.itertuples(index=False))
        ci = "n/a" if not np.isfinite(row.ci_low) else f"{_fmt(row.ci_low)}–{_fmt(row.ci_high)}"
        lines.append(
            f"| {_md_cell(row.extractor)} | {_md_cell(row.model)} | {row.n_folds} "
            f"| {_fmt(row.auc_mean)} ± {_fmt(row.auc_std)} | {ci} | {_fmt(row.accuracy_mean)} ± "
            f"{_fmt(row.accuracy_std)} | {_fmt(row.balanced_accuracy_mean)} ± {_fmt(row.balanced_accuracy_std)} "
            f"| {_md_cell(per)} |"
        )
    excluded_folds = per_fold[per_fold["test_auc"].isna()]
    if len(excluded_folds):
        names = ", ".join(f"{r.extractor}/{r.model} fold {r.fold}" for r in excluded_folds.itertuples(index=False))
        lines += ["", "Excluded from mean, std and CI because the test set has a single class "
                  f"(AUC undefined): {_md_cell(names)}."]
    short = summary[summary["n_bootstrap_used"] < n_bootstrap]
    if n_bootstrap > 0 and len(short):
        names = ", ".join(f"{r.extractor}/{r.model} ({r.n_bootstrap_used})" for r in short.itertuples(index=False))
        lines += ["", "Bootstrap replicates with a single class were skipped; replicates used: "
                  f"{_md_cell(names)}."]
    if excluded is not None and len(excluded):
        # Slides left out at tiling (broken, no mpp, no tissue) and why.
        lines += ["", f"## Excluded slides ({len(excluded)})", ""]
        lines += [f"- `{r.slide_id}`: {r.reason}" for r in excluded.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------

def load_tests(runs: list[dict]) -> tuple[pd.DataFrame, dict[tuple[str, str], list[tuple[object, pd.DataFrame, float]]]]:
    """The per-fold table and, per (extractor, model), its (fold, test predictions, test AUC) items."""
    _check_runs(runs)
    per_fold_rows = []
    tests: dict[tuple[str, str], list[tuple[object, pd.DataFrame, float]]] = {}
    for run in runs:
        extractor, model, fold = str(run["extractor"]), str(run["model"]), run["fold"]
        test, val = read_fold_predictions(run["predictions"])
        auc = fold_auc(test, label=f"{extractor}/{model} fold {fold}")
        per_fold_rows.append({
            "extractor": extractor,
            "model": model,
            "fold": fold,
            "n_test_patients": len(test),
            "n_test_positive": int(test["label"].sum()),
            "test_auc": auc,
            "best_val_auc": best_val_auc(run.get("history")),
            **fold_threshold_metrics(val, test),
        })
        tests.setdefault((extractor, model), []).append((fold, test, auc))
    per_fold = (
        pd.DataFrame(per_fold_rows, columns=PER_FOLD_COLUMNS)
        .sort_values(["extractor", "model", "fold"], kind="stable")
        .reset_index(drop=True)
    )
    return per_fold, tests


def make_report(runs: list[dict], out_dir: str, n_bootstrap: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Write per_fold.csv, summary.csv, summary.md and one ROC figure per model into ``out_dir``.

    ``runs``: dicts with extractor, model, fold, predictions (path to
    predictions_patients.csv) and history (path to history.csv).
    Returns the summary table, sorted by mean test AUC (best first).
    """
    per_fold, tests = load_tests(runs)
    return write_summary(per_fold, tests, out_dir, n_bootstrap, seed)


def _summary_row(extractor: str, model: str, folds: list, n_bootstrap: int, seed: int) -> dict:
    valid = [(fold, test, auc) for fold, test, auc in folds if np.isfinite(auc)]
    aucs = np.array([auc for _, _, auc in valid])
    mean = float(aucs.mean()) if len(aucs) else math.nan
    # Sample std is undefined for one fold; NaN says so instead of a misleading 0.
    std = float(aucs.std(ddof=1)) if len(aucs) > 1 else math.nan
    ci_low, ci_high, n_used = bootstrap_mean_auc([t for _, t, _ in valid], n_bootstrap, seed)
    logger.info("%s/%s: test AUC %s ± %s, 95%% CI %s-%s",
                extractor, model, _fmt(mean), _fmt(std), _fmt(ci_low), _fmt(ci_high))
    return {"extractor": extractor, "model": model, "n_folds": len(valid), "n_folds_excluded": len(folds) - len(valid),
            "auc_mean": mean, "auc_std": std, "ci_low": ci_low, "ci_high": ci_high, "n_bootstrap_used": n_used}


def _add_accuracy(summary: pd.DataFrame, per_fold: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over folds of the test accuracy and balanced accuracy at each fold's validation threshold."""
    stats = per_fold.groupby(["extractor", "model"])[["test_accuracy", "test_balanced_accuracy"]].agg(["mean", "std"])
    stats.columns = ["accuracy_mean", "accuracy_std", "balanced_accuracy_mean", "balanced_accuracy_std"]
    return summary.merge(stats.reset_index(), on=["extractor", "model"], how="left")


def write_summary(per_fold: pd.DataFrame, tests: dict, out_dir: str | os.PathLike, n_bootstrap: int = 1000,
                  seed: int = 0, excluded: pd.DataFrame | None = None) -> pd.DataFrame:
    """The one writer of per_fold.csv, summary.csv, summary.md and the ROC figures; returns the summary.

    ``per_fold`` / ``tests``: as :func:`load_tests` returns them, so a caller
    that needs the test predictions too reads each file once. ``excluded``:
    slides left out (slide_id, reason), listed at the end of summary.md.

    Every model's bootstrap starts from ``default_rng(seed)`` so that its CI
    does not depend on which other models are in the report, and models
    scored on the same test patients are resampled identically (paired).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary_rows = []
    for (extractor, model), folds in tests.items():
        folds = sorted(folds, key=lambda item: item[0])
        row = _summary_row(extractor, model, folds, n_bootstrap, seed)
        summary_rows.append(row)
        title = f"{extractor} / {model}: test AUC {_fmt(row['auc_mean'])} ± {_fmt(row['auc_std'])} " \
                f"({row['n_folds']} folds)"
        plot_roc(folds, title, out / f"roc_{extractor}_{model}.png")
    summary = (
        _add_accuracy(pd.DataFrame(summary_rows, columns=SUMMARY_COLUMNS[:-4]), per_fold)
        .sort_values(["auc_mean", "extractor", "model"], ascending=[False, True, True],
                     na_position="last", kind="stable")
        .reset_index(drop=True)
    )
    write_csv(out / "per_fold.csv", per_fold)
    write_csv(out / "summary.csv", summary)
    write_text(out / "summary.md", _markdown(summary, per_fold, n_bootstrap, excluded))
    return summary


def main(argv: list[str] | None = None, prog: str = "python -m slidemil.report.stats") -> int:
    from slidemil.logs import setup_logging

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Compare trained models: patient-level test AUCs per fold, mean ± std, "
                    "bootstrap 95% CI and ROC curves.",
    )
    parser.add_argument("--runs", required=True,
                        help="JSON file: list of {extractor, model, fold, predictions, history}")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap replicates (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--log", default=None, help="append the log to this file instead of stderr")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    with open(args.runs) as fh:
        runs = json.load(fh)
    if not isinstance(runs, list):
        parser.error(f"{args.runs}: expected a JSON list of run objects")
    make_report(runs, args.out, n_bootstrap=args.n_bootstrap, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
