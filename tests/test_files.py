"""The file contracts (slidemil.files.*): one writer and one reader per file, a format version in each."""

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from slidemil.errors import CheckpointError, SplitError
from slidemil.files import FORMAT_VERSION, write_h5
from slidemil.files.checkpoint import read_checkpoint, write_checkpoint
from slidemil.files.features import map_features, read_features, read_features_attrs, write_features
from slidemil.files.splits import fold_columns, never_test_slides, read_fold, read_splits, write_splits_csv
from slidemil.files.tiles import read_tiles, read_tiles_attrs, write_tiles

COORDS = np.array([[0, 0], [64, 0], [0, 64]], np.int64)


def test_tiles_round_trip_and_version(tmp_path):
    write_tiles(tmp_path / "t.h5", COORDS, {"slide_id": "S", "level": 0, "params": {"tile_px": 64}})
    coords, attrs = read_tiles(tmp_path / "t.h5")
    np.testing.assert_array_equal(coords, COORDS)
    assert attrs[FORMAT_VERSION] == 1 and attrs["slide_id"] == "S" and attrs["params"] == '{"tile_px": 64}'
    assert read_tiles_attrs(tmp_path / "t.h5")[0] == 3


def test_features_round_trip_map_and_version(tmp_path):
    feats = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_features(tmp_path / "f.h5", feats, COORDS, {"extractor": "x", "excluded": ""})
    data, attrs = read_features(tmp_path / "f.h5")
    np.testing.assert_array_equal(data["features"], feats)
    np.testing.assert_array_equal(data["coords"], COORDS)
    assert attrs[FORMAT_VERSION] == 1
    mapped = map_features(tmp_path / "f.h5")
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, feats)
    n, attrs = read_features_attrs(tmp_path / "f.h5")
    assert n == 3 and attrs["extractor"] == "x"


def test_h5_files_from_before_versions_are_version_1(tmp_path):
    # What tiling and extraction wrote before this contract: the same layout without the attribute.
    write_h5(tmp_path / "t.h5", {"coords": COORDS}, {"slide_id": "S"})
    write_h5(tmp_path / "f.h5", {"features": np.ones((3, 4), np.float16), "coords": COORDS}, {"extractor": "x"})
    assert FORMAT_VERSION not in read_tiles(tmp_path / "t.h5")[1]
    assert read_features(tmp_path / "f.h5")[0]["features"].dtype == np.float16
    assert map_features(tmp_path / "f.h5").shape == (3, 4)


def test_newer_h5_files_are_refused(tmp_path):
    write_h5(tmp_path / "t.h5", {"coords": COORDS}, {FORMAT_VERSION: 2})
    write_h5(tmp_path / "f.h5", {"features": np.ones((3, 4), np.float32), "coords": COORDS}, {FORMAT_VERSION: 9})
    with pytest.raises(ValueError, match="t.h5: tiles file format version 2, but this slidemil reads up to version 1"):
        read_tiles(tmp_path / "t.h5")
    for reader in (read_features, map_features, read_features_attrs):
        with pytest.raises(ValueError, match="f.h5: feature file format version 9"):
            reader(tmp_path / "f.h5")


def splits_table():
    return pd.DataFrame({"slide_id": ["001", "b", "c", "d"], "patient_id": ["01", "p", "q", "q"],
                         "label": [0, 1, 0, 0], "label_value": ["x", "y", "x", "x"],
                         "fold_0": ["train", "val", "test", "test"], "fold_1": ["val", "train", "excluded", "excluded"]})


def test_splits_round_trip_and_version(tmp_path):
    write_splits_csv(tmp_path / "splits.csv", splits_table())
    assert pd.read_csv(tmp_path / "splits.csv")[FORMAT_VERSION].tolist() == [1] * 4
    table = read_splits(tmp_path / "splits.csv")
    pd.testing.assert_frame_equal(table, splits_table())  # ids stay text: "001" keeps its zeros
    assert fold_columns(table) == ["fold_0", "fold_1"]
    fold = read_fold(tmp_path / "splits.csv", 1)
    assert fold.columns.tolist() == ["slide_id", "patient_id", "label", "partition"] and len(fold) == 2
    assert never_test_slides(tmp_path / "splits.csv") == ["001", "b"]


def test_splits_from_before_versions_and_newer_ones(tmp_path):
    splits_table().to_csv(tmp_path / "old.csv", index=False)  # predefined or older splits: no version column
    pd.testing.assert_frame_equal(read_splits(tmp_path / "old.csv"), splits_table())
    splits_table().assign(**{FORMAT_VERSION: 2}).to_csv(tmp_path / "new.csv", index=False)
    with pytest.raises(SplitError, match="splits format version 2"):
        read_splits(tmp_path / "new.csv")
    splits_table().drop(columns=["fold_0", "fold_1"]).to_csv(tmp_path / "nofold.csv", index=False)
    with pytest.raises(SplitError, match="missing fold_k"):
        read_splits(tmp_path / "nofold.csv")
    with pytest.raises(SplitError, match="missing column.*fold_5"):
        read_fold(tmp_path / "old.csv", 5)


def test_checkpoint_round_trip_old_and_newer(tmp_path):
    ckpt = {"state_dict": {"w": torch.ones(2)}, "model": "abmil", "model_kwargs": {}, "in_dim": 4,
            "feature_mean": None, "feature_std": None}
    write_checkpoint(tmp_path / "model.pt", ckpt)
    back = read_checkpoint(tmp_path / "model.pt", required=("state_dict", "model", "in_dim"))
    assert back[FORMAT_VERSION] == 1 and set(back) == set(ckpt) | {FORMAT_VERSION}
    assert torch.equal(back["state_dict"]["w"], ckpt["state_dict"]["w"])
    torch.save(ckpt, tmp_path / "old.pt")  # a model.pt from before versions
    assert FORMAT_VERSION not in read_checkpoint(tmp_path / "old.pt")
    torch.save({**ckpt, FORMAT_VERSION: 3}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="new.pt: checkpoint format version 3"):
        read_checkpoint(tmp_path / "new.pt")
    torch.save({k: v for k, v in ckpt.items() if k != "in_dim"}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="partial.pt: not a slidemil training checkpoint .missing in_dim"):
        read_checkpoint(tmp_path / "partial.pt", required=("state_dict", "in_dim"))
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "absent.pt")


def test_the_stages_write_through_the_contracts(tmp_path):
    """A stage's output carries the version its reader checks (tiling here; training: test_training_loop)."""
    from slidemil.demo.render import make_slide
    from slidemil.tiling.tile import load_tiles, tile_slide

    make_slide(str(tmp_path / "s.tiff"), label=0, seed=0, slide_px=(512, 512))
    tile_slide(str(tmp_path / "s.tiff"), str(tmp_path / "s.h5"), None, {"tile_px": 64, "mpp": 1.0})
    with h5py.File(tmp_path / "s.h5") as f:
        assert f.attrs[FORMAT_VERSION] == 1
    assert load_tiles(str(tmp_path / "s.h5"))[1][FORMAT_VERSION] == 1
