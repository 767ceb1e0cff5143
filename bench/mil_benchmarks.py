"""MIL benchmarks (MUSK1, FOX, TIGER, or any .npz in that layout): registered MIL models, 10-fold CV x 5.

The folds are the file's (``cv_train_masks_5x10``, as distributed with MIDatasets.jl; ``--data`` files
without them get a label-stratified 10-fold CV x 5 drawn from ``--seed``). Within each training fold a
label-stratified validation share (one fold's worth, 1/9 of the training bags; ``slidemil.cohort.splits``
with ``fold_column``, exactly as the pipeline does for a sheet with predefined folds) is held out for model
selection and the accuracy threshold; the test fold is never looked at before the final prediction.
Training runs in-process on in-memory bags through ``slidemil.mil.train.train_bags``, the same code the
pipeline's train stage uses, with the recipe of a workflow config file (``--preset``: ``mil.training`` and
``mil.settings``; default ``config/mil_benchmarks.yaml``).

Reports per fold accuracy (probability >= 0.5 and at the validation-chosen threshold), balanced accuracy
and AUC, and their mean +- standard error (std / sqrt(n)) over the folds, per model and dataset, next to
published numbers (``--references``, default ``bench/mil_references.csv``); writes ``--out`` (default
``results/mil_benchmarks/benchmarks.md``), its summary ``.csv``, ``_folds.csv`` (every fold) and ``_run.json``.
Rewriting an existing ``--out`` keeps the text below its ``NOTES_MARKER`` line (or puts ``--notes`` there), so
a document's own findings (``docs/benchmarks.md``) survive a rerun.

    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/mil_benchmarks.py --jobs 2
    PYTHONPATH=src python bench/mil_benchmarks.py --data my.npz --models abmil meanpool --out /tmp/my.md

``--repetitions 1 --max-folds 2`` measures a per-fold time to extrapolate from.
``--precision bf16 --out /tmp/bf16.md`` reruns the same folds under ``training.precision: bf16``.
``--refit`` trains each fold's model on all of its training bags, the validation share included, for the
recipe's fixed epochs (``selection: last`` only), as ``deploy.refit`` retrains for deployment and as
Ilse et al. 2018 trained; nothing is chosen on held-out bags then, so there is no validation threshold.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")  # per-epoch bars of thousands of runs drown the summary

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from slidemil.features.byof import CV_MASKS, bag_ids, cv_test_folds, load_mil_npz  # noqa: E402
from slidemil.mil.models import list_models, model_kwargs_defaults  # noqa: E402
from slidemil.cohort.splits import make_splits, validation_fraction  # noqa: E402
from slidemil.config import Splits  # noqa: E402
from slidemil.names import base_model  # noqa: E402
from slidemil.runtime import TRAIN_PRECISIONS  # noqa: E402
from slidemil.mil.refit import refit_split  # noqa: E402
from slidemil.mil.train import Recipe, checkpoint, resolve_training, train_bags  # noqa: E402
from slidemil.report.stats import binary_metrics, validation_threshold  # noqa: E402

DATASETS = ("musk1", "fox", "tiger")
DATA_DIR = ROOT.parent / "shared" / "data" / "mil"
# The recipe (a partial workflow config: mil.training and mil.settings): --preset, default the recommended one.
PRESET = ROOT / "config" / "mil_benchmarks.yaml"
# Published numbers to print next to ours: --references, a CSV of name, metric, dataset, mean, se, model.
REFERENCES = ROOT / "bench" / "mil_references.csv"
OUT = ROOT / "results" / "mil_benchmarks" / "benchmarks.md"
# Everything below this line of a written doc is its authors' text, kept when the doc is rewritten.
NOTES_MARKER = "<!-- Written by hand from here on: bench/mil_benchmarks.py keeps this text when it rewrites the file. -->"


def load_preset(path: str | Path, training: dict | None = None, settings: dict | None = None) -> tuple[dict, dict]:
    """(mil.training, mil.settings) of a preset file, with ``training`` and per-model ``settings`` overrides."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    mil = raw.get("mil") or {}
    unknown = sorted(set(raw) - {"mil"}) + sorted(set(mil) - {"training", "settings"})
    if unknown:
        raise SystemExit(f"error: {path}: only mil.training and mil.settings are read, not {', '.join(unknown)}")
    train = {**(mil.get("training") or {}), **(training or {})}
    models = {m: dict(v or {}) for m, v in (mil.get("settings") or {}).items()}
    for model, extra in (settings or {}).items():
        models[model] = {**models.get(model, {}), **extra}
    return resolve_training(train), models


def model_kwargs(name: str, settings: dict) -> dict:
    """The model's settings from the preset; an MHIM model also gets its baseline's (as the workflow does)."""
    kwargs = dict(settings.get(name) or {})
    base = base_model(name)
    if base and "base_kwargs" in model_kwargs_defaults(name):
        # The student and teacher need the architecture of the baseline checkpoint they start from.
        kwargs["base_kwargs"] = model_kwargs(base, settings)
    return kwargs


def load_references(path: str | Path) -> pd.DataFrame:
    """The reference table: name, metric (accuracy | auc), dataset, mean, se (blank: none given), model (the
    registered model that reproduces the row, or blank)."""
    table = pd.read_csv(path, comment="#", dtype={"model": str}, keep_default_na=False, na_values={"se": [""]})
    missing = {"name", "metric", "dataset", "mean", "se", "model"} - set(table.columns)
    bad = set(table.get("metric", [])) - {"accuracy", "auc"}
    if missing or bad:
        raise SystemExit(f"error: {path}: needs columns name, metric, dataset, mean, se, model with metric accuracy or "
                         f"auc ({'missing ' + ', '.join(sorted(missing)) if missing else 'metric ' + ', '.join(sorted(bad))})")
    return table


logger = logging.getLogger("mil_benchmarks")


# --------------------------------------------------------------------------- data

_CACHE: dict[str, tuple[dict, pd.DataFrame, np.ndarray]] = {}


def load_dataset(path: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], pd.DataFrame, np.ndarray]:
    """Bags (bag id -> [n, d] float32), a sheet (slide_id, patient_id, label) and the train masks (the file's,
    or a stratified 10-fold CV x 5 drawn from ``seed``)."""
    if path not in _CACHE:
        arrays = load_mil_npz(path, seed)
        ids = bag_ids(len(arrays["bag_labels"]))
        feats = arrays["features"].astype(np.float32)
        bags = {b: torch.from_numpy(feats[arrays["bag_index"] == i]) for i, b in enumerate(ids)}
        sheet = pd.DataFrame({"slide_id": ids, "patient_id": ids, "label": arrays["bag_labels"].astype(int)})
        _CACHE[path] = (bags, sheet, arrays[CV_MASKS])
    return _CACHE[path]


def fold_split(sheet: pd.DataFrame, masks: np.ndarray, repetition: int, fold: int, seed: int, source: str,
               refit: bool = False) -> pd.DataFrame:
    """One fold's partition per bag. ``refit``: the workflow's refit split of that fold (``refit_split``): its
    validation bags train too, and its test bags take the validation partition, so that they are predicted
    (``train_bags`` needs one) while a fixed epoch count (``selection: last``) chooses nothing on them."""
    sheet = sheet.assign(fold=cv_test_folds(masks, repetition, source))
    splits = make_splits(sheet, Splits(fold_column="fold"), seed=seed + 1000 * repetition)
    one = splits[["slide_id", "patient_id", "label", f"fold_{fold}"]]
    split = refit_split(one) if refit else one
    split = split.rename(columns={"fold_0" if refit else f"fold_{fold}": "partition"})
    split["label"] = split["label"].astype(int)
    return split


def flip_labels(split: pd.DataFrame, rate: float, seed: int, repetition: int, fold: int) -> pd.DataFrame:
    """The fold's split with each training and validation bag's label flipped with probability ``rate`` (label
    noise, as a cohort whose labels the features do not always show); test labels stay true. The flips depend
    on the seed, repetition and fold only, so every model and recipe of a fold sees the same noisy labels."""
    if rate <= 0:
        return split
    flip = np.random.default_rng((seed, repetition, fold, 1)).random(len(split)) < rate
    flip &= (split["partition"] != "test").to_numpy()
    return split.assign(label=np.where(flip, 1 - split["label"], split["label"]))


# --------------------------------------------------------------------------- one fold


class FoldTask(NamedTuple):
    """One fold of one dataset, for every model of the run (the unit a worker process takes)."""

    path: str
    models: tuple[str, ...]
    repetition: int
    fold: int
    seed: int
    training: dict
    settings: dict
    refit: bool = False
    label_noise: float = 0.0


def run_fold(task: FoldTask) -> list[dict]:
    """Train the task's models on one fold; one result row per model."""
    torch.set_num_threads(1)
    quiet = logging.root.manager.disable
    logging.disable(logging.WARNING)  # per-epoch logs of thousands of runs drown the summary
    try:
        return _run_models(task)
    finally:
        logging.disable(quiet)  # in-process (--jobs 1) the caller's logging comes back


def _run_models(task: FoldTask) -> list[dict]:
    path, models, repetition, fold, seed, training, settings, refit, label_noise = task
    dataset = Path(path).stem
    bags, sheet, masks = load_dataset(path, seed)
    split = fold_split(sheet, masks, repetition, fold, seed, dataset, refit)
    split = flip_labels(split, label_noise, seed, repetition, fold)
    rows, baselines = [], {}
    for model in models:
        started, cpu_started = time.monotonic(), time.process_time()
        init = None
        base = base_model(model)
        if base:
            if base not in baselines:
                baselines[base] = train_bags(bags, split, Recipe(base, model_kwargs(base, settings), training, seed),
                                             "cpu")
            init = checkpoint(baselines[base], fold)
        run = train_bags(bags, split, Recipe(model, model_kwargs(model, settings), training, seed), "cpu",
                         init_state=init)
        baselines.setdefault(model, run)
        rows.append({"dataset": dataset, "model": model, "repetition": repetition, "fold": fold,
                     "n_train": int((split["partition"] == "train").sum()), **test_metrics(run.slides, refit),
                     "best_epoch": run.best.epoch, "epochs_run": len(run.history),
                     "seconds": round(time.monotonic() - started, 2),
                     "cpu_seconds": round(time.process_time() - cpu_started, 2)})
    return rows


def test_metrics(slides: pd.DataFrame, refit: bool = False) -> dict:
    """AUC, and accuracy / balanced accuracy at 0.5 and at the threshold chosen on the validation bags (none
    with ``refit``, whose test bags are in the validation partition: see ``fold_split``)."""
    val, test = (slides[slides["partition"] == p] for p in ("val", "test"))
    if refit:
        val, test = val.iloc[:0], val
    y, p = test["label"].to_numpy(), test["prob"].to_numpy()
    threshold = validation_threshold(val["label"], val["prob"]) if len(val) else float("nan")
    at_half = binary_metrics(y, p, 0.5)
    at_val = binary_metrics(y, p, threshold) if len(val) else dict.fromkeys(at_half, float("nan"))
    return {"n_val": len(val), "n_test": len(test), "accuracy": at_half["accuracy"],
            "balanced_accuracy": at_half["balanced_accuracy"],
            "auc": float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan"),
            "threshold": threshold, "accuracy_val_threshold": at_val["accuracy"],
            "balanced_accuracy_val_threshold": at_val["balanced_accuracy"]}


# --------------------------------------------------------------------------- summary and doc


def summarize(folds: pd.DataFrame) -> pd.DataFrame:
    def se(x):
        x = x.dropna()
        return x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else float("nan")

    metrics = [m for m in ("accuracy", "auc", "accuracy_val_threshold", "balanced_accuracy") if m in folds]
    stats = {f"{m}_{k}": (m, f) for m in metrics for k, f in (("mean", "mean"), ("se", se))}
    grouped = folds.groupby(["dataset", "model"], sort=False)
    return grouped.agg(n_folds=("fold", "size"), **stats, mean_epochs=("epochs_run", "mean"),
                       seconds=("seconds", "sum"), cpu_seconds=("cpu_seconds", "sum")).reset_index()


def _pm(mean, se) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.3f}" if se is None or math.isnan(se) else f"{mean:.3f} ± {se:.3f}"


def reference_comparison(summary: pd.DataFrame, refs: pd.DataFrame) -> list[str]:
    """One line per reference row that names our counterpart model: above, within or below its standard error."""
    lines = []
    for ref in refs[refs["model"] != ""].itertuples():
        row = summary[(summary["model"] == ref.model) & (summary["dataset"] == ref.dataset)]
        if row.empty:
            continue
        ours, ours_se = float(row[f"{ref.metric}_mean"].iloc[0]), float(row[f"{ref.metric}_se"].iloc[0])
        ref_se = None if pd.isna(ref.se) else float(ref.se)
        # Where the source gives no standard error for its row, ours stands in.
        tol, whose = (ref_se, "its") if ref_se is not None else (ours_se, "our")
        if ours >= ref.mean:
            verdict = f"at or above the published {ref.metric}"
        elif ref.mean - ours <= tol:
            verdict = f"below the published mean but within {whose} standard error"
        else:
            verdict = f"**below** the published {ref.metric} by more than {whose} standard error ({ref.mean - ours:.3f} > {tol:.3f})"
        lines.append(f"- `{ref.model}` on {ref.dataset.upper()}: {_pm(ours, ours_se)} vs {_pm(ref.mean, ref_se)} "
                     f"({ref.name}): {verdict}.")
    return lines


def results_table(summary: pd.DataFrame, refs: pd.DataFrame, metrics=("accuracy", "auc")) -> list[str]:
    """Markdown rows: each model, then each reference, with ``metrics`` per dataset."""
    datasets = list(summary["dataset"].drop_duplicates())
    names = {"accuracy": "accuracy", "auc": "AUC", "accuracy_val_threshold": "acc. (val thr.)",
             "balanced_accuracy": "bal. acc."}
    lines = ["| model | " + " | ".join(f"{d.upper()} {names[m]}" for d in datasets for m in metrics) + " |",
             "|---|" + "---|" * (len(datasets) * len(metrics))]
    for model in summary["model"].drop_duplicates():
        cells = []
        for d in datasets:
            row = summary[(summary["model"] == model) & (summary["dataset"] == d)]
            cells += ["-" if row.empty else _pm(row[f"{m}_mean"].iloc[0], row[f"{m}_se"].iloc[0]) for m in metrics]
        lines.append(f"| `{model}` | " + " | ".join(cells) + " |")
    for name in refs["name"].drop_duplicates():
        cells = []
        for d in datasets:
            for m in metrics:
                hit = refs[(refs["name"] == name) & (refs["dataset"] == d) & (refs["metric"] == m)]
                cells.append("-" if hit.empty else _pm(float(hit["mean"].iloc[0]),
                                                       None if pd.isna(hit["se"].iloc[0]) else float(hit["se"].iloc[0])))
        if any(c != "-" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def write_doc(path: Path, summary: pd.DataFrame, meta: dict, notes: str, refs: pd.DataFrame) -> None:
    datasets = list(summary["dataset"].drop_duplicates())
    training, settings = meta["training"], meta["settings"]
    folds = ", ".join(f"{r.dataset}/{r.model}: {int(r.n_folds)}" for r in summary.itertuples())
    cpu = summary.groupby("dataset", sort=False)["cpu_seconds"].sum()
    n_models = summary["model"].nunique()
    time_line = ", ".join(f"{d.upper()} {cpu[d] / 60:.1f} min" for d in datasets)
    per_model = cpu.sum() / n_models / 60
    kwargs = "; ".join(f"`{m}`: {model_kwargs(m, settings)}" for m in summary["model"].drop_duplicates())
    extra = results_table(summary, refs, ("accuracy_val_threshold", "balanced_accuracy")) \
        if summary.get("accuracy_val_threshold_mean", pd.Series(dtype=float)).notna().any() else []
    text = f"""# MIL benchmarks: {", ".join(d.upper() for d in datasets)}

Multiple-instance benchmarks (MUSK1, FOX, TIGER: Dietterich et al. 1997; Andrews et al. 2002; files and
provenance in `../shared/data/README.md`), run through the same training code as the pipeline
(`slidemil.mil.train.train_bags`) for every registered MIL model. Written by `bench/mil_benchmarks.py`; rerun with:

```bash
{meta["command"]}
```

## Results

Mean ± standard error (std / √n) over the folds of the 10-fold cross-validation repeated 5 times (the
file's `{CV_MASKS}`, the published folds, as in Ilse et al. 2018). Accuracy thresholds the predicted
probability at 0.5. Published rows give what their sources report (`bench/mil_references.csv`).

{chr(10).join(results_table(summary, refs))}

Folds per row: {folds}.

Accuracy at the threshold chosen on each fold's validation bags (`slidemil.report.stats.validation_threshold`,
as the workflow report uses) and balanced accuracy at 0.5:

{chr(10).join(extra) or "(not recorded in this run)"}

### Against the published numbers

{chr(10).join(reference_comparison(summary, refs)) or "- (no model of this run has a published counterpart)"}

## Protocol

- Test folds: the file's (`{CV_MASKS}`; drawn stratified from the seed when absent); a bag's test fold is the
  one whose train mask leaves it out.
- Validation: {_validation_line(meta)}{_noise_line(meta)}
- Recipe: `{meta["preset"]}`{" with overrides " + json.dumps(meta["overrides"]) if meta.get("overrides") else ""}.
  Training (all models): {training}; class-weighted cross-entropy; cosine learning-rate schedule; CPU,
  one thread per process, seed {meta.get("seed", 0)}.
- Model settings: {kwargs}.
- MHIM-MIL models (`mhim_*`) start from their baseline trained first on the same split
  (the baseline's checkpoint is passed as `init_state`), as in the pipeline.

## Time

{meta["wall_s"] / 60:.1f} min wall clock with {meta["jobs"]} worker process(es) on a 2-core CPU box shared with other jobs
(so wall time says little). CPU time, which does not depend on the other jobs, summed over
the folds of all {n_models} model(s) per dataset: {time_line}; {per_model:.1f} CPU-minutes per model for the
whole table, so about {per_model / 2:.1f} min per model on 2 free cores with `--jobs 2`
(models with more parameters or a baseline to train first, e.g. `mhim_*`, take longer).

{NOTES_MARKER}
""" + (f"\n{notes}\n" if notes else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def kept_notes(path: Path) -> str:
    """The hand-written text below ``NOTES_MARKER`` in an existing doc ("" when there is none)."""
    text = path.read_text() if path.is_file() else ""
    return text.partition(NOTES_MARKER + "\n")[2].strip() if NOTES_MARKER in text else ""


def _noise_line(meta: dict) -> str:
    rate = meta.get("label_noise") or 0
    return (f"\n- Label noise (`--label-noise {rate}`): each training and validation bag's label flipped with "
            f"probability {rate}, the same bags in every model's run of a fold; test labels are the true ones."
            if rate else "")


def _validation_line(meta: dict) -> str:
    share = f"a label-stratified draw of {validation_fraction(10):.3f} of the training bags (the size of one fold)"
    if meta.get("refit"):
        return (f"none (`--refit`): every training bag trains, {share} included, for the recipe's fixed epochs "
                "(`selection: last`), the split `slidemil.mil.refit.refit_split` gives the deployed refit model. "
                "The test bags are predicted after every epoch but nothing is chosen on them; there is no "
                "validation threshold.")
    return (f"inside each training fold, {share}, seeded, held out for model selection (`training.selection`) "
            "and the accuracy threshold. This is `slidemil.cohort.splits.make_splits(..., "
            "Splits(fold_column=\"fold\"))`, the same rule the pipeline applies to a sample sheet with "
            "`splits.fold_column`. The test fold is used only for the final numbers.")


# --------------------------------------------------------------------------- main


def _parse(argv) -> argparse.Namespace:
    default_models = list_models()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", metavar="NPZ",
                    help="MIL .npz files in the documented layout (../shared/data/README.md); default: "
                         "--datasets from --data-dir")
    ap.add_argument("--data-dir", default=str(DATA_DIR))
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), help="names of .npz files in --data-dir")
    ap.add_argument("--models", nargs="+", default=default_models,
                    help=f"registered models (default: all: {' '.join(default_models)})")
    ap.add_argument("--preset", default=str(PRESET.relative_to(ROOT)),
                    help="YAML with mil.training and mil.settings (a workflow config file)")
    ap.add_argument("--training", type=json.loads, default={}, help="JSON overriding the preset's mil.training")
    ap.add_argument("--settings", type=json.loads, default={},
                    help='JSON overriding the preset\'s mil.settings, e.g. \'{"abmil": {"n_layers": 3}}\'')
    ap.add_argument("--references", default=str(REFERENCES.relative_to(ROOT)),
                    help="CSV of published numbers (name, metric, dataset, mean, se, model)")
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--first-repetition", type=int, default=0,
                    help="start at this repetition (the rest of a run whose first ones are done)")
    ap.add_argument("--max-folds", type=int, default=10, help="folds per repetition (fewer: a timing run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=TRAIN_PRECISIONS, default=None, help="overrides training.precision")
    ap.add_argument("--refit", action="store_true",
                    help="train on all training bags, validation share included (needs selection: last)")
    ap.add_argument("--label-noise", type=float, default=0.0, metavar="RATE",
                    help="flip each training and validation bag's label with this probability (seeded per fold; "
                         "test labels stay true): how model selection copes with labels the features do not show")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each)")
    ap.add_argument("--out", default=str(OUT.relative_to(ROOT)),
                    help="the doc; its summary, folds and run files go next to it")
    ap.add_argument("--notes", help="Markdown file whose text goes at the end of the doc, in place of the text "
                                    "an existing --out keeps below its notes marker")
    ap.add_argument("--rewrite-doc", action="store_true",
                    help="no training: rebuild the summary and the doc from the last run's files next to --out")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.models) - set(default_models))
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(default_models)}")
    if not 0 <= args.label_noise < 0.5:
        ap.error(f"--label-noise must be at least 0 and below 0.5, got {args.label_noise}")
    args.paths = args.data or [str(Path(args.data_dir) / f"{d}.npz") for d in args.datasets]
    missing = [p for p in args.paths if not Path(p).is_file()]
    if missing and not args.rewrite_doc:
        ap.error(f"{', '.join(missing)}: not found (--data, or --datasets in --data-dir)")
    return args


def _quoted(value) -> str:
    return "'" + json.dumps(value) + "'"


def _command(args) -> str:
    """The command line that reruns this run (the doc prints it)."""
    data = (f" --data {' '.join(args.data)}" if args.data else f" --datasets {' '.join(args.datasets)}")
    return ("PYTHONPATH=src OMP_NUM_THREADS=1 python bench/mil_benchmarks.py" + data
            + f" --models {' '.join(args.models)} --preset {args.preset}"
            + (f" --training {_quoted(args.training)}" if args.training else "")
            + (f" --settings {_quoted(args.settings)}" if args.settings else "")
            + f" --repetitions {args.repetitions} --jobs {args.jobs}"
            + (f" --first-repetition {args.first_repetition}" if args.first_repetition else "")
            + (f" --max-folds {args.max_folds}" if args.max_folds != 10 else "")
            + (f" --seed {args.seed}" if args.seed else "")
            + (f" --precision {args.precision}" if args.precision else "")
            + (" --refit" if args.refit else "")
            + (f" --label-noise {args.label_noise}" if args.label_noise else "")
            + (f" --out {args.out}" if Path(args.out).resolve() != OUT else ""))


def run_all(args, training: dict, settings: dict, folds_csv: Path, meta_json: Path) -> tuple[pd.DataFrame, dict]:
    # Repetition by repetition over all datasets, so an interrupted run still covers every dataset.
    tasks = [FoldTask(p, tuple(args.models), r, k, args.seed, training, settings, args.refit, args.label_noise)
             for r in range(args.first_repetition, args.repetitions)
             for p in args.paths for k in range(args.max_folds)]
    started = time.monotonic()
    base_meta = {"jobs": args.jobs, "command": _command(args), "preset": args.preset, "seed": args.seed,
                 "refit": args.refit, "label_noise": args.label_noise,
                 "overrides": {k: v for k, v in (("training", args.training), ("settings", args.settings)) if v},
                 "training": training, "settings": settings}
    rows = []
    # One job runs in this process (a debugger, the tests); more in worker processes of one thread each.
    with ProcessPoolExecutor(max_workers=args.jobs) if args.jobs > 1 else contextlib.nullcontext() as pool:
        for i, fold_rows in enumerate((pool.map(run_fold, tasks, chunksize=1) if pool else map(run_fold, tasks)), 1):
            rows += fold_rows
            if i % 10 == 0 or i == len(tasks):
                logger.info("%d/%d folds done (%.0f s)", i, len(tasks), time.monotonic() - started)
                # Kept as it grows: --rewrite-doc can report an interrupted run (with its fold counts).
                folds_csv.parent.mkdir(parents=True, exist_ok=True)
                pd.DataFrame(rows).to_csv(folds_csv, index=False)
                meta_json.write_text(json.dumps({**base_meta, "wall_s": time.monotonic() - started}, indent=2) + "\n")
    return pd.DataFrame(rows), {**base_meta, "wall_s": time.monotonic() - started}


def main(argv=None) -> None:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    folds_csv, meta_json = out.with_name(out.stem + "_folds.csv"), out.with_name(out.stem + "_run.json")
    notes = Path(args.notes).read_text().strip() if args.notes else kept_notes(out)
    refs = load_references(args.references)
    if args.rewrite_doc:
        folds, meta = pd.read_csv(folds_csv), json.loads(meta_json.read_text())
        if "training" not in meta:  # a run from before presets: it used the preset given now
            meta["preset"] = args.preset
            meta["training"], meta["settings"] = load_preset(args.preset, args.training, args.settings)
            meta_json.write_text(json.dumps(meta, indent=2) + "\n")  # the next rewrite needs no --preset
    else:
        training, settings = load_preset(args.preset, args.training, args.settings)
        if args.precision:
            training["precision"] = args.precision
        if args.refit and training.get("selection") != "last":
            sys.exit(f"--refit trains a fixed number of epochs: the recipe needs mil.training.selection: last, "
                     f"not {training.get('selection', 'the default')!r} (--training '{{\"selection\": \"last\"}}')")
        folds, meta = run_all(args, training, settings, folds_csv, meta_json)
        folds.to_csv(folds_csv, index=False)
        meta_json.write_text(json.dumps(meta, indent=2) + "\n")

    summary = summarize(folds)
    summary.to_csv(out.with_suffix(".csv"), index=False, float_format="%.4f")
    write_doc(out, summary, meta, notes, refs)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\n{len(folds)} fold runs in {meta['wall_s']:.0f} s with {meta['jobs']} job(s)")
    print(f"command: {meta['command']}")
    print(f"wrote {out}, {out.with_suffix('.csv')}, {folds_csv}, {meta_json}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
