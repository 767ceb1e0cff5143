"""The attention heatmaps of one trained (extractor, model), with a small JSON index for the report.

A job of its own in the workflow (rule ``heatmaps``): drawing needs torch, the
slides and the per-slide feature files, while the report page needs only the
index. So editing a report setting (``n_bootstrap``) redraws no heatmap, and
editing a heatmap setting redraws only these.

The index (``index``) holds ``extractor``, ``model``, ``fold``, ``settings``,
``items`` (one per drawn slide: slide_id, label, prob, n_tiles, top tiles and
``file``, the PNG's path relative to the index's folder) and ``notes`` (why a
model has fewer heatmaps or none).

Command line::

    slidemil heatmaps --checkpoint model.pt --extractor E --model M --fold 0 \\
        --sheet samples.csv --splits splits.csv --features features/E/manifest.csv \\
        --tiles tiles/manifest.csv --out heatmaps/E/M --index heatmaps/E/M.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from slidemil.cohort.manifest import read_manifest_table
from slidemil.config import Report, field_defaults
from slidemil.files import write_json
from slidemil.files.splits import fold_column_name, read_splits

logger = logging.getLogger(__name__)

# The heatmap rule's share of the report section; the defaults are slidemil.config.Report's (one home).
HEATMAP_DEFAULTS = {k: v for k, v in field_defaults(Report).items() if k in ("heatmaps_per_model", "heatmap_top_k")}


def pick_heatmap_slides(splits: pd.DataFrame, fold, usable: set[str], n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` test slides of ``fold`` with tiles, alternating positive and negative, drawn by ``seed``.

    Drawn rather than chosen by prediction so the page shows typical slides,
    not the model's best; every model of an extractor gets the same slides.
    """
    column = fold_column_name(fold)
    if column not in splits.columns or n <= 0:
        return []
    test = splits[(splits[column] == "test") & splits["slide_id"].isin(usable)]
    label = pd.to_numeric(test["label"], errors="coerce")
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(sorted(test.loc[label == y, "slide_id"]))) for y in (1, 0)]
    picked = []
    while len(picked) < n and any(pools):
        for y, pool in zip((1, 0), pools):
            if pool and len(picked) < n:
                picked.append((str(pool.pop(0)), y))
    return picked


def _slides_to_draw(sheet, splits, features: pd.DataFrame, fold, n: int, seed: int) -> tuple[list, dict]:
    """The picked (slide, label) pairs and slide_id -> slide file, from the sheet, splits and feature manifest."""
    from slidemil.cohort.sheet import load_sheet

    usable = set(features.loc[features["excluded"] == "", "slide_id"])
    split_df = read_splits(splits)
    sheet_df = load_sheet(sheet, check_files=False)
    return pick_heatmap_slides(split_df, fold, usable, n, seed), dict(zip(sheet_df["slide_id"].astype(str),
                                                                          sheet_df["path"]))


def draw_model_heatmaps(checkpoint: str | os.PathLike, extractor: str, model: str, fold, sheet, splits,
                        features: str | os.PathLike, tiles: str | os.PathLike, out_dir: str | os.PathLike,
                        index: str | os.PathLike, settings: dict | None = None, seed: int = 0,
                        device: str = "cpu") -> dict:
    """Draw ``heatmaps_per_model`` test slides of ``fold`` with ``checkpoint`` into ``out_dir``; write ``index``.

    ``features`` / ``tiles``: the extractor's feature manifest and the tile
    manifest. ``settings``: keys of HEATMAP_DEFAULTS. Returns the index.
    """
    from slidemil.report.heatmap import make_heatmap  # torch: only this job needs it

    cfg = {**HEATMAP_DEFAULTS, **(settings or {})}
    out, index = Path(out_dir), Path(index)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"extractor": str(extractor), "model": str(model), "fold": fold, "settings": {**cfg, "seed": seed},
           "items": [], "notes": []}
    feature_table, tile_table = read_manifest_table(features), read_manifest_table(tiles)
    picked, slide_paths = _slides_to_draw(sheet, splits, feature_table, fold, int(cfg["heatmaps_per_model"]), seed)
    if not picked and int(cfg["heatmaps_per_model"]) > 0:
        doc["notes"].append(f"{extractor} / {model}: no test slide with tiles in fold {fold}")
    feature_files = dict(zip(feature_table["slide_id"], feature_table["path"]))
    tile_files = dict(zip(tile_table["slide_id"], tile_table["path"]))
    for slide, label in picked:
        png = out / f"{slide}.png"
        result = make_heatmap(slide_paths[slide], feature_files[slide], checkpoint, png, tiles_h5=tile_files.get(slide),
                              top_k=int(cfg["heatmap_top_k"]), slide_id=slide, label=label, device=device)
        if result.png is None:
            doc["notes"].append(f"{extractor} / {model}: {result.note}; no heatmaps")
            break
        doc["items"].append({"slide_id": slide, "label": label, "prob": result.prob, "n_tiles": result.n_tiles,
                             "file": os.path.relpath(png, index.parent), "top": result.top})
    write_json(index, doc)
    return doc


def read_heatmap_index(index: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """An index as the report uses it: each item with its extractor, model, fold and ``file`` relative to ``out_dir``."""
    index = Path(index)
    doc = json.loads(index.read_text())
    doc["items"] = [{"extractor": doc["extractor"], "model": doc["model"], "fold": doc["fold"], **item,
                     "file": os.path.relpath(index.parent / item["file"], out_dir)} for item in doc["items"]]
    return doc


def main(argv: list[str] | None = None, prog: str = "python -m slidemil.report.model_heatmaps") -> int:
    from slidemil.logs import setup_logging

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    for name in ("checkpoint", "extractor", "model", "sheet", "splits", "features", "tiles", "out", "index"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--fold", default="0")
    parser.add_argument("--settings", type=json.loads, default={},
                        help=f"heatmap settings as JSON; defaults: {json.dumps(HEATMAP_DEFAULTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    setup_logging()
    fold = int(args.fold) if args.fold.isdigit() else args.fold
    draw_model_heatmaps(args.checkpoint, args.extractor, args.model, fold, args.sheet, args.splits, args.features,
                        args.tiles, args.out, args.index, args.settings, args.seed, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
