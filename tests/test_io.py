"""Atomic outputs: all or nothing, and readable like any other file the user writes."""

import os
import stat

import pytest

from slidemil.files import atomic_output, read_h5, write_h5


def test_atomic_output_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with atomic_output(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_atomic_output_follows_the_umask(tmp_path):
    # mkstemp makes 0600 files; outputs on a shared server must be readable by the group as usual.
    umask = os.umask(0)
    os.umask(umask)
    write_h5(tmp_path / "x.h5", {"a": [1, 2]}, {"k": "v"})
    mode = stat.S_IMODE((tmp_path / "x.h5").stat().st_mode)
    assert mode == 0o666 & ~umask
    data, attrs = read_h5(tmp_path / "x.h5")
    assert data["a"].tolist() == [1, 2] and attrs["k"] == "v"


def test_map_h5_maps_what_write_h5_stores_and_reads_other_layouts(tmp_path):
    import h5py
    import numpy as np

    from slidemil.files import map_h5

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((50, 8)).astype(np.float16)
    write_h5(tmp_path / "plain.h5", {"coords": np.zeros((50, 2), np.int32), "features": feats})
    mapped = map_h5(tmp_path / "plain.h5", "features")
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.float16
    np.testing.assert_array_equal(mapped, feats)
    mapped[0, 0] = 99  # copy-on-write: the process's own page, never the file
    np.testing.assert_array_equal(read_h5(tmp_path / "plain.h5", names=("features",))[0]["features"], feats)

    with h5py.File(tmp_path / "other.h5", "w", userblock_size=512) as f:
        f.create_dataset("chunked", data=feats, chunks=(10, 8), compression="gzip")
        f.create_dataset("big_endian", data=feats.astype(">f4"))
        f.create_dataset("contiguous", data=feats.astype(np.float32))
        f.create_dataset("empty", data=np.zeros((0, 8), np.float32))
    for name in ("chunked", "big_endian", "contiguous", "empty"):
        got = map_h5(tmp_path / "other.h5", name)
        expected = read_h5(tmp_path / "other.h5", names=(name,))[0][name]
        assert not isinstance(got, np.memmap) or name == "contiguous", name
        np.testing.assert_array_equal(got, expected)
