"""Ablation effects on the MIL benchmarks: each variant against a baseline on the same folds, paired.

Reads the ``*_folds.csv`` files that ``bench/mil_benchmarks.py`` writes (one per variant, run with ``--out
docs/ablations/NAME.md``) and the baseline's, keeps the (dataset, model, repetition, fold) rows both have,
and reports per dataset and model the mean over folds of (variant - baseline) for accuracy and AUC with its
standard error (std of the paired differences / sqrt(n)). Paired, because the folds' difficulty varies far
more than the variants do. Also the effect of the validation-chosen threshold within each run (accuracy at
it minus accuracy at 0.5). Prints a Markdown table:

    PYTHONPATH=src python bench/mil_ablations.py --baseline docs/benchmarks_folds.csv \\
        docs/ablations/selection_val_loss_folds.csv docs/ablations/selection_last_folds.csv

``--baseline`` repeats for a run split over files (by dataset or repetition), ``--join NAME`` reads the variants'
files as one variant, and ``--baseline-model MODEL`` pairs every variant model with that model of the baseline.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

KEYS = ["dataset", "model", "repetition", "fold"]


def paired_effects(baseline: pd.DataFrame, variant: pd.DataFrame, metrics=("accuracy", "auc"),
                   baseline_model: str | None = None) -> pd.DataFrame:
    """Per dataset and model: n folds, and mean ± s.e. of variant - baseline for each metric. ``baseline_model``:
    every variant model against that one model of the baseline (e.g. against mean pooling), not against itself."""
    keys = KEYS
    if baseline_model:
        baseline = baseline[baseline["model"] == baseline_model].drop(columns="model")
        keys = [k for k in KEYS if k != "model"]
    both = variant.merge(baseline, on=keys, suffixes=("", "_base"))
    rows = []
    for (dataset, model), group in both.groupby(["dataset", "model"], sort=False):
        row = {"dataset": dataset, "model": model, "n": len(group)}
        for m in metrics:
            diff = group[m] - group[f"{m}_base"]
            row[m], row[f"{m}_se"] = diff.mean(), diff.std(ddof=1) / math.sqrt(len(diff))
        rows.append(row)
    return pd.DataFrame(rows)


def threshold_effects(folds: pd.DataFrame) -> pd.DataFrame:
    """Within one run: accuracy at the validation-chosen threshold minus accuracy at 0.5."""
    rows = []
    for (dataset, model), group in folds.groupby(["dataset", "model"], sort=False):
        diff = group["accuracy_val_threshold"] - group["accuracy"]
        rows.append({"dataset": dataset, "model": model, "n": len(group), "accuracy": diff.mean(),
                     "accuracy_se": diff.std(ddof=1) / math.sqrt(len(diff))})
    return pd.DataFrame(rows)


def _cell(mean: float, se: float) -> str:
    return f"{mean:+.3f} ± {se:.3f}"


def markdown(effects: dict[str, pd.DataFrame], metrics=("accuracy", "auc")) -> str:
    """One row per (variant, model), datasets as column groups."""
    datasets = list(dict.fromkeys(d for e in effects.values() for d in e["dataset"]))
    head = "| variant | model | n | " + " | ".join(f"{d.upper()} Δ{m if m != 'auc' else 'AUC'}" for d in datasets
                                                  for m in metrics) + " |"
    lines = [head, "|---|---|---|" + "---|" * (len(datasets) * len(metrics))]
    for name, table in effects.items():
        for model in table["model"].drop_duplicates():
            rows = table[table["model"] == model].set_index("dataset")
            cells = [_cell(rows.at[d, m], rows.at[d, f"{m}_se"]) if d in rows.index and m in rows else "-"
                     for d in datasets for m in metrics]
            n = "/".join(str(int(rows.at[d, "n"])) for d in datasets if d in rows.index)
            lines.append(f"| {name} | `{model}` | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def before_after(baseline: pd.DataFrame, runs: list[pd.DataFrame], references: str) -> str:
    """Results tables (bench/mil_benchmarks.py's) of the runs together, and of the baseline on the same folds."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mil_benchmarks", Path(__file__).with_name("mil_benchmarks.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    after = pd.concat(runs, ignore_index=True)
    before = baseline.merge(after[KEYS], on=KEYS)
    refs = bench.load_references(references)
    tables = []
    for title, folds, metrics in (("After", after, ("accuracy", "auc")),
                                  ("Before, the same folds", before, ("accuracy", "auc")),
                                  ("After: accuracy at the validation threshold, balanced accuracy at 0.5", after,
                                   ("accuracy_val_threshold", "balanced_accuracy"))):
        rows = bench.results_table(bench.summarize(folds), refs.iloc[:0] if title.startswith("After:") else refs,
                                   metrics)
        tables.append(f"{title}:\n\n" + "\n".join(rows))
    return "\n\n".join(tables)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="*_folds.csv of the variants (named by the file: NAME_folds.csv)")
    ap.add_argument("--baseline", required=True, action="append",
                    help="*_folds.csv of the baseline; repeat it for a run split over files (read as one)")
    ap.add_argument("--models", nargs="+", help="only these models")
    ap.add_argument("--join", metavar="NAME", help="read the variants' files as one variant called NAME")
    ap.add_argument("--baseline-model", metavar="MODEL",
                    help="pair every variant model with this model of the baseline instead of with itself")
    ap.add_argument("--before-after", metavar="REFERENCES_CSV",
                    help="instead: the variants' runs as one results table next to the baseline on the same folds")
    args = ap.parse_args(argv)
    baseline = pd.concat([pd.read_csv(p) for p in args.baseline], ignore_index=True)
    if args.before_after:
        print(before_after(baseline, [pd.read_csv(p) for p in args.variants], args.before_after))
        return
    variants = {Path(p).name.removesuffix("_folds.csv"): pd.read_csv(p) for p in args.variants}
    if args.join:
        variants = {args.join: pd.concat(variants.values(), ignore_index=True)}
    effects, thresholds = {}, {}
    for name, folds in variants.items():
        if args.models:
            folds = folds[folds["model"].isin(args.models)]
        effects[name] = paired_effects(baseline, folds, baseline_model=args.baseline_model)
        if "accuracy_val_threshold" in folds:
            thresholds[name] = threshold_effects(folds)
    print("Paired effect against the baseline (variant - baseline, mean ± s.e. over the folds both ran):\n")
    print(markdown(effects))
    if thresholds:
        print("\nValidation-chosen threshold against 0.5, within each run (Δaccuracy, mean ± s.e.):\n")
        print(markdown(thresholds, metrics=("accuracy",)))


if __name__ == "__main__":
    main()
