"""Are two results folders the same run? Splits, features, predictions and AUCs compared exactly.

Used to check that a refactor changed no number: run the demo at two commits (same config and seed), then

    python bench/compare_results.py OLD/results NEW/results

Prints one line per compared file kind with the count that differ and exits 1 if any does.
Feature files are compared on their ``features`` and ``coords`` arrays (attributes such as a format
version may legitimately differ); CSVs cell by cell after sorting rows, without splits.csv's format_version column.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

KINDS = {
    "splits": "splits/splits.csv",
    "features": "features/*/*.h5",
    "tiles": "tiles/*.h5",
    "predictions": "train/*/*/fold_*/predictions_*.csv",
    "histories": "train/*/*/fold_*/history.csv",
    "summary": "report/summary.csv",
    "per_fold": "report/per_fold.csv",
}


def same_h5(a: Path, b: Path) -> bool:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names = [n for n in ("features", "coords") if n in fa]
        return all(n in fb and np.array_equal(fa[n][()], fb[n][()]) for n in names)


def same_csv(a: Path, b: Path) -> bool:
    # splits.csv carries its format version as a column (slidemil.files.splits): like the HDF5 attribute, it
    # may legitimately differ between the two runs.
    da, db = (pd.read_csv(p).drop(columns="format_version", errors="ignore") for p in (a, b))
    if list(da.columns) != list(db.columns) or len(da) != len(db):
        return False
    key = list(da.columns)
    da, db = da.sort_values(key, ignore_index=True), db.sort_values(key, ignore_index=True)
    return da.equals(db)


def compare(old: Path, new: Path) -> int:
    differing = 0
    for kind, pattern in KINDS.items():
        files = sorted(p.relative_to(old) for p in old.glob(pattern))
        missing = [f for f in files if not (new / f).exists()]
        same = same_h5 if pattern.endswith(".h5") else same_csv
        diff = [f for f in files if f not in missing and not same(old / f, new / f)]
        differing += len(missing) + len(diff)
        print(f"{kind:12s} {len(files):4d} files, {len(missing)} missing, {len(diff)} differ"
              + (f": {', '.join(map(str, (missing + diff)[:5]))}" if missing or diff else ""))
    return differing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    args = ap.parse_args(argv)
    return 1 if compare(args.old, args.new) else 0


if __name__ == "__main__":
    sys.exit(main())
