"""Atomic outputs: all or nothing, and readable like any other file the user writes."""

import os
import stat

import pytest

from slidemil.io import atomic_output, read_h5, write_h5


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
