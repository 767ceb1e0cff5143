"""Manifests: the one file per stage that fold jobs and the report depend on."""

import numpy as np
import pandas as pd
import pytest

from slidemil.files import write_h5
from slidemil.cohort.manifest import feature_manifest, main, read_manifest, tile_manifest


def _features(path, n, digest="abc", extractor="resnet50_trunc", excluded="", source=None):
    attrs = {"slide_id": path.stem, "extractor": extractor, "weights_digest": digest, "excluded": excluded}
    if source:
        attrs["source"] = source
    write_h5(path, {"features": np.zeros((n, 4), np.float32), "coords": np.zeros((n, 2), np.int64)}, attrs)
    return str(path)


def test_feature_manifest_lists_every_slide_with_its_facts(tmp_path):
    paths = [_features(tmp_path / "A.h5", 3), _features(tmp_path / "B.h5", 0, excluded="no mpp"),
             _features(tmp_path / "C.h5", 0)]
    table = feature_manifest(paths, tmp_path / "manifest.csv")
    assert table["slide_id"].tolist() == ["A", "B", "C"]
    assert table["n_tiles"].tolist() == [3, 0, 0]
    assert table["excluded"].tolist() == ["", "no mpp", "no tissue tiles"]
    assert read_manifest(tmp_path / "manifest.csv") == dict(zip("ABC", paths))


def test_feature_manifest_refuses_features_from_two_weights(tmp_path):
    paths = [_features(tmp_path / f"S{k}.h5", 2, digest="old" if k == 3 else "new") for k in range(6)]
    with pytest.raises(ValueError, match=r"different weights \(new: S0, S1, S2, S4, S5; old: S3\)"):
        feature_manifest(paths, tmp_path / "manifest.csv")
    assert not (tmp_path / "manifest.csv").exists()


def test_feature_manifest_refuses_two_extractors(tmp_path):
    paths = [_features(tmp_path / "A.h5", 2), _features(tmp_path / "B.h5", 2, extractor="shufflenet_v2")]
    with pytest.raises(ValueError, match="different extractors"):
        feature_manifest(paths, tmp_path / "manifest.csv")


def test_imported_features_carry_per_file_digests(tmp_path):
    # slidemil.features.byof records a digest of each source file: different per slide by design.
    paths = [_features(tmp_path / f"{s}.h5", 2, digest=s * 3, extractor="uni", source=f"/x/{s}.h5") for s in "AB"]
    table = feature_manifest(paths, tmp_path / "manifest.csv")
    assert table["weights_digest"].tolist() == ["", ""]


def test_tile_manifest_pairs_tiles_with_qc_pictures(tmp_path):
    tiles = []
    for slide, n in (("A", 5), ("B", 0)):
        write_h5(tmp_path / f"{slide}.h5", {"coords": np.zeros((n, 2), np.int64)}, {"n_candidates": n + 2})
        tiles.append(str(tmp_path / f"{slide}.h5"))
    qc = [str(tmp_path / "qc" / f"{s}.png") for s in "AB"]
    main(["tiles", *tiles, "--qc", *qc, "--out", str(tmp_path / "manifest.csv")])
    table = pd.read_csv(tmp_path / "manifest.csv")
    assert table["n_tiles"].tolist() == [5, 0]
    assert table["n_candidates"].tolist() == [7, 2]
    assert read_manifest(tmp_path / "manifest.csv", "qc") == dict(zip("AB", qc))
    with pytest.raises(ValueError, match="2 tiles files but 1 QC pictures"):
        tile_manifest(tiles, qc[:1], tmp_path / "other.csv")


def test_two_files_for_one_slide_are_refused(tmp_path):
    (tmp_path / "x").mkdir()
    paths = [_features(tmp_path / "A.h5", 1), _features(tmp_path / "x" / "A.h5", 1)]
    with pytest.raises(ValueError, match="two files for slide A"):
        feature_manifest(paths, tmp_path / "manifest.csv")


def test_read_manifest_names_a_file_that_is_not_one(tmp_path):
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="other.csv: not a manifest"):
        read_manifest(tmp_path / "other.csv")
