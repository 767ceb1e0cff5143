"""Manifests: one CSV that lists every slide's output of a per-slide stage.

Jobs that need every slide (each MIL fold, the report) depend on the manifest
instead of on N files. For a 1,000-slide sheet that removes about 16,000 edges
from Snakemake's DAG (each fold job would otherwise list every feature file),
and building the manifest checks the stage's outputs once: a feature set made
with two different weights is refused here, not found later in an AUC.

    python -m slidemil.cohort.manifest features --out features/resnet50_trunc/manifest.csv features/resnet50_trunc/*.h5
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd

from slidemil.errors import CorruptFileError, FeatureFileError
from slidemil.cohort.facts import _text, exclusion_reason, feature_file_attrs
from slidemil.files import write_csv
from slidemil.files.tiles import read_tiles_attrs

FEATURE_COLUMNS = ["slide_id", "path", "n_tiles", "excluded", "extractor", "weights_digest"]
TILE_COLUMNS = ["slide_id", "path", "qc", "n_tiles", "n_candidates", "excluded", "warning"]


def _slide_ids(paths: list[str]) -> list[str]:
    ids = [Path(p).stem for p in paths]
    seen: dict[str, str] = {}
    for slide, path in zip(ids, paths):
        if slide in seen:
            raise ValueError(f"two files for slide {slide}: {seen[slide]} and {path}")
        seen[slide] = path
    return ids


def _read_or_remove(read, path):
    """``read(path)``; a damaged file (truncated, not HDF5) is deleted so that the next run makes it again.

    The manifests list files this workflow made, so removing one loses nothing: the rule that makes it
    runs again on the next run (rule all asks for every per-slide file).
    """
    try:
        return read(path)
    except CorruptFileError as err:
        Path(path).unlink(missing_ok=True)
        raise CorruptFileError(path, err.what, err.detail, removed=True) from None


def feature_manifest(paths: list[str], out_csv: str | os.PathLike) -> pd.DataFrame:
    """List per-slide feature files ({slide_id}.h5); refuse a set mixing extractors or weights."""
    rows = []
    for slide, path in zip(_slide_ids(paths), paths):
        n, attrs = _read_or_remove(feature_file_attrs, path)
        reason = exclusion_reason(n, attrs)
        extractor, digest = _text(attrs.get("extractor", "")), _text(attrs.get("weights_digest", ""))
        # Imported features (slidemil.features.byof) carry a digest of each source file, not of the weights.
        if attrs.get("source") is not None:
            digest = ""
        rows.append({"slide_id": slide, "path": str(path), "n_tiles": n, "excluded": reason,
                     "extractor": extractor, "weights_digest": digest})
    table = pd.DataFrame(rows, columns=FEATURE_COLUMNS)
    for column, what in (("extractor", "extractors"), ("weights_digest", "weights")):
        values = table.loc[table[column] != "", column]
        if values.nunique() > 1:
            groups = {v: table.loc[table[column] == v, "slide_id"].tolist() for v in values.unique()}
            listing = "; ".join(f"{v}: {', '.join(s[:5])}{' ...' if len(s) > 5 else ''}" for v, s in groups.items())
            raise FeatureFileError(
                f"{out_csv}: these feature files were made with different {what} ({listing}). "
                "Delete the stale ones so that they are extracted again.")
    write_csv(out_csv, table)
    return table


def tile_manifest(paths: list[str], qc: list[str], out_csv: str | os.PathLike) -> pd.DataFrame:
    """List per-slide tiling outputs ({slide_id}.h5) with their QC pictures (same order)."""
    if qc and len(qc) != len(paths):
        raise ValueError(f"{out_csv}: {len(paths)} tiles files but {len(qc)} QC pictures")
    rows = []
    for k, (slide, path) in enumerate(zip(_slide_ids(paths), paths)):
        n, attrs = _read_or_remove(read_tiles_attrs, path)
        candidates = attrs.get("n_candidates")
        rows.append({"slide_id": slide, "path": str(path), "qc": str(qc[k]) if qc else "",
                     "n_tiles": n, "n_candidates": float(candidates) if candidates is not None else np.nan,
                     # the splits leave these slides out of every fold
                     "excluded": exclusion_reason(n, attrs),
                     "warning": _text(attrs.get("warning", "")).strip()})
    table = pd.DataFrame(rows, columns=TILE_COLUMNS)
    write_csv(out_csv, table)
    return table


# Text columns stay text: a slide id such as "007" or an empty exclusion reason must not become a number or NaN.
_TEXT_COLUMNS = ("slide_id", "path", "qc", "excluded", "extractor", "weights_digest", "warning")


def read_manifest_table(path: str | os.PathLike) -> pd.DataFrame:
    """A whole manifest: the per-slide facts (tiles kept, exclusion, candidates) without opening N files."""
    table = pd.read_csv(path, dtype={c: str for c in _TEXT_COLUMNS}, keep_default_na=False)
    missing = {"slide_id", "path"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: not a manifest (no {', '.join(sorted(missing))} column)")
    for column in ("n_tiles", "n_candidates"):
        if column in table.columns:
            table[column] = pd.to_numeric(table[column], errors="coerce")
    return table


def read_manifest(path: str | os.PathLike, column: str = "path") -> dict[str, str]:
    """slide_id -> the manifest's ``column`` (a file path), in the manifest's order."""
    table = read_manifest_table(path)
    if column not in table.columns:
        raise ValueError(f"{path}: not a manifest (no {column} column)")
    return dict(zip(table["slide_id"], table[column]))


def main(argv=None, prog: str = "python -m slidemil.cohort.manifest") -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("features", "tiles"))
    ap.add_argument("files", nargs="+", help="per-slide HDF5 files named {slide_id}.h5")
    ap.add_argument("--qc", nargs="*", default=[], help="tiles: the QC pictures, in the same order")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.kind == "features":
        table = feature_manifest(args.files, args.out)
    else:
        table = tile_manifest(args.files, args.qc, args.out)
    print(f"{args.out}: {len(table)} slides")


if __name__ == "__main__":
    main()
