"""Atomic file output and small HDF5/CSV helpers shared by the stages.

The files that pass between stages each have one writer and one reader, in this package: tiles.h5
(``slidemil.files.tiles``), features.h5 (``slidemil.files.features``), splits.csv (``slidemil.files.splits``)
and model.pt (``slidemil.files.checkpoint``). Each writer stamps a format version (``FORMAT_VERSION``) that
its reader checks; files from before the stamp are version 1.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import h5py
import numpy as np
import pandas as pd

from slidemil.errors import CorruptFileError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary file lives in the same directory so the final ``os.replace``
    is atomic: a reader (or a resumed run) sees either the old file, no file,
    or the complete new one, never a half-written file. On any exception the
    temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A writer killed with SIGKILL cannot clean up: its leftovers for this same file go now
    # (one job owns an output, so nobody else is writing them).
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; results on a shared server must get the usual umask-based mode.
    os.chmod(tmp_path, 0o666 & ~_UMASK)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _attr_value(value):
    # HDF5 attributes hold scalars, strings and arrays; anything nested goes in as JSON.
    if value is None:
        return "null"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return value


def write_h5(path: str | os.PathLike, datasets: Mapping[str, np.ndarray], attrs: Mapping | None = None) -> None:
    """Write datasets and file attributes to an HDF5 file atomically."""
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, data in datasets.items():
                f.create_dataset(name, data=np.asarray(data))
            file_attrs = f.attrs  # each f.attrs makes a new manager: a tenth of a millisecond per attribute
            for key, value in (attrs or {}).items():
                file_attrs[key] = _attr_value(value)


@contextlib.contextmanager
def open_h5(path: str | os.PathLike, what: str = "HDF5 file") -> Iterator[h5py.File]:
    """``h5py.File(path, "r")``; a missing file or one HDF5 cannot read is one line that names it.

    h5py's own messages ("truncated file: eof = ...") name no file, and a job reading 1,000 files
    must say which one to delete.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {what} not found; run the workflow again to make it")
    try:
        with h5py.File(path, "r") as f:
            yield f
    except OSError as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise CorruptFileError(path, what, str(err)) from None


def read_h5(path: str | os.PathLike, names: tuple[str, ...] | None = None, what: str = "HDF5 file") -> tuple[dict, dict]:
    """Read datasets (all, or ``names``) and attributes from an HDF5 file."""
    with open_h5(path, what) as f:
        keys = names if names is not None else tuple(f.keys())
        data = {k: f[k][()] for k in keys}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    return data, attrs


def map_h5(path: str | os.PathLike, name: str) -> np.ndarray:
    """One dataset of an HDF5 file, memory-mapped when stored contiguous and uncompressed, else read.

    A map is copy-on-write over the file's pages: processes mapping the same file (training
    jobs of several folds and models on one node) share one copy in the page cache instead
    of each holding its own. Each map keeps one file descriptor open.
    """
    with h5py.File(path, "r") as f:
        where = map_plan(f[name])
        if where is None:
            return f[name][()]
    return map_planned(path, name, where)


def map_plan(ds: h5py.Dataset) -> tuple | None:
    """Where a dataset lies in its file, for ``map_planned``; None when it must be read instead."""
    offset = ds.id.get_offset() if ds.chunks is None and ds.external is None and ds.size else None
    if offset is None or ds.ndim == 0 or not ds.dtype.isnative or ds.dtype.kind != "f":
        return None
    return offset, ds.shape, ds.dtype, ds[0]


def map_planned(path: str | os.PathLike, name: str, where: tuple) -> np.ndarray:
    """The copy-on-write map of dataset ``name`` at ``where`` (from ``map_plan``), read if the plan misjudged."""
    offset, shape, dtype, first = where
    mapped = np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape)
    # A layout this reader misjudged (a user block, a foreign writer) must not pass as features.
    if mapped[0].tobytes() != np.asarray(first).tobytes():
        del mapped
        return read_h5(path, names=(name,))[0][name]
    return mapped


# --------------------------------------------------------------------------- format versions

# The attribute (HDF5), key (model.pt) or column (splits.csv) holding a file's format version.
FORMAT_VERSION = "format_version"


def check_format(version, supported: int, path, what: str) -> int:
    """``version`` as an int (absent: 1, the files from before versions were written), refused if newer."""
    version = 1 if version is None else int(version)
    if version > supported:
        raise ValueError(f"{path}: {what} format version {version}, but this slidemil reads up to version "
                         f"{supported}; update slidemil or make the file again")
    return version


def save_png(fig, path: str | os.PathLike, **savefig_kwargs) -> None:
    """Save a matplotlib figure as PNG atomically (the caller still closes it)."""
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", **savefig_kwargs)


def write_csv(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    with atomic_output(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")
