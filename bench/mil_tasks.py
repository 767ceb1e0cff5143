"""Endpoints beyond binary, measured: a real 3-class task and a planted regression, every chosen MIL model next to
a simple baseline trained on the same folds in the same run.

- ``multiclass``: FOX and TIGER (``../shared/data/mil``, the same 230-d Corel image features) as one 3-class task:
  FOX positive bags are ``fox``, TIGER positive bags ``tiger``, the negative bags of both (other animals)
  ``other`` (100 / 100 / 200 bags). Repeated stratified 5-fold CV (``--repetitions``); within each training
  part a class-stratified quarter is held out for early stopping (``slidemil.cohort.splits`` with predefined
  folds, as the pipeline does). Metric: macro one-vs-rest AUC on the test fold. Baseline: mean-pooled features,
  standardised, multinomial logistic regression (scikit-learn) fitted on the same training + validation bags.
- ``regression``: 300 synthetic bags (15-40 instances of 32-d Gaussian noise) whose target y ~ U(0, 4) shifts 4
  instances by y along one axis; the same CV (stratified by target quartile). Metrics: Pearson r and R².
  Baseline: mean-pooled features + ridge regression.

Training runs in-process through ``slidemil.mil.train.train_bags`` (the pipeline's training code). Writes a
Markdown table (stdout, and ``--out``) and every fold's row (``--folds-csv``).

    OMP_NUM_THREADS=1 python bench/mil_tasks.py --task multiclass --repetitions 2 --models abmil meanpool mhim_abmil
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.linear_model import LogisticRegression, Ridge  # noqa: E402
from sklearn.model_selection import RepeatedStratifiedKFold  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from slidemil.cohort.sheet import Endpoint  # noqa: E402
from slidemil.cohort.splits import make_splits  # noqa: E402
from slidemil.config import Splits  # noqa: E402
from slidemil.features.byof import bag_ids, load_mil_npz  # noqa: E402
from slidemil.files.splits import split_task  # noqa: E402
from slidemil.mil.models import model_kwargs_defaults  # noqa: E402
from slidemil.mil.train import Recipe, checkpoint, train_bags  # noqa: E402
from slidemil.names import base_model  # noqa: E402
from slidemil.tasks import make_task  # noqa: E402

# As bench/mil_benchmarks.py (Ilse et al.'s optimiser; minibatches of 8 padded bags), chosen once, not tuned here.
TRAINING = {"epochs": 60, "patience": 10, "lr": 5e-4, "weight_decay": 5e-4, "batch_size": 8, "standardize": True}
MODEL_PRESET = {"embed_dim": 128, "attn_dim": 64, "dropout": 0.25}
BASELINE = "mean-pool + linear"


def model_kwargs(name: str) -> dict:
    kwargs = {k: v for k, v in MODEL_PRESET.items() if k in model_kwargs_defaults(name)}
    if base_model(name):
        kwargs["base_kwargs"] = model_kwargs(base_model(name))
    return kwargs


def fox_tiger(data_dir: Path) -> tuple[dict, pd.DataFrame]:
    """Bags and a sheet (slide_id, patient_id, label: fox / tiger / other) of FOX and TIGER together."""
    bags, rows = {}, []
    for name in ("fox", "tiger"):
        arrays = load_mil_npz(data_dir / f"{name}.npz")
        feats = arrays["features"].astype(np.float32)
        for i, bag in enumerate(bag_ids(len(arrays["bag_labels"]))):
            slide = f"{name}_{bag}"
            bags[slide] = torch.from_numpy(feats[arrays["bag_index"] == i])
            rows.append({"slide_id": slide, "patient_id": slide, "label": name if arrays["bag_labels"][i] else "other"})
    return bags, pd.DataFrame(rows)


def planted_regression(n_bags: int = 300, dim: int = 32, seed: int = 0) -> tuple[dict, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    bags, rows = {}, []
    for b in range(n_bags):
        y = float(rng.uniform(0, 4))
        feats = rng.normal(size=(int(rng.integers(15, 41)), dim)).astype(np.float32)
        feats[rng.choice(len(feats), size=4, replace=False), 0] += y
        bags[f"b{b:03d}"] = torch.from_numpy(feats)
        rows.append({"slide_id": f"b{b:03d}", "patient_id": f"b{b:03d}", "label": round(y, 4)})
    return bags, pd.DataFrame(rows)


def fold_splits(sheet: pd.DataFrame, task: str, strata: np.ndarray, repetitions: int, seed: int):
    """(repetition, fold, split) of a repeated stratified 5-fold CV; the validation part drawn per split."""
    cv = RepeatedStratifiedKFold(n_splits=5, n_repeats=repetitions, random_state=seed)
    folds = np.zeros(len(sheet), int)
    for k, (_, test) in enumerate(cv.split(sheet, strata)):
        folds[test] = k % 5
        if k % 5 == 4:
            splits = make_splits(sheet.assign(fold=folds), Splits(fold_column="fold"), seed=seed + k,
                                 endpoint=Endpoint(task))
            for f in range(5):
                yield k // 5, f, splits


def baseline(task, bags: dict, split: pd.DataFrame) -> dict:
    """Mean-pooled features + a linear model fitted on the training and validation bags, scored on the test ones."""
    x = np.stack([bags[s].mean(0).numpy() for s in split["slide_id"]])
    fit = split["partition"] != "test"
    linear = LogisticRegression(max_iter=2000) if task.name == "multiclass" else Ridge(alpha=1.0)
    model = make_pipeline(StandardScaler(), linear).fit(x[fit], split.loc[fit, "label"])
    test = split[~fit].copy()
    if task.name == "multiclass":
        probs = model.predict_proba(x[~fit])
        test[task.output_columns] = probs[:, np.argsort(model.classes_)]
    else:
        test["pred"] = model.predict(x[~fit])
    return task.metrics(test)


def run(task_name: str, bags: dict, sheet: pd.DataFrame, models: list[str], repetitions: int,
        seed: int, first_repetition: int = 0) -> pd.DataFrame:
    strata = (sheet["label"] if task_name == "multiclass" else pd.qcut(sheet["label"], 4, labels=False)).to_numpy()
    rows = []
    for repetition, fold, splits in fold_splits(sheet, task_name, strata, repetitions, seed):
        if repetition < first_repetition:  # drawn all the same, so later repetitions get their own folds
            continue
        name, classes = split_task(splits)
        split = splits.rename(columns={f"fold_{fold}": "partition"})[["slide_id", "patient_id", "label", "partition"]]
        rows.append({"model": BASELINE, "repetition": repetition, "fold": fold, "seconds": 0.0,
                     **baseline(make_task(name, classes), bags, split)})
        trained = {}
        for model in models:
            started = time.monotonic()
            base, init = base_model(model), None
            if base:
                if base not in trained:
                    trained[base] = train_bags(bags, split, Recipe(base, model_kwargs(base), TRAINING, seed), "cpu",
                                               task=make_task(name, classes))
                init = checkpoint(trained[base], fold)
            result = train_bags(bags, split, Recipe(model, model_kwargs(model), TRAINING, seed), "cpu",
                                init_state=init, task=make_task(name, classes))
            trained.setdefault(model, result)
            patients = result.task.patients(result.slides)
            rows.append({"model": model, "repetition": repetition, "fold": fold,
                         "seconds": round(time.monotonic() - started, 1),
                         **result.task.metrics(patients[patients["partition"] == "test"])})
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def table(folds: pd.DataFrame, metrics: list[str]) -> str:
    lines = ["| model | folds | " + " | ".join(metrics) + " | seconds per fold |",
             "|---|---|" + "---|" * (len(metrics) + 1)]
    for model, group in folds.groupby("model", sort=False):
        cells = [f"{group[m].mean():.3f} ± {group[m].std(ddof=1) / np.sqrt(len(group)):.3f}" for m in metrics]
        lines.append(f"| `{model}` | {len(group)} | " + " | ".join(cells) + f" | {group['seconds'].mean():.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=("multiclass", "regression"), default="multiclass")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mil"))
    ap.add_argument("--models", nargs="+", default=["abmil", "meanpool", "mhim_abmil"])
    ap.add_argument("--repetitions", type=int, default=2)
    ap.add_argument("--first-repetition", type=int, default=0,
                    help="start at this repetition (the rest of a run whose first ones are done)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the Markdown table here too")
    ap.add_argument("--folds-csv", help="write every fold's metrics here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    started = time.monotonic()
    if args.task == "multiclass":
        bags, sheet = fox_tiger(Path(args.data_dir))
        metrics = ["macro_auc", "balanced_accuracy", "auc_fox", "auc_other", "auc_tiger"]
    else:
        bags, sheet = planted_regression(seed=args.seed)
        metrics = ["pearson_r", "r2", "mae"]
    folds = run(args.task, bags, sheet, args.models, args.repetitions, args.seed, args.first_repetition)
    text = (f"{args.task}: {len(sheet)} bags, {args.repetitions} x 5-fold stratified CV, mean ± s.e. over folds, "
            f"{time.monotonic() - started:.0f} s\n\n" + table(folds, metrics))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.folds_csv:
        folds.to_csv(args.folds_csv, index=False)


if __name__ == "__main__":
    main()
