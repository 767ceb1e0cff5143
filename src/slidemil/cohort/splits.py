"""Stage 3: patient-level, label-stratified splits.

One held-out test set of patients (drawn, or given by a sheet column), then k
train/validation folds over the remaining patients. Assignment is made per
patient and copied to the patient's slides, so no patient can sit in two
partitions of a fold by construction. Optional binarisation of a continuous
label uses quantiles of the non-test patients only (DeepSMILE, METHODS 3).

Predefined folds (``fold_column``, e.g. the published 10-fold CV of a MIL
benchmark): the column holds each patient's test fold 0..K-1 and split k tests
on fold k. Its validation set is a label-stratified draw from the other K-1
folds' patients, the size of one fold (1/(K-1) of them) but at most a quarter,
seeded by (seed, k); the rest is its training set.

Endpoints beyond binary (``endpoint``, the config's ``task``): a multiclass label becomes a class index
(``label``; the class name stays in ``label_value``), stratified by class; a regression target is the label,
stratified by its quantile bins; a survival patient's label is its event, stratified by event and time
quantile, with its follow-up time in a ``time`` column. Such a splits.csv says its task in a ``task`` column.

Unusable slides (``excluded``: slide_id -> reason, from the tile manifest, or the
feature manifest of precomputed features) never take a place in a fold: they
are ``excluded`` in every fold column and their reason is in the ``excluded``
column. Patients are drawn and stratified over those with a usable slide, so
an unusable slide cannot empty a test set.
"""

from __future__ import annotations

import argparse
import logging
import os

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split

from slidemil.files.tiles import read_tiles_attrs
from slidemil.files.splits import PARTITIONS, fold_column_name, fold_columns, write_splits_csv
from slidemil.logs import setup_logging
from slidemil.cohort.facts import NO_TILES, exclusion_reason
from slidemil.cohort.manifest import read_manifest_table
from slidemil.cohort.sheet import Endpoint, read_table
from slidemil.config import Config, Splits
from slidemil.names import BINARY, TASKS
from slidemil.tasks import class_order
from slidemil.errors import SplitError

logger = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "y", "test", "t"}
_FALSE = {"0", "false", "no", "n", "", "train", "f", "nan"}


def binary_labels(values: pd.Series, positive_class=None) -> pd.Series:
    """0/1 labels from a column that is already binary (0/1, booleans, or two class names)."""
    distinct = sorted(values.dropna().astype(str).unique())
    if positive_class is not None:
        pos = str(positive_class)
        if pos not in distinct or len(distinct) > 2:
            raise SplitError(f"label values {distinct}: expected two classes including positive_class {pos!r}")
        return (values.astype(str) == pos).astype(int)
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all() and set(numeric.unique()) <= {0, 1}:
        return numeric.astype(int)
    lowered = values.astype(str).str.lower()
    if set(lowered.unique()) <= {"true", "false"}:
        return (lowered == "true").astype(int)
    shown = ", ".join(distinct[:10]) + (" ..." if len(distinct) > 10 else "")
    raise SplitError(
        f"the label column is not binary (values: {shown}); use 0/1 labels, name the positive class "
        "(splits.positive_class), or binarise a continuous label (splits.binarize: median or tertiles)"
    )


def _test_flags(patients: pd.DataFrame, sheet: pd.DataFrame, column: str) -> pd.Series:
    if column not in sheet.columns:
        raise SplitError(f"splits.test_column {column!r} is not a column of the sample sheet")
    raw = sheet[column].astype(str).str.strip().str.lower()
    unknown = sorted(set(raw) - _TRUE - _FALSE)
    if unknown:
        raise SplitError(f"test column {column!r} has values {unknown}; use true/false (or 1/0, test/train)")
    flags = raw.isin(_TRUE).groupby(sheet["patient_id"]).agg(["min", "max"])
    mixed = flags.index[flags["min"] != flags["max"]].tolist()
    if mixed:
        raise SplitError(f"patients with slides both in and out of the test set ({column}): {mixed[:10]}")
    return flags["max"].reindex(patients.index)


def _strata(values: pd.Series, binarize: str | None) -> pd.Series:
    """Labels to stratify the test draw on; a continuous label is stratified by its quantile bins."""
    if binarize is None:
        return values
    bins = 2 if binarize == "median" else 3
    return pd.qcut(values.rank(method="first"), bins, labels=False)


def _binarize(values: pd.Series, reference: pd.Series, how: str) -> pd.Series:
    """0/1 (NaN = discarded) from a continuous value, thresholds from ``reference`` only."""
    if how == "median":
        return (values > reference.quantile(0.5)).astype(float)
    if how == "tertiles":
        low, high = reference.quantile(1 / 3), reference.quantile(2 / 3)
        out = pd.Series(np.nan, index=values.index)
        out[values <= low] = 0.0
        out[values > high] = 1.0
        return out
    raise SplitError(f"unknown binarize {how!r}; use median or tertiles")


def _usable_sheet(sheet: pd.DataFrame, excluded: dict[str, str] | None) -> pd.DataFrame:
    """The sheet's rows of usable slides; SplitError when none is left."""
    if not excluded:
        return sheet
    usable = sheet[~sheet["slide_id"].astype(str).isin(excluded)]
    if usable.empty:
        reasons = "; ".join(f"{s}: {r}" for s, r in list(excluded.items())[:3])
        raise SplitError(f"no usable slide: all {len(sheet)} slides of the sheet are excluded ({reasons}"
                         f"{' ...' if len(excluded) > 3 else ''}); see the tile manifest and QC pictures")
    return usable


def _with_excluded(splits: pd.DataFrame, sheet: pd.DataFrame, excluded: dict[str, str] | None,
                   endpoint: Endpoint | None = None) -> pd.DataFrame:
    """Add the unusable slides: ``excluded`` in every fold, their reason in the ``excluded`` column."""
    excluded = excluded or {}
    reasons = {str(s): excluded[str(s)] for s in sheet["slide_id"] if str(s) in excluded}
    rows = sheet.loc[sheet["slide_id"].astype(str).isin(reasons), ["slide_id", "patient_id"]]
    patients = splits.drop_duplicates("patient_id").set_index("patient_id")
    extra = rows.join(patients[[c for c in ("label", "time") if c in patients.columns]], on="patient_id")
    # A patient without a usable slide keeps the sheet's label value (a list: ints must not become floats).
    values, sheet_values = patients["label_value"].to_dict(), dict(zip(sheet["slide_id"], sheet["label"]))
    extra["label_value"] = [values.get(p, sheet_values[s]) for s, p in zip(rows["slide_id"], rows["patient_id"])]
    for column in fold_columns(splits):
        extra[column] = "excluded"
    out = pd.concat([splits.assign(excluded=""), extra.assign(excluded=[reasons[str(s)] for s in extra["slide_id"]])])
    # The sheet's order, so splits.csv reads like the sheet.
    order = {str(s): i for i, s in enumerate(sheet["slide_id"])}
    out = out.sort_values("slide_id", key=lambda c: c.astype(str).map(order), kind="stable")
    # A regression target stays a number; class indices and events are integers.
    out["label"] = out["label"].astype(float if endpoint is not None and endpoint.task == "regression" else "Int64")
    return out.reset_index(drop=True)


def make_splits(
    sheet: pd.DataFrame,
    settings: Splits = Splits(),
    seed: int = Config.seed,
    excluded: dict[str, str] | None = None,
    endpoint: Endpoint | None = None,
) -> pd.DataFrame:
    """Splits table: slide_id, patient_id, label (0/1), label_value, fold_0..fold_{k-1}, excluded (reason or "").

    ``settings``: the config's ``splits`` section; ``seed``: the config's seed, which draws every split.
    ``excluded``: unusable slides (slide_id -> reason); patients are drawn over the usable slides only.
    ``endpoint``: the task (default binary); see the module's docstring for what other tasks write.
    """
    if endpoint is not None and endpoint.task == "survival":
        sheet = sheet.assign(label=sheet[endpoint.event_column])  # a survival patient's label is its event
    usable = _usable_sheet(sheet, excluded)
    if settings.fold_column and excluded and settings.fold_column in sheet.columns:
        _check_predefined_folds_usable(sheet, usable, settings.fold_column)
    other_task = endpoint is not None and endpoint.task != BINARY
    if other_task:
        if settings.binarize or settings.positive_class is not None:
            raise SplitError(f"binarize and positive_class make two classes; task {endpoint.task} takes neither")
        splits = _draw_task_splits(usable, endpoint, settings, seed)
        splits = _with_excluded(splits, sheet, excluded, endpoint)
    else:
        splits = _draw_splits(usable, settings, seed)
        splits = _with_excluded(splits, sheet, excluded)
    check_splits(splits)
    test_expected = bool(settings.test_column or settings.fold_column or settings.test_fraction > 0)
    _check_folds_usable(splits, excluded or {}, test_expected)
    # Binary splits.csv stays as it was (no task column): files of earlier runs read the same.
    return splits.assign(task=endpoint.task) if other_task else splits


def _check_predefined_folds_usable(sheet: pd.DataFrame, usable: pd.DataFrame, column: str) -> None:
    """One line when every slide of a predefined fold is unusable (its split would have no test set)."""
    folds = pd.to_numeric(sheet[column], errors="coerce")
    empty = sorted(set(folds.dropna()) - set(pd.to_numeric(usable[column], errors="coerce").dropna()))
    if empty:
        n = int((folds == empty[0]).sum())
        raise SplitError(f"no usable slide in the test set of fold {int(empty[0])}: its {n} slide(s) in {column!r} "
                         "are all excluded as unusable; add usable slides to that fold")


def _check_folds_usable(splits: pd.DataFrame, excluded: dict[str, str], test_expected: bool) -> None:
    """One line when a fold has no usable slide in a partition that training or testing needs."""
    for column in fold_columns(splits):
        for part in ("train", "val", "test") if test_expected else ("train", "val"):
            if not (splits[column] == part).any():
                why = f"{len(excluded)} slide(s) are excluded as unusable" if excluded else "too few patients"
                raise SplitError(f"no usable slide in the {part} set of fold {column.split('_')[1]}: {why}; "
                                 "add usable slides or ask for fewer folds")


def _draw_splits(sheet: pd.DataFrame, settings: Splits, seed: int) -> pd.DataFrame:
    """Splits of the usable slides: slide_id, patient_id, label (0/1), label_value, fold_0..fold_{k-1}."""
    if settings.fold_column:
        return _predefined_splits(sheet, settings, seed)
    folds, binarize, test_column = settings.folds, settings.binarize, settings.test_column
    if folds < 2:
        raise SplitError("splits.folds must be at least 2 (each fold needs a validation set)")
    patients = sheet.groupby("patient_id", sort=True)["label"].first().to_frame("label_value")
    if binarize is None:
        patients["label"] = binary_labels(patients["label_value"], settings.positive_class).astype(float)
    else:
        numeric = pd.to_numeric(patients["label_value"], errors="coerce")
        if numeric.isna().any():
            raise SplitError(f"binarize={binarize!r} needs a numeric label; non-numeric for patients "
                             f"{numeric.index[numeric.isna()].tolist()[:10]}")
        patients["label_value"] = numeric

    drawn = not test_column and settings.test_fraction > 0
    strata = _strata(patients["label" if binarize is None else "label_value"], binarize) if drawn else None
    patients["test"] = _test_patients(patients, sheet, test_column, settings.test_fraction, seed, strata)

    if binarize is not None:
        reference = patients.loc[~patients["test"], "label_value"]
        patients["label"] = _binarize(patients["label_value"], reference, binarize)
        logger.info("binarised label by %s on %d non-test patients", binarize, len(reference))

    dev = patients[~patients["test"] & patients["label"].notna()]
    counts = dev["label"].value_counts()
    if len(counts) < 2 or counts.min() < folds:
        raise SplitError(f"{folds} stratified folds need at least {folds} training patients of each class; "
                         f"have {counts.to_dict()} outside the test set")
    table = _cv_folds(patients, dev, "label", folds, seed, patients["test"] & patients["label"].notna())

    out = sheet[["slide_id", "patient_id"]].merge(
        patients[["label", "label_value"]].join(table), left_on="patient_id", right_index=True, how="left")
    out["label"] = out["label"].astype("Int64")
    return out.reset_index(drop=True)


def _task_patients(sheet: pd.DataFrame, endpoint: Endpoint, n_folds: int) -> pd.DataFrame:
    """One row per patient: label_value (the sheet's), label (the task's), strata (what the draws balance),
    and time for survival."""
    if endpoint.task == "survival":
        first = sheet.groupby("patient_id", sort=True)[[endpoint.time_column, endpoint.event_column]].first()
        patients = pd.DataFrame({"label_value": first[endpoint.event_column]}, index=first.index)
        patients["label"] = pd.to_numeric(first[endpoint.event_column]).astype(float)
        patients["time"] = pd.to_numeric(first[endpoint.time_column]).astype(float)
        # Event x time half (within each event group, when it is big enough): censored patients and early events
        # must not pile up in one partition.
        bins = patients.groupby("label")["time"].transform(lambda t: _quantile_bins(t, 2, n_folds * 2))
        patients["strata"] = patients["label"].astype(int) * 10 + bins
        return patients
    patients = sheet.groupby("patient_id", sort=True)["label"].first().to_frame("label_value")
    if endpoint.task == "regression":
        patients["label"] = pd.to_numeric(patients["label_value"]).astype(float)
        patients["strata"] = _quantile_bins(patients["label"], 4, n_folds * 2)
        return patients
    index = {name: k for k, name in enumerate(class_order(patients["label_value"]))}
    patients["label_value"] = patients["label_value"].astype(str)  # the class name, as the checkpoint records it
    patients["label"] = patients["label_value"].map(index).astype(float)
    patients["strata"] = patients["label"]
    return patients


def _quantile_bins(values: pd.Series, n_bins: int, min_size: int) -> pd.Series:
    """Quantile bin (0..) of each value, with as many bins (at most ``n_bins``) as leave ``min_size`` in each."""
    for bins in range(n_bins, 1, -1):
        if len(values) >= bins * min_size:
            return pd.qcut(values.rank(method="first"), bins, labels=False).astype(int)
    return pd.Series(0, index=values.index)


def _draw_task_splits(sheet: pd.DataFrame, endpoint: Endpoint, settings: Splits, seed: int) -> pd.DataFrame:
    """``_draw_splits`` for a multiclass, survival or regression task: the same draws, balanced on ``strata``."""
    if settings.fold_column:
        patients = _task_patients(sheet, endpoint, int(patient_folds(sheet, settings.fold_column).max()))
        return _predefined_table(sheet, patients, settings.fold_column, seed)
    folds = settings.folds
    if folds < 2:
        raise SplitError("splits.folds must be at least 2 (each fold needs a validation set)")
    patients = _task_patients(sheet, endpoint, folds)
    patients["test"] = _test_patients(patients, sheet, settings.test_column, settings.test_fraction, seed,
                                      patients["strata"], f" (by {_strata_words(endpoint)})")
    dev = patients[~patients["test"]]
    if endpoint.task == "multiclass":
        counts = dev["label"].value_counts()
        if counts.min() < folds or len(counts) < patients["label"].nunique():
            raise SplitError(f"{folds} stratified folds need at least {folds} training patients of each class; "
                             f"have {counts.to_dict()} outside the test set")
    elif len(dev) < 2 * folds:
        raise SplitError(f"{folds} folds need at least {2 * folds} patients outside the test set; have {len(dev)}")
    return _patient_table(sheet, patients, _cv_folds(patients, dev, "strata", folds, seed, patients["test"]))


def _cv_folds(patients: pd.DataFrame, dev: pd.DataFrame, by: str, folds: int, seed: int,
              test: pd.Series) -> pd.DataFrame:
    """fold_k columns: ``dev`` patients in k stratified (on ``by``) train/val folds, ``test`` ones in every test set,
    the rest excluded."""
    kfold = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    table = pd.DataFrame(index=patients.index)
    for k, (_, val_idx) in enumerate(kfold.split(dev.index, dev[by])):
        col = pd.Series("excluded", index=patients.index)
        col[dev.index] = "train"
        col[dev.index[val_idx]] = "val"
        col[patients.index[test]] = "test"
        table[fold_column_name(k)] = col
    return table


def _test_patients(patients: pd.DataFrame, sheet: pd.DataFrame, test_column: str | None, test_fraction: float,
                   seed: int, strata: pd.Series | None, by: str = "") -> pd.Series | np.ndarray:
    """Which patients are held out: the sheet's test column, or a draw of ``test_fraction`` balanced on ``strata``."""
    if test_column:
        return _test_flags(patients, sheet, test_column)
    if test_fraction <= 0:
        return np.zeros(len(patients), dtype=bool)
    try:
        _, test_ids = train_test_split(patients.index.to_numpy(), test_size=test_fraction,
                                       stratify=strata.to_numpy(), random_state=seed)
    except ValueError as err:
        raise SplitError(f"cannot draw a stratified test set of {test_fraction:.0%} of "
                         f"{len(patients)} patients{by}: {err}") from err
    return patients.index.isin(test_ids)


def _strata_words(endpoint: Endpoint) -> str:
    return {"multiclass": "class", "survival": "event and time", "regression": "target quantile"}[endpoint.task]


def _patient_table(sheet: pd.DataFrame, patients: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Each slide with its patient's label columns and partitions."""
    columns = [c for c in ("label", "label_value", "time") if c in patients.columns]
    return sheet[["slide_id", "patient_id"]].merge(
        patients[columns].join(table), left_on="patient_id", right_index=True, how="left").reset_index(drop=True)


def validation_fraction(n_folds: int) -> float:
    """Share of a predefined split's non-test patients held out for validation: one fold's worth, at most 1/4."""
    return 1.0 / max(n_folds - 1, 4)


def patient_folds(sheet: pd.DataFrame, column: str) -> pd.Series:
    """Each patient's predefined test fold (0..K-1, all present) from the sheet column ``column``."""
    if column not in sheet.columns:
        raise SplitError(f"splits.fold_column {column!r} is not a column of the sample sheet")
    values = pd.to_numeric(sheet[column], errors="coerce")
    bad = sheet.loc[values.isna() | (values != values.round()), column]
    if len(bad):
        raise SplitError(f"fold column {column!r} must hold integer fold numbers; found {sorted(map(str, set(bad)))[:10]}")
    per_patient = values.astype(int).groupby(sheet["patient_id"]).agg(["min", "max"])
    mixed = per_patient.index[per_patient["min"] != per_patient["max"]].tolist()
    if mixed:
        raise SplitError(f"patients with slides in two folds of {column!r}: {mixed[:10]}")
    folds = per_patient["min"]
    expected = list(range(folds.max() + 1))
    if folds.min() < 0 or sorted(folds.unique()) != expected or len(expected) < 2:
        raise SplitError(f"fold column {column!r} must number at least 2 folds 0..K-1 with none empty; "
                         f"found {sorted(folds.unique().tolist())}")
    return folds


def _predefined_splits(sheet: pd.DataFrame, settings: Splits, seed: int) -> pd.DataFrame:
    if settings.test_column or settings.binarize:
        # A predefined fold is the test set; a drawn/flagged test set or labels binarised with
        # quantiles of all patients (which include each split's test patients) would contradict it.
        raise SplitError("splits.fold_column cannot be combined with splits.test_column or splits.binarize")
    patients = sheet.groupby("patient_id", sort=True)["label"].first().to_frame("label_value")
    patients["label"] = binary_labels(patients["label_value"], settings.positive_class).astype(float)
    out = _predefined_table(sheet, patients.assign(strata=patients["label"]), settings.fold_column, seed)
    out["label"] = out["label"].astype("Int64")
    return out


def _predefined_table(sheet: pd.DataFrame, patients: pd.DataFrame, column: str, seed: int) -> pd.DataFrame:
    """Split k tests on fold k and validates on a draw from the other folds, balanced on ``strata``."""
    folds = patient_folds(sheet, column)
    n_folds = int(folds.max()) + 1
    table = pd.DataFrame(index=patients.index)
    for k in range(n_folds):
        rest = patients.index[folds != k]
        # One generator per split, from the seed and the split, so splits do not depend on each other.
        rng = np.random.RandomState(np.random.SeedSequence([seed, k]).generate_state(1)[0])
        try:
            _, val_ids = train_test_split(rest.to_numpy(), test_size=validation_fraction(n_folds),
                                          stratify=patients.loc[rest, "strata"].to_numpy(), random_state=rng)
        except ValueError as err:
            raise SplitError(f"fold {k} of {column!r}: cannot draw a stratified validation set from "
                             f"{len(rest)} patients: {err}") from err
        col = pd.Series("train", index=patients.index)
        col[val_ids] = "val"
        col[folds.index[folds == k]] = "test"
        table[fold_column_name(k)] = col
    out = _patient_table(sheet, patients, table)
    for k in range(n_folds):
        counts = out.drop_duplicates("patient_id")[fold_column_name(k)].value_counts().to_dict()
        logger.info("predefined fold %d: %s", k, counts)
    return out


def check_splits(splits: pd.DataFrame) -> None:
    """Raise if any patient appears in two partitions of a fold, or a partition value is unknown."""
    for col in fold_columns(splits):
        bad = set(splits[col]) - set(PARTITIONS)
        if bad:
            raise SplitError(f"{col}: unknown partition value(s) {sorted(bad)}")
        # An unusable slide is excluded while its patient's other slides train or test.
        used = splits[splits[col] != "excluded"]
        per_patient = used.groupby("patient_id")[col].nunique()
        leaked = per_patient.index[per_patient > 1].tolist()
        if leaked:
            raise SplitError(f"{col}: patients in two partitions: {leaked[:10]}")


def summarize(splits: pd.DataFrame) -> pd.DataFrame:
    """Patients per partition and class for each fold."""
    rows = []
    for col in fold_columns(splits):
        pts = splits.drop_duplicates("patient_id")
        for part, grp in pts.groupby(col):
            rows.append({"fold": col, "partition": part, "patients": len(grp),
                         "positive": int((grp["label"] == 1).sum()), "slides": int((splits[col] == part).sum())})
    return pd.DataFrame(rows)


def unusable_slides(manifest_csv: str | os.PathLike | None) -> dict[str, str]:
    """slide_id -> why it cannot be used, from a tile or feature manifest (none listed: n_tiles 0)."""
    if not manifest_csv:
        return {}
    table = read_manifest_table(manifest_csv)
    if "excluded" in table.columns:
        return {s: r for s, r in zip(table["slide_id"], table["excluded"]) if r}
    # A tile manifest from before it had the column: the reason is in the files of the slides without tiles.
    empty = table[table["n_tiles"].fillna(0) == 0]
    return {s: _tiles_reason(p) for s, p in zip(empty["slide_id"], empty["path"])}


def _tiles_reason(path: str) -> str:
    if not os.path.isfile(path):
        return NO_TILES
    n, attrs = read_tiles_attrs(path)
    return exclusion_reason(n, attrs)


def write_splits(sheet_path: str, out_csv: str, manifest: str | None = None, task: str = BINARY,
                 seed: int = Config.seed, **splits) -> pd.DataFrame:
    """Splits of the sheet's patients over the slides ``manifest`` (a tile or feature manifest) says are usable.

    ``splits``: settings of the config's ``splits`` section (the rule's params), the rest their defaults."""
    settings = Splits(**splits)
    sheet = read_table(sheet_path)
    excluded = unusable_slides(manifest)
    if excluded:
        logger.info("%d slide(s) excluded from the splits as unusable (%s)", len(excluded), manifest)
    endpoint = None
    if task != BINARY:
        endpoint = Endpoint(task, settings.folds, settings.time_column, settings.event_column)
    splits = make_splits(sheet, settings, seed, excluded=excluded, endpoint=endpoint)
    write_splits_csv(out_csv, splits)
    logger.info("splits written to %s\n%s", out_csv, summarize(splits).to_string(index=False))
    return splits


def main(argv=None, prog: str = "python -m slidemil.cohort.splits") -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sheet", help="sample sheet (CSV/TSV) with slide_id, patient_id, label")
    ap.add_argument("--out", required=True)
    ap.add_argument("--folds", type=int, default=Splits.folds)
    ap.add_argument("--test-fraction", type=float, default=Splits.test_fraction)
    ap.add_argument("--seed", type=int, default=Config.seed)
    ap.add_argument("--test-column")
    ap.add_argument("--binarize", choices=[c for c in Splits.__dataclass_fields__["binarize"].metadata["choices"] if c])
    ap.add_argument("--positive-class")
    ap.add_argument("--fold-column", help="sheet column of predefined test folds 0..K-1 (replaces --folds/--test-*)")
    ap.add_argument("--manifest", help="tile (or feature) manifest: its unusable slides take no place in any fold")
    ap.add_argument("--task", choices=TASKS, default=BINARY, help="the endpoint (default binary)")
    ap.add_argument("--time-column", default=Splits.time_column, help="survival: the sheet's follow-up time")
    ap.add_argument("--event-column", default=Splits.event_column, help="survival: the sheet's event (1/0)")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        write_splits(args.sheet, args.out, folds=args.folds, test_fraction=args.test_fraction, seed=args.seed,
                     test_column=args.test_column, binarize=args.binarize, positive_class=args.positive_class,
                     fold_column=args.fold_column, manifest=args.manifest, task=args.task,
                     time_column=args.time_column, event_column=args.event_column)
    except SplitError as err:
        raise SystemExit(f"error: {err}")


if __name__ == "__main__":
    main()
