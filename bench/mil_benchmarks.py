"""Classic MIL benchmarks (MUSK1, FOX, TIGER): every registered MIL model, 10-fold CV x 5.

The folds are the published ones (``cv_train_masks_5x10`` in each ``.npz``,
as distributed with MIDatasets.jl). Within each training fold a
label-stratified validation share (one fold's worth, 1/9 of the training
bags; ``slidemil.cohort.splits`` with ``fold_column``, exactly as the pipeline does
for a sheet with predefined folds) is held out for early stopping and
checkpoint selection; the test fold is never looked at before the final
prediction. Training runs in-process on in-memory bags through
``slidemil.mil.train.train_bags``, the same code the pipeline's train stage uses
(feature standardisation with training statistics included).

Reports accuracy (probability >= 0.5) and AUC per fold, and their mean +-
standard error (std / sqrt(n)) over the 50 folds, per model and dataset;
writes ``docs/benchmarks.md``, ``docs/benchmarks.csv`` (summary) and
``docs/benchmarks_folds.csv`` (every fold).

    PYTHONPATH=workflow OMP_NUM_THREADS=1 python bench/mil_benchmarks.py --jobs 2

``--repetitions 1 --max-folds 2`` measures a per-fold time to extrapolate from.
``--precision bf16 --out /tmp/bf16.md`` reruns the same folds under
``training.precision: bf16`` (compare with an ``fp32`` run the same way).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")  # per-epoch bars of thousands of runs drown the summary

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from slidemil.features.byof import bag_ids, cv_test_folds, load_mil_npz  # noqa: E402
from slidemil.mil.models import list_models, model_kwargs_defaults  # noqa: E402
from slidemil.cohort.splits import make_splits, validation_fraction  # noqa: E402
from slidemil.names import base_model  # noqa: E402
from slidemil.runtime import TRAIN_PRECISIONS  # noqa: E402
from slidemil.mil.train import checkpoint, train_bags  # noqa: E402

DATASETS = ("musk1", "fox", "tiger")

# Chosen once for these small-dimensional datasets (166-230 features, a few instances per bag),
# after Ilse et al. (Adam, lr 5e-4, weight decay 5e-4, early stopping); not tuned on test folds.
# Minibatches of 8 padded bags (Ilse et al.: 1) make the 150 folds x models ten times faster on CPU.
TRAINING = {
    "epochs": 60,
    "patience": 10,
    "lr": 5e-4,
    "weight_decay": 5e-4,
    "betas": [0.9, 0.999],
    "batch_size": 8,
    "class_weighted": True,
    "standardize": True,
}


def training_settings(precision: str = "auto") -> dict:
    return {**TRAINING, **({"precision": precision} if precision != "auto" else {})}


# Offered to every model; each gets the ones its builder accepts (others keep their defaults).
MODEL_PRESET = {"embed_dim": 128, "attn_dim": 64, "dropout": 0.25}

# Ilse et al. 2018, Table 1 (accuracy, mean +- s.e., 10-fold CV x 5) and the baselines in ../shared/data/README.md.
REFERENCE = [
    ("Attention (Ilse et al. 2018)", "accuracy", {"musk1": (0.892, 0.040), "fox": (0.615, 0.043), "tiger": (0.839, 0.022)}),
    ("Gated attention (Ilse et al. 2018)", "accuracy", {"musk1": (0.900, None), "fox": (0.603, None), "tiger": (0.845, None)}),
    ("mi-SVM (Andrews et al. 2002)", "accuracy", {"musk1": (0.874, None), "fox": (0.582, None), "tiger": (0.784, None)}),
    ("bag-statistics SVM (mean/max/min, RBF)", "AUC", {"musk1": (0.964, None), "fox": (0.680, None), "tiger": (0.850, None)}),
]
# Our model that reproduces each of Ilse et al.'s rows.
ILSE_COUNTERPART = {"abmil": "Attention (Ilse et al. 2018)", "abmil_gated": "Gated attention (Ilse et al. 2018)"}

logger = logging.getLogger("mil_benchmarks")


def model_kwargs(name: str) -> dict:
    accepted = model_kwargs_defaults(name)
    kwargs = {k: v for k, v in MODEL_PRESET.items() if k in accepted}
    base = base_model(name)
    if base and "base_kwargs" in accepted:
        # The student and teacher need the architecture of the baseline checkpoint they start from.
        kwargs["base_kwargs"] = model_kwargs(base)
    return kwargs


# --------------------------------------------------------------------------- data

_CACHE: dict[str, tuple[dict, pd.DataFrame, np.ndarray]] = {}


def load_dataset(data_dir: str, name: str) -> tuple[dict[str, torch.Tensor], pd.DataFrame, np.ndarray]:
    """Bags (bag id -> [n, d] float32), a sheet (slide_id, patient_id, label) and the train masks."""
    if name not in _CACHE:
        arrays = load_mil_npz(Path(data_dir) / f"{name}.npz")
        ids = bag_ids(len(arrays["bag_labels"]))
        feats = arrays["features"].astype(np.float32)
        bags = {b: torch.from_numpy(feats[arrays["bag_index"] == i]) for i, b in enumerate(ids)}
        sheet = pd.DataFrame({"slide_id": ids, "patient_id": ids, "label": arrays["bag_labels"].astype(int)})
        _CACHE[name] = (bags, sheet, arrays["cv_train_masks_5x10"])
    return _CACHE[name]


def fold_split(sheet: pd.DataFrame, masks: np.ndarray, repetition: int, fold: int, seed: int, source: str) -> pd.DataFrame:
    sheet = sheet.assign(fold=cv_test_folds(masks, repetition, source))
    splits = make_splits(sheet, fold_column="fold", seed=seed + 1000 * repetition)
    split = splits[["slide_id", "patient_id", "label", f"fold_{fold}"]].rename(columns={f"fold_{fold}": "partition"})
    split["label"] = split["label"].astype(int)
    return split


# --------------------------------------------------------------------------- one fold


def run_fold(task: tuple) -> list[dict]:
    """Train the task's models on one fold; one result row per model."""
    data_dir, dataset, models, repetition, fold, seed, precision = task
    training = training_settings(precision)
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # per-epoch logs of thousands of runs drown the summary
    bags, sheet, masks = load_dataset(data_dir, dataset)
    split = fold_split(sheet, masks, repetition, fold, seed, dataset)
    rows, baselines = [], {}
    for model in models:
        started, cpu_started = time.monotonic(), time.process_time()
        init = None
        base = base_model(model)
        if base:
            if base not in baselines:
                baselines[base] = train_bags(bags, split, base, model_kwargs(base), training, seed, "cpu")
            init = checkpoint(baselines[base], base, model_kwargs(base), seed, fold)
        run = train_bags(bags, split, model, model_kwargs(model), training, seed, "cpu", init_state=init)
        baselines.setdefault(model, run)
        test = run.slides[run.slides["partition"] == "test"]
        y, p = test["label"].to_numpy(), test["prob"].to_numpy()
        rows.append({
            "dataset": dataset, "model": model, "repetition": repetition, "fold": fold,
            "n_train": int((split["partition"] == "train").sum()), "n_val": int((split["partition"] == "val").sum()),
            "n_test": len(test), "accuracy": float(((p >= 0.5).astype(int) == y).mean()),
            "auc": float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan"),
            "best_epoch": run.best.epoch, "epochs_run": len(run.history),
            "seconds": round(time.monotonic() - started, 2),
            "cpu_seconds": round(time.process_time() - cpu_started, 2),
        })
    return rows


# --------------------------------------------------------------------------- summary and doc


def summarize(folds: pd.DataFrame) -> pd.DataFrame:
    def se(x):
        x = x.dropna()
        return x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else float("nan")

    grouped = folds.groupby(["dataset", "model"], sort=False)
    out = grouped.agg(n_folds=("fold", "size"), accuracy_mean=("accuracy", "mean"), accuracy_se=("accuracy", se),
                      auc_mean=("auc", "mean"), auc_se=("auc", se), mean_epochs=("epochs_run", "mean"),
                      seconds=("seconds", "sum"), cpu_seconds=("cpu_seconds", "sum")).reset_index()
    return out


def _pm(mean, se) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.3f}" if se is None or math.isnan(se) else f"{mean:.3f} ± {se:.3f}"


def ilse_comparison(summary: pd.DataFrame) -> list[str]:
    lines = []
    refs = {name: values for name, _, values in REFERENCE}
    for model, ref_name in ILSE_COUNTERPART.items():
        for dataset in DATASETS:
            row = summary[(summary["model"] == model) & (summary["dataset"] == dataset)]
            if row.empty:
                continue
            ours, ours_se = float(row["accuracy_mean"].iloc[0]), float(row["accuracy_se"].iloc[0])
            ref, ref_se = refs[ref_name][dataset]
            # Where the source gives no standard error for its row, ours stands in.
            tol, whose = (ref_se, "its") if ref_se is not None else (ours_se, "our")
            if ours >= ref:
                verdict = "at or above the published accuracy"
            elif ref - ours <= tol:
                verdict = f"below the published mean but within {whose} standard error"
            else:
                verdict = f"**below** the published accuracy by more than {whose} standard error ({ref - ours:.3f} > {tol:.3f})"
            lines.append(f"- `{model}` on {dataset.upper()}: {_pm(ours, ours_se)} vs {_pm(ref, ref_se)} ({ref_name}): {verdict}.")
    return lines


def write_doc(path: Path, summary: pd.DataFrame, command: str, wall_s: float, jobs: int, notes: str,
              precision: str = "auto") -> None:
    datasets = [d for d in DATASETS if d in set(summary["dataset"])]
    header = "| model | " + " | ".join(f"{d.upper()} accuracy | {d.upper()} AUC" for d in datasets) + " |"
    lines = [header, "|---|" + "---|---|" * len(datasets)]
    for model in summary["model"].drop_duplicates():
        cells = []
        for d in datasets:
            row = summary[(summary["model"] == model) & (summary["dataset"] == d)]
            if row.empty:
                cells += ["-", "-"]
            else:
                r = row.iloc[0]
                cells += [_pm(r["accuracy_mean"], r["accuracy_se"]), _pm(r["auc_mean"], r["auc_se"])]
        lines.append(f"| `{model}` | " + " | ".join(cells) + " |")
    for name, metric, values in REFERENCE:
        cells = []
        for d in datasets:
            mean, se = values[d]
            cells += [_pm(mean, se), "-"] if metric == "accuracy" else ["-", _pm(mean, se)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    folds = ", ".join(f"{r.dataset}/{r.model}: {int(r.n_folds)}" for r in summary.itertuples())
    cpu = summary.groupby("dataset", sort=False)["cpu_seconds"].sum()
    n_models = summary["model"].nunique()
    time_line = ", ".join(f"{d.upper()} {cpu[d] / 60:.1f} min" for d in datasets)
    per_model = cpu.sum() / n_models / 60
    kwargs = "; ".join(f"`{m}`: {model_kwargs(m)}" for m in summary["model"].drop_duplicates())
    text = f"""# MIL benchmarks: MUSK1, FOX, TIGER

Classic multiple-instance benchmarks (Dietterich et al. 1997; Andrews et al.
2002; files and provenance in `../shared/data/README.md`), run through the
same training code as the pipeline (`slidemil.mil.train.train_bags`) for every
registered MIL model. Written by `bench/mil_benchmarks.py`; rerun with:

```bash
{command}
```

## Results

Mean ± standard error (std / √n) over the folds of the published 10-fold
cross-validation repeated 5 times (`cv_train_masks_5x10`, as in Ilse et al.
2018). Accuracy thresholds the predicted probability at 0.5. Published rows
give what their sources report (accuracy for Ilse et al. and mi-SVM, AUC for
the bag-statistics SVM).

{chr(10).join(lines)}

Folds per row: {folds}.

### Against Ilse et al. (2018)

{chr(10).join(ilse_comparison(summary)) or "- (no abmil / abmil_gated rows in this run)"}

{notes}

## Protocol

- Test folds: the published ones; a bag's test fold is the one whose train mask leaves it out.
- Validation: inside each training fold, a label-stratified draw of {validation_fraction(10):.3f} of
  the training bags (the size of one fold), seeded, held out for early stopping and
  checkpoint selection (best validation AUC, ties by validation loss). This is
  `slidemil.cohort.splits.make_splits(..., fold_column="fold")`, the same rule the pipeline
  applies to a sample sheet with `splits.fold_column`. Ilse et al. also early-stopped on a
  validation split of the training data. The test fold is used only for the final numbers.
- Features: z-scored per dimension with the training bags' statistics (`training.standardize`).
- Training (all models): {training_settings(precision)}; class-weighted cross-entropy; cosine learning-rate schedule; CPU,
  one thread per process, seed 0.
- Model settings (the preset `MODEL_PRESET`, passed where a model accepts them): {kwargs}.
  Our `abmil` is one projection layer (in_dim -> 128, ReLU, dropout) + attention (hidden 64) +
  a linear classifier; Ilse et al.'s MUSK network had three fully connected layers
  (256-128-64) before the attention pooling.
- MHIM-MIL models (`mhim_*`) start from their baseline trained first on the same split
  (the baseline's checkpoint is passed as `init_state`), as in the pipeline.

## Time

{wall_s / 60:.1f} min wall clock with {jobs} worker process(es) on a 2-core CPU box shared with other jobs
(so wall time says little). CPU time, which does not depend on the other jobs, summed over
the folds of all {n_models} model(s) per dataset: {time_line}; {per_model:.1f} CPU-minutes per model for the
whole table, so about {per_model / 2:.1f} min per model on 2 free cores with `--jobs 2`
(models with more parameters or a baseline to train first, e.g. `mhim_*`, take longer).
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    default_models = list_models()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mil"))
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--models", nargs="+", default=default_models,
                    help=f"registered models (default: all: {' '.join(default_models)})")
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--max-folds", type=int, default=10, help="folds per repetition (fewer: a timing run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=TRAIN_PRECISIONS, default="auto", help="training.precision")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--notes", help="Markdown file whose text goes under the comparison in the doc")
    ap.add_argument("--rewrite-doc", action="store_true",
                    help="no training: rebuild the summary and the doc from the last run's files next to --out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    folds_csv, meta_json = out.with_name(out.stem + "_folds.csv"), out.with_name(out.stem + "_run.json")
    notes = Path(args.notes).read_text().strip() if args.notes else ""

    if args.rewrite_doc:
        folds, meta = pd.read_csv(folds_csv), json.loads(meta_json.read_text())
        if args.notes and "--notes" not in meta["command"]:
            meta["command"] += f" --notes {args.notes}"
    else:
        unknown = sorted(set(args.models) - set(default_models))
        if unknown:
            raise SystemExit(f"error: unknown model(s) {', '.join(unknown)}; registered: {', '.join(default_models)}")
        missing = [d for d in args.datasets if not (Path(args.data_dir) / f"{d}.npz").is_file()]
        if missing:
            raise SystemExit(f"error: {', '.join(missing)} not found in {args.data_dir}")
        # Repetition by repetition over all datasets, so an interrupted run still covers every dataset.
        tasks = [(args.data_dir, d, tuple(args.models), r, k, args.seed, args.precision)
                 for r in range(args.repetitions) for d in args.datasets for k in range(args.max_folds)]
        command = ("PYTHONPATH=workflow OMP_NUM_THREADS=1 python bench/mil_benchmarks.py"
                   f" --datasets {' '.join(args.datasets)} --models {' '.join(args.models)}"
                   f" --repetitions {args.repetitions} --jobs {args.jobs}"
                   + (f" --max-folds {args.max_folds}" if args.max_folds != 10 else "")
                   + (f" --seed {args.seed}" if args.seed else "")
                   + (f" --precision {args.precision}" if args.precision != "auto" else "")
                   + (f" --notes {args.notes}" if args.notes else ""))
        started = time.monotonic()

        def run_meta() -> dict:
            return {"wall_s": time.monotonic() - started, "jobs": args.jobs, "command": command,
                    "precision": args.precision}

        rows = []
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for i, fold_rows in enumerate(pool.map(run_fold, tasks, chunksize=1), 1):
                rows += fold_rows
                if i % 10 == 0 or i == len(tasks):
                    logger.info("%d/%d folds done (%.0f s)", i, len(tasks), time.monotonic() - started)
                    # Kept as it grows: --rewrite-doc can report an interrupted run (with its fold counts).
                    out.parent.mkdir(parents=True, exist_ok=True)
                    pd.DataFrame(rows).to_csv(folds_csv, index=False)
                    meta_json.write_text(json.dumps(run_meta(), indent=2) + "\n")
        folds = pd.DataFrame(rows)
        meta = run_meta()
        out.parent.mkdir(parents=True, exist_ok=True)
        folds.to_csv(folds_csv, index=False)
        meta_json.write_text(json.dumps(meta, indent=2) + "\n")

    summary = summarize(folds)
    summary.to_csv(out.with_suffix(".csv"), index=False, float_format="%.4f")
    write_doc(out, summary, meta["command"], meta["wall_s"], meta["jobs"], notes, meta.get("precision", "auto"))
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\n{len(folds)} fold runs in {meta['wall_s']:.0f} s with {meta['jobs']} job(s)")
    print(f"command: {meta['command']}")
    print(f"wrote {out}, {out.with_suffix('.csv')}, {folds_csv}, {meta_json}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
