"""The attention heatmaps of one trained (extractor, model), with a small JSON index for the report.

A job of its own in the workflow (rule ``heatmaps``): drawing needs torch, the
slides and the per-slide feature files, while the report page needs only the
index. So editing a report setting (``n_bootstrap``) redraws no heatmap, and
editing a heatmap setting redraws only these.

The index (``index``) holds ``extractor``, ``model``, ``fold``, ``settings``,
``items`` (one per drawn slide: slide_id, label, prob, n_tiles, top tiles and
``file``, the PNG's path relative to the index's folder; other tasks than binary
have ``score`` and ``prediction``, the score in words, instead of ``prob``) and
``notes`` (why a model has fewer heatmaps or none).

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
from slidemil.errors import SheetError
from slidemil.files import write_json
from slidemil.files.splits import fold_column_name, read_splits, split_task
from slidemil.names import BINARY
from slidemil.tasks import Task, make_task

logger = logging.getLogger(__name__)

# The heatmap rule's share of the report section; the defaults are slidemil.config.Report's (one home).
HEATMAP_DEFAULTS = {k: v for k, v in field_defaults(Report).items() if k in ("heatmaps_per_model", "heatmap_top_k")}


def pick_heatmap_slides(splits: pd.DataFrame, fold, usable: set[str], n: int, seed: int,
                        task: Task | None = None) -> list[tuple[str, object]]:
    """``n`` test slides of ``fold`` with tiles and their labels, drawn by ``seed`` cycling through the task's groups
    (binary: positive, negative; slidemil.tasks' ``heatmap_groups``).

    Drawn rather than chosen by prediction so the page shows typical slides,
    not the model's best; every model of an extractor gets the same slides.
    """
    task = task or make_task(BINARY)
    column = fold_column_name(fold)
    if column not in splits.columns or n <= 0:
        return []
    test = splits[(splits[column] == "test") & splits["slide_id"].isin(usable)].set_index("slide_id", drop=False)
    groups, order = task.heatmap_groups(test)
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(sorted(test.loc[groups == g, "slide_id"]))) for g in order]
    picked = []
    while len(picked) < n and any(pools):
        for pool in pools:
            if pool and len(picked) < n:
                slide = str(pool.pop(0))
                picked.append((slide, task.heatmap_label(test.loc[slide])))
    return picked


def _slides_to_draw(sheet, splits, features: pd.DataFrame, fold, n: int, seed: int) -> tuple[list, dict, Task]:
    """The picked (slide, label) pairs, slide_id -> slide file and the task, from the sheet, splits and feature
    manifest."""
    usable = set(features.loc[features["excluded"] == "", "slide_id"])
    split_df = read_splits(splits)
    task = make_task(*split_task(split_df, splits))
    return pick_heatmap_slides(split_df, fold, usable, n, seed, task), _slide_paths(sheet), task


def _slide_paths(sheet) -> dict:
    """slide_id -> slide file. Only the paths: the sheet's outcome columns (named by the splits settings for
    survival) were checked when the splits were drawn, and the splits carry the labels."""
    from slidemil.cohort.sheet import read_sheet_table, resolve_path

    sheet = Path(sheet)
    table = read_sheet_table(sheet)
    missing = [c for c in ("slide_id", "path") if c not in table.columns]
    if missing:
        raise SheetError(sheet, [f"missing column(s) {', '.join(missing)}"])
    return {str(s): str(resolve_path(p, sheet.parent)) for s, p in zip(table["slide_id"], table["path"])}


def draw_model_heatmaps(checkpoint: str | os.PathLike, extractor: str, model: str, fold, sheet, splits,
                        features: str | os.PathLike, tiles: str | os.PathLike, out_dir: str | os.PathLike,
                        index: str | os.PathLike, settings: dict | None = None, seed: int = 0,
                        device: str = "cpu") -> dict:
    """Draw ``heatmaps_per_model`` test slides of ``fold`` with ``checkpoint`` into ``out_dir``; write ``index``.

    ``features`` / ``tiles``: the extractor's feature manifest and the tile
    manifest. ``settings``: keys of HEATMAP_DEFAULTS. Returns the index.
    """
    from slidemil.report.heatmap import HeatmapSettings, make_heatmap  # torch: only this job needs it

    cfg = {**HEATMAP_DEFAULTS, **(settings or {})}
    out, index = Path(out_dir), Path(index)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"extractor": str(extractor), "model": str(model), "fold": fold, "settings": {**cfg, "seed": seed},
           "items": [], "notes": []}
    feature_table, tile_table = read_manifest_table(features), read_manifest_table(tiles)
    n = int(cfg["heatmaps_per_model"])
    picked, slide_paths, task = _slides_to_draw(sheet, splits, feature_table, fold, n, seed)
    if not picked and n > 0:
        doc["notes"].append(f"{extractor} / {model}: no test slide with tiles in fold {fold}")
    feature_files = dict(zip(feature_table["slide_id"], feature_table["path"]))
    tile_files = dict(zip(tile_table["slide_id"], tile_table["path"]))
    drawing = HeatmapSettings(top_k=int(cfg["heatmap_top_k"]), device=device)
    for slide, label in picked:
        png = out / f"{slide}.png"
        result = make_heatmap(slide_paths[slide], feature_files[slide], checkpoint, png, tiles_h5=tile_files.get(slide),
                              slide_id=slide, label=label, settings=drawing)
        if result.png is None:
            doc["notes"].append(f"{extractor} / {model}: {result.note}; no heatmaps")
            break
        # A binary index keeps its keys of before tasks existed.
        scored = {"prob": result.score} if task.name == BINARY else {"score": result.score,
                                                                      "prediction": result.prediction}
        doc["items"].append({"slide_id": slide, "label": label, **scored, "n_tiles": result.n_tiles,
                             "file": os.path.relpath(png, index.parent), "top": result.top})
    write_json(index, doc)
    return doc


def read_heatmap_index(index: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """An index as the report uses it: each item with its extractor, model, fold and ``file`` relative to
    ``out_dir``."""
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
