"""Bring your own features: importing CLAM/TRIDENT/.pt files, MIL benchmark .npz cohorts, predefined folds."""

import hashlib
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from slidemil.features.byof import FeatureFileError, import_features, load_mil_npz, npz_to_cohort
from slidemil.cohort.splits import SplitError, fold_columns, make_splits, validation_fraction
from slidemil.config import Splits
from slidemil.files.splits import read_fold
from slidemil.mil.train import load_bags
from factories import SHARED_DATA, snakemake_cli


def _h5(path, datasets, attrs=None):
    with h5py.File(path, "w") as f:
        for name, data in datasets.items():
            f.create_dataset(name, data=data)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
    return path


def _read(path):
    with h5py.File(path) as f:
        return f["features"][()], f["coords"][()], dict(f.attrs)


@pytest.fixture
def feats():
    return np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)


# --------------------------------------------------------------------------- import_features


def test_clam_h5_2d(tmp_path, feats):
    coords = np.arange(14).reshape(7, 2) * 256
    src = _h5(tmp_path / "clam.h5", {"features": feats, "coords": coords})
    info = import_features(src, tmp_path / "out.h5", extractor="uni")
    out, out_coords, attrs = _read(tmp_path / "out.h5")
    np.testing.assert_array_equal(out, feats)
    np.testing.assert_array_equal(out_coords, coords)
    assert out.dtype == np.float32 and out_coords.dtype == np.int64
    assert attrs["extractor"] == "uni" and attrs["excluded"] == ""
    assert attrs["weights_digest"] == hashlib.sha256(src.read_bytes()).hexdigest()[:16] == info["digest"]
    assert attrs["source"] == str(src.resolve())
    assert info["n_tiles"] == 7 and info["dim"] == 5


def test_trident_3d_float16_and_own_name(tmp_path, feats):
    src = _h5(tmp_path / "t.h5", {"features": feats[None].astype(np.float16), "coords": np.zeros((1, 7, 2), int)},
              {"encoder": "conch_v15"})
    import_features(src, tmp_path / "out.h5")
    out, coords, attrs = _read(tmp_path / "out.h5")
    assert out.shape == (7, 5) and out.dtype == np.float16       # half precision stays half
    assert coords.shape == (7, 2)
    assert attrs["extractor"] == "conch_v15"


def test_features_in_a_group(tmp_path, feats):
    src = tmp_path / "g.h5"
    with h5py.File(src, "w") as f:
        f.create_group("features").create_dataset("uni_v1", data=feats)
        f.create_dataset("coords", data=np.ones((7, 2), int))
    import_features(src, tmp_path / "out.h5")
    np.testing.assert_array_equal(_read(tmp_path / "out.h5")[0], feats)


def test_missing_coords_warns_and_fills(tmp_path, feats, caplog):
    src = _h5(tmp_path / "nocoords.h5", {"features": feats})
    import_features(src, tmp_path / "out.h5")
    _, coords, _ = _read(tmp_path / "out.h5")
    assert coords.shape == (7, 2) and (coords == -1).all()
    assert "no coords" in caplog.text


def test_pt_tensor(tmp_path, feats):
    src = tmp_path / "slide.pt"
    torch.save(torch.from_numpy(feats), src)
    import_features(src, tmp_path / "out.h5", extractor="resnet50_trunc")
    out, coords, attrs = _read(tmp_path / "out.h5")
    np.testing.assert_array_equal(out, feats)
    assert (coords == -1).all() and attrs["extractor"] == "resnet50_trunc"


def test_pt_refuses_pickled_code(tmp_path):
    src = tmp_path / "evil.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, src)     # a module needs unpickling code: weights_only refuses
    with pytest.raises(FeatureFileError, match="evil.pt"):
        import_features(src, tmp_path / "out.h5")


def test_own_format_roundtrip_keeps_excluded(tmp_path):
    src = _h5(tmp_path / "ours.h5", {"features": np.zeros((0, 5), np.float32), "coords": np.zeros((0, 2), int)},
              {"extractor": "resnet50_trunc", "excluded": "no tissue found"})
    import_features(src, tmp_path / "out.h5")
    out, _, attrs = _read(tmp_path / "out.h5")
    assert out.shape == (0, 5)
    assert attrs["excluded"] == "no tissue found" and attrs["extractor"] == "resnet50_trunc"


def test_zero_rows_gives_excluded_file_training_skips(tmp_path, feats):
    src = _h5(tmp_path / "empty.h5", {"features": np.zeros((0, 5), np.float32), "coords": np.zeros((0, 2), int)})
    import_features(src, tmp_path / "empty_out.h5")
    _, _, attrs = _read(tmp_path / "empty_out.h5")
    assert "empty.h5" in attrs["excluded"]
    import_features(_h5(tmp_path / "full.h5", {"features": feats}), tmp_path / "full_out.h5")
    bags, skipped = load_bags(["empty", "full"], {"empty": tmp_path / "empty_out.h5", "full": tmp_path / "full_out.h5"})
    assert skipped == ["empty"] and list(bags) == ["full"]


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "not found"),
    (lambda p: p.write_text("not hdf5"), "not a readable HDF5"),
    (lambda p: _h5(p, {"coords": np.zeros((3, 2))}), "no features dataset"),
    (lambda p: _h5(p, {"features": np.zeros((2, 3, 4))}), "N x D"),
    (lambda p: _h5(p, {"features": np.zeros(4)}), "N x D"),
    (lambda p: _h5(p, {"features": np.array([[0.0, np.nan], [1, 2]])}), "NaN"),
    (lambda p: _h5(p, {"features": np.zeros((3, 4)), "coords": np.zeros((2, 2))}), "coords have shape"),
])
def test_bad_files_name_the_file(tmp_path, make, message):
    src = tmp_path / "bad_slide.h5"
    make(src)
    with pytest.raises((FeatureFileError, FileNotFoundError), match=message) as err:
        import_features(src, tmp_path / "out.h5")
    assert "bad_slide.h5" in str(err.value)
    assert not (tmp_path / "out.h5").exists()


def test_cli_import(tmp_path, feats):
    src = _h5(tmp_path / "a.h5", {"features": feats})
    env = {"PATH": "/usr/bin:/bin"}
    ok = subprocess.run([sys.executable, "-m", "slidemil.features.byof", "import", str(src), "--out", str(tmp_path / "o.h5")],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert _read(tmp_path / "o.h5")[0].shape == (7, 5)
    bad = subprocess.run([sys.executable, "-m", "slidemil.features.byof", "import", str(tmp_path / "nope.h5"), "--out", "x.h5"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode != 0 and "nope.h5" in bad.stderr and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------- MIL benchmark .npz


def _tiny_npz(path, n_bags=30, n_folds=5, reps=2, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, n_bags)
    index = np.repeat(np.arange(n_bags), sizes)
    rng.shuffle(index)                                   # instances of a bag need not be contiguous
    labels = np.arange(n_bags) % 2
    masks = np.ones((reps, n_folds, n_bags), bool)
    for r in range(reps):
        fold_of = rng.permutation(np.arange(n_bags) % n_folds)
        masks[r, fold_of, np.arange(n_bags)] = False
    feats = rng.normal(size=(len(index), 4))
    np.savez(path, features=feats, bag_index=index, bag_labels=labels, cv_train_masks_5x10=masks)
    return path


def _check_cohort(npz, out, repetition):
    sheet = npz_to_cohort(npz, out, repetition)
    arrays = load_mil_npz(npz)
    index, labels, masks = arrays["bag_index"], arrays["bag_labels"], arrays["cv_train_masks_5x10"]
    n_bags, n_folds = len(labels), masks.shape[1]
    on_disk = pd.read_csv(out / "samples.csv", dtype={"slide_id": str, "patient_id": str})
    pd.testing.assert_frame_equal(on_disk, sheet)
    assert len(sheet) == n_bags and (sheet["slide_id"] == sheet["patient_id"]).all()
    assert sheet["label"].tolist() == labels.astype(int).tolist()
    total = 0
    for b, row in enumerate(sheet.itertuples()):
        feats, coords, attrs = _read(out / row.path)
        members = np.flatnonzero(index == b)
        np.testing.assert_allclose(feats, arrays["features"][members].astype(np.float32))
        assert coords[:, 0].tolist() == members.tolist() and (coords[:, 1] == -1).all()
        assert attrs["excluded"] == ""
        total += len(feats)
        # The bag is left out of the train mask in its own fold only.
        train = masks[repetition, :, b]
        assert not train[row.fold] and train.sum() == n_folds - 1
    assert total == len(index)
    assert sorted(sheet["fold"].unique()) == list(range(n_folds))
    return sheet


def test_npz_roundtrip_tiny(tmp_path):
    npz = _tiny_npz(tmp_path / "tiny.npz")
    a = _check_cohort(npz, tmp_path / "r0", 0)
    b = _check_cohort(npz, tmp_path / "r1", 1)
    assert not a["fold"].equals(b["fold"])


def test_npz_bag_in_two_test_folds_is_an_error(tmp_path):
    npz = _tiny_npz(tmp_path / "tiny.npz")
    with np.load(npz) as d:
        arrays = dict(d)
    arrays["cv_train_masks_5x10"][0, :, 3] = False            # bag 3 held out everywhere
    np.savez(tmp_path / "broken.npz", **arrays)
    with pytest.raises(FeatureFileError, match=r"broken.npz.*bag\(s\) \[3\].*exactly one"):
        npz_to_cohort(tmp_path / "broken.npz", tmp_path / "out")


def test_npz_musk1(tmp_path):
    npz = SHARED_DATA / "mil" / "musk1.npz"
    if not npz.is_file():
        pytest.skip(f"MIL benchmark data not found at {npz}")
    sheet = _check_cohort(npz, tmp_path / "musk1", 2)
    assert len(sheet) == 92 and sheet["label"].sum() == 47
    assert sheet["fold"].value_counts().between(9, 10).all()


# --------------------------------------------------------------------------- predefined folds


def _fold_sheet(n_patients=40, n_folds=5, seed=0):
    rng = np.random.default_rng(seed)
    folds = rng.permutation(np.arange(n_patients) % n_folds)
    rows = []
    for p in range(n_patients):
        for s in range(1 + int(rng.random() < 0.4)):
            rows.append({"slide_id": f"P{p:02d}-S{s}", "patient_id": f"P{p:02d}", "label": p % 2,
                         "fold": int(folds[p])})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("n_folds", [3, 10])
def test_fold_column_test_is_the_predefined_fold(n_folds):
    sheet = _fold_sheet(60, n_folds)
    splits = make_splits(sheet, Splits(fold_column="fold", test_fraction=0.25), seed=4)
    assert fold_columns(splits) == [f"fold_{k}" for k in range(n_folds)]
    patients = splits.drop_duplicates("patient_id").merge(sheet.drop_duplicates("patient_id")[["patient_id", "fold"]])
    for k, col in enumerate(fold_columns(splits)):
        assert splits.groupby("patient_id")[col].nunique().max() == 1                  # no patient in two partitions
        assert set(patients.loc[patients[col] == "test", "patient_id"]) == set(patients.loc[patients["fold"] == k, "patient_id"])
        rest = patients[patients["fold"] != k]
        val = rest[rest[col] == "val"]
        assert set(rest[col]) == {"train", "val"}
        assert len(val) == int(np.ceil(validation_fraction(n_folds) * len(rest)))
        assert abs(val["label"].mean() - rest["label"].mean()) < 0.15                   # stratified
    again = make_splits(sheet, Splits(fold_column="fold"), seed=4)
    other = make_splits(sheet, Splits(fold_column="fold"), seed=5)
    pd.testing.assert_frame_equal(splits, again)
    assert not splits.equals(other)


def test_fold_column_feeds_training_split(tmp_path):
    sheet = _fold_sheet(30, 3)
    make_splits(sheet, Splits(fold_column="fold")).to_csv(tmp_path / "splits.csv", index=False)
    for k in range(3):
        split = read_fold(tmp_path / "splits.csv", k)
        test = set(split.loc[split["partition"] == "test", "slide_id"])
        assert test == set(sheet.loc[sheet["fold"] == k, "slide_id"])


@pytest.mark.parametrize("change, message", [
    (lambda s: s.assign(fold=s["fold"] + 1), "0..K-1"),
    (lambda s: s.assign(fold="a"), "integer fold numbers"),
    (lambda s: s.drop(columns="fold"), "not a column"),
    (lambda s: s.assign(fold=np.arange(len(s)) % 3), "two folds"),
])
def test_fold_column_errors(change, message):
    sheet = _fold_sheet(30, 3)
    with pytest.raises(SplitError, match=message):
        make_splits(change(sheet), Splits(fold_column="fold"))
    with pytest.raises(SplitError, match="cannot be combined"):
        make_splits(sheet, Splits(fold_column="fold", binarize="median"))


# --------------------------------------------------------------------------- end to end


@pytest.mark.workflow
def test_workflow_on_musk1_with_predefined_folds(tmp_path):
    """from-npz, then the DAG from precomputed features: 10 predefined folds, no tiling, report = predictions."""
    import yaml
    from sklearn.metrics import roc_auc_score

    npz = SHARED_DATA / "mil" / "musk1.npz"
    if not npz.is_file():
        pytest.skip(f"MIL benchmark data not found at {npz}")
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    conv = subprocess.run([sys.executable, "-m", "slidemil.features.byof", "from-npz", str(npz), "--out", str(tmp_path / "musk1")],
                          capture_output=True, text=True, env=env)
    assert conv.returncode == 0, conv.stderr
    # Two bags of each class per fold keep all 10 predefined folds while halving the jobs (one import per bag).
    sheet = pd.read_csv(tmp_path / "musk1" / "samples.csv", dtype={"slide_id": str, "patient_id": str})
    sheet = sheet.groupby(["fold", "label"], group_keys=False).head(2).reset_index(drop=True)
    sheet.to_csv(tmp_path / "musk1" / "subset.csv", index=False)
    config = {
        "samples": str(tmp_path / "musk1" / "subset.csv"),
        "results": "results",
        "features": {"precomputed": "musk1"},
        "splits": {"fold_column": "fold"},
        "mil": {"models": ["abmil"], "training": {"epochs": 3, "patience": 3, "lr": 0.0005},
                "settings": {"abmil": {"embed_dim": 64, "attn_dim": 32, "dropout": 0.0}}},
        "report": {"n_bootstrap": 50},
        "compute": {"train_threads": 1},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake_cli(tmp_path, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-5000:]
    log = proc.stdout + proc.stderr
    assert "tile_slide" not in log and "extract_features" not in log
    assert not (tmp_path / "results" / "tiles").exists()
    assert sorted(p.stem for p in (tmp_path / "results" / "features" / "musk1").glob("*.h5")) == sorted(sheet["slide_id"])

    per_fold = pd.read_csv(tmp_path / "results" / "report" / "per_fold.csv")
    assert sorted(per_fold["fold"]) == list(range(10)) and set(per_fold["model"]) == {"abmil"}
    for row in per_fold.itertuples():
        preds = pd.read_csv(tmp_path / "results" / "train" / "musk1" / "abmil" / f"fold_{row.fold}"
                            / "predictions_patients.csv", dtype={"patient_id": str})
        test = preds[preds["partition"] == "test"]
        assert set(test["patient_id"]) == set(sheet.loc[sheet["fold"] == row.fold, "patient_id"])
        assert row.test_auc == pytest.approx(roc_auc_score(test["label"], test["prob"]))


def test_train_bags_in_memory_leaves_caller_bags_alone():
    from slidemil.mil.train import Recipe, train_bags

    rng = np.random.default_rng(0)
    ids = [f"b{i}" for i in range(24)]
    labels = [i % 2 for i in range(24)]
    bags = {b: torch.from_numpy(rng.normal(loc=2.0 * y, size=(3 + i % 4, 6)).astype(np.float32))
            for i, (b, y) in enumerate(zip(ids, labels))}
    before = {b: t.clone() for b, t in bags.items()}
    split = pd.DataFrame({"slide_id": ids, "patient_id": ids, "label": labels,
                          "partition": ["train"] * 16 + ["val"] * 4 + ["test"] * 4})
    run = train_bags(bags, split, Recipe("abmil", {"embed_dim": 16, "attn_dim": 8}, {"epochs": 3, "batch_size": 4}),
                     "cpu")
    assert all(torch.equal(bags[b], before[b]) for b in ids)          # standardised copies, not the caller's
    assert sorted(run.slides["partition"].unique()) == ["test", "val"] and len(run.slides) == 8
    assert run.in_dim == 6 and run.norm is not None and 1 <= run.best.epoch <= len(run.history) == 3
    with pytest.raises(ValueError, match="does not start from a checkpoint"):
        train_bags(bags, split, Recipe("abmil", {}, {"epochs": 1}), "cpu", init_state={"state_dict": {}})
    with pytest.raises(ValueError, match="no bag for slide"):
        train_bags({b: bags[b] for b in ids[1:]}, split, Recipe("abmil", {}, {"epochs": 1}), "cpu")
