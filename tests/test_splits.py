import numpy as np
import pandas as pd
import pytest

from slidemil.cohort.splits import SplitError, binary_labels, check_splits, fold_columns, make_splits
from slidemil.config import Splits


def _sheet(n_patients=40, seed=0, continuous=False):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = float(rng.normal()) if continuous else int(p % 3 == 0)
        for s in range(1 + int(rng.random() < 0.4)):
            rows.append({"slide_id": f"P{p:03d}-S{s}", "patient_id": f"P{p:03d}", "label": label})
    return pd.DataFrame(rows)


def test_no_patient_in_two_partitions_and_test_set_fixed():
    splits = make_splits(_sheet(), Splits(folds=5, test_fraction=0.25), seed=3)
    cols = fold_columns(splits)
    assert cols == [f"fold_{k}" for k in range(5)]
    for col in cols:
        assert splits.groupby("patient_id")[col].nunique().max() == 1
    test_sets = {frozenset(splits.loc[splits[c] == "test", "patient_id"]) for c in cols}
    assert len(test_sets) == 1                              # one held-out test set shared by all folds
    patients = splits.drop_duplicates("patient_id")
    assert len(next(iter(test_sets))) == round(0.25 * len(patients))
    # Validation sets partition the non-test patients across folds.
    vals = [set(patients.loc[patients[c] == "val", "patient_id"]) for c in cols]
    assert sum(map(len, vals)) == len(set().union(*vals)) == (patients["fold_0"] != "test").sum()


def test_stratified_by_label():
    splits = make_splits(_sheet(60), Splits(folds=3), seed=0)
    patients = splits.drop_duplicates("patient_id")
    overall = patients["label"].mean()
    for col in fold_columns(splits):
        for part in ("train", "val", "test"):
            frac = patients.loc[patients[col] == part, "label"].mean()
            assert abs(frac - overall) < 0.12, (col, part, frac)


def test_deterministic_and_seed_dependent():
    a = make_splits(_sheet(), seed=1)
    b = make_splits(_sheet(), seed=1)
    c = make_splits(_sheet(), seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_check_splits_catches_leak():
    splits = make_splits(_sheet(), seed=0)
    two = splits[splits.duplicated("patient_id", keep=False)].index[:2]
    splits.loc[two[0], "fold_0"] = "train"
    splits.loc[two[1], "fold_0"] = "test"
    with pytest.raises(SplitError, match="two partitions"):
        check_splits(splits)


def test_test_column():
    sheet = _sheet()
    test_patients = sheet["patient_id"].unique()[:6]
    sheet["is_test"] = sheet["patient_id"].isin(test_patients).map({True: "yes", False: "no"})
    splits = make_splits(sheet, Splits(test_column="is_test", folds=3))
    assert set(splits.loc[splits["fold_0"] == "test", "patient_id"]) == set(test_patients)
    sheet.loc[sheet.index[sheet["patient_id"] == test_patients[0]][:1], "is_test"] = "no"
    if (sheet["patient_id"] == test_patients[0]).sum() > 1:
        with pytest.raises(SplitError, match="both in and out"):
            make_splits(sheet, Splits(test_column="is_test", folds=3))


@pytest.mark.parametrize("how", ["median", "tertiles"])
def test_binarize_uses_non_test_quantiles(how):
    sheet = _sheet(60, continuous=True)
    splits = make_splits(sheet, Splits(binarize=how, folds=3), seed=0)
    patients = splits.drop_duplicates("patient_id")
    dev = patients[patients["fold_0"].isin(["train", "val"]) | (patients["fold_0"] == "excluded")]
    ref = dev["label_value"]
    if how == "median":
        assert (patients["label"] == (patients["label_value"] > ref.quantile(0.5)).astype(int)).all()
    else:
        lo, hi = ref.quantile(1 / 3), ref.quantile(2 / 3)
        labelled = patients["label"].notna()
        assert (patients.loc[labelled & (patients["label"] == 1), "label_value"] > hi).all()
        assert (patients.loc[labelled & (patients["label"] == 0), "label_value"] <= lo).all()
        middle = patients[(patients["label_value"] > lo) & (patients["label_value"] <= hi)]
        assert (middle[fold_columns(splits)] == "excluded").all().all()


def test_labels():
    assert binary_labels(pd.Series(["tumor", "normal", "tumor"]), "tumor").tolist() == [1, 0, 1]
    assert binary_labels(pd.Series([True, False])).tolist() == [1, 0]
    with pytest.raises(SplitError, match="not binary"):
        binary_labels(pd.Series([0, 1, 2]))
    with pytest.raises(SplitError, match="not binary"):
        make_splits(_sheet(continuous=True))


def test_too_few_patients():
    with pytest.raises(SplitError, match="at least 5"):
        make_splits(_sheet(8), Splits(folds=5))
