"""The results report: one self-contained HTML page, rendered from report.json.

Everything the page shows is first collected in ``report.json`` (numbers,
tables, figure names), so scripts and tests read the same values a person
reads. The page is rendered from it by the Jinja2 template
``templates/report.html.j2`` (autoescaped: a slide id or model name is text,
never markup); it embeds its figures as base64 data URIs and needs neither
JavaScript nor any file beside it; it links (relatively) to the CSV tables and
the tiling QC pictures, which stay where the pipeline wrote them.

Sections: summary of test AUCs; paired comparison of every model with the
reference model, and of every extractor with the first one under the same model;
ROC curves; training curves; attention heatmaps; cohort
(slides, patients, tiles, excluded slides); splits; tiling QC.

The cohort facts come from the manifests (slidemil.cohort.manifest), never
from the per-slide HDF5 files, and the heatmaps from the indexes that
slidemil.report.model_heatmaps writes in jobs of their own: the report itself
needs no torch and opens no slide.

Command line (draws the heatmaps too, and makes the manifests it does not find)::

    python -m slidemil.report.page --runs RUNS.json --out DIR [--sheet S.csv --splits splits.csv
        --features-dir results/features --tiles-dir results/tiles] [--settings JSON] [--seed S]
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from slidemil.cohort import facts as cohort_mod
from slidemil.cohort.manifest import read_manifest_table
from slidemil.config import Report, field_defaults
from slidemil.files import write_csv, write_json, write_text
from slidemil.names import BINARY, base_model
from slidemil.files import deploy as deploy_files
from slidemil.files.splits import read_splits, split_task
from slidemil.report.endpoints import detect_task
from slidemil.tasks import make_task
from slidemil.report.stats import (compare_encoders, compare_models, load_tests, plot_comparison, plot_history,
                                   write_summary)

logger = logging.getLogger(__name__)

# The page's share of the report section; the defaults are slidemil.config.Report's (one home).
DEFAULTS = {k: v for k, v in field_defaults(Report).items() if k in ("n_bootstrap", "reference_model", "qc_examples")}
QC_EMBED_PX = 420
TABLE_LINKS = ("summary.csv", "per_fold.csv", "comparison.csv", "encoder_comparison.csv", "cohort.csv",
               "splits_summary.csv", "report.json")


# --------------------------------------------------------------------------- collecting


def _records(frame: pd.DataFrame) -> list[dict]:
    """Rows as dicts with NaN as None, so report.json is strict JSON."""
    out = []
    for row in frame.to_dict(orient="records"):
        out.append({k: (None if isinstance(v, float) and not math.isfinite(v) else
                        v.item() if isinstance(v, np.generic) else v) for k, v in row.items()})
    return out


def _fold_key(fold) -> tuple:
    # Numeric folds in numeric order (fold 10 after fold 2), anything else after them by name.
    try:
        return (0, int(fold), "")
    except (TypeError, ValueError):
        return (1, 0, str(fold))


def _results(runs: list[dict], summary: pd.DataFrame, per_fold: pd.DataFrame, tests: dict, cfg: dict, seed: int,
             out: Path, written: dict | None = None) -> dict:
    """The report.json document's results part; writes comparison.csv, encoder_comparison.csv and the comparison
    and training figures. ``written``: another task's tables (slidemil.report.endpoints.write_task_summary), its
    comparison and encoder comparison already written; then ``tests`` is empty."""
    n_bootstrap, reference = int(cfg["n_bootstrap"]), str(cfg["reference_model"])
    notes: list[str] = []
    pairs = sorted(tests) if written is None else sorted(zip(summary["extractor"], summary["model"]))
    if written is None:
        written = _binary_comparisons(tests, reference, n_bootstrap, seed, out)
    comparison, encoders = written["comparison"], written["encoder_comparison"]
    comparison_png = _forest(comparison, "comparison.png", cfg, out)
    models = {model for _, model in pairs}
    if comparison_png is None and len(models) > 1 and reference not in models:
        notes.append(f"no comparison: the reference model {reference!r} is not among the trained models")
    encoders_png = _forest(encoders, "encoder_comparison.png", cfg, out)
    figures = {"roc": [], "history": []}
    for extractor, model in pairs:
        if tests:  # other tasks draw their own figures instead of ROC curves
            figures["roc"].append({"extractor": extractor, "model": model, "file": f"roc_{extractor}_{model}.png"})
        history = [(r["fold"], r["history"]) for r in runs
                   if (str(r["extractor"]), str(r["model"])) == (extractor, model) and r.get("history")]
        if history:
            name = f"history_{extractor}_{model}.png"
            plot_history(sorted(history, key=lambda h: _fold_key(h[0])), f"{extractor} / {model}: training", out / name)
            figures["history"].append({"extractor": extractor, "model": model, "file": name})
    return {
        "settings": {**cfg, "seed": seed},
        "summary": _records(summary),
        "per_fold": _records(per_fold),
        "comparison": _records(comparison),
        "encoder_comparison": _records(encoders),
        "figures": {**figures, "comparison": comparison_png, "encoder_comparison": encoders_png},
        "cohort": None, "splits": None, "heatmaps": [], "heatmap_notes": [], "qc": None, "notes": notes,
    }


def _binary_comparisons(tests: dict, reference: str, n_bootstrap: int, seed: int, out: Path) -> dict:
    """comparison.csv (every model against ``reference``) and encoder_comparison.csv (each model's extractors
    against the first extractor of the runs, the first of ``features.extractors``; empty with one extractor)."""
    tables = {"comparison": compare_models(tests, reference, n_bootstrap, seed),
              "encoder_comparison": compare_encoders(tests, next(iter(tests))[0] if tests else "", n_bootstrap, seed)}
    for name, table in tables.items():
        write_csv(out / f"{name}.csv", table)
    return tables


def _forest(table: pd.DataFrame, name: str, cfg: dict, out: Path) -> str | None:
    """The forest figure ``name`` of a comparison table (None when the table is empty): ΔAUC, or another task's
    difference on its primary metric (``cfg["metric_title"]``)."""
    if not len(table):
        return None
    other = "difference" in table.columns
    plot_comparison(table, out / name, *(("difference", cfg.get("metric_title")) if other else ()))
    return name


def _report_task(runs: list[dict], splits):
    """The runs' task (None: binary), from splits.csv where the report has it, else from the predictions' columns."""
    if splits is None:
        return detect_task([r["predictions"] for r in runs])
    name, class_names = split_task(read_splits(splits), splits)
    return None if name == BINARY else make_task(name, class_names)


def _endpoint(task, run_settings: dict | None):
    """What the sheet's outcome columns hold (a survival report's: the run's splits settings name them)."""
    from slidemil.cohort.sheet import Endpoint

    if task is None:
        return None
    given = (run_settings or {}).get("splits") or {}
    return Endpoint(task.name, None, given.get("time_column", Endpoint.time_column),
                    given.get("event_column", Endpoint.event_column))


def _task_results(task, runs: list[dict], cfg: dict, seed: int, out: Path) -> dict:
    """report.json's results part for a multiclass, survival or regression task; writes its tables and figures."""
    from slidemil.report.endpoints import metric_names, metric_title, write_task_summary

    tables = write_task_summary(task, runs, out, str(cfg["reference_model"]), int(cfg["n_bootstrap"]), seed)
    names = metric_names(task, tables["summary"])
    titled = {**cfg, "metric_title": f"test {metric_title(task.metric)}"}
    doc = _results(runs, tables["summary"], tables["per_fold"], {}, titled, seed, out, tables)
    doc["settings"] = {**cfg, "seed": seed}
    titles = {n: metric_title(n) for n in names}
    doc["task"] = {"name": task.name, "metric": task.metric, "metrics": names, "class_names": task.class_names,
                   "titles": titles, "metric_titles": [titles[n] for n in names], "heatmap_pick": task.heatmap_pick}
    doc["figures"]["task"] = tables["figures"]
    return doc


def _cohort(sheet, splits, features: pd.DataFrame, tiles: pd.DataFrame | None, qc_examples: int, out: Path,
            endpoint=None) -> dict:
    """The cohort, splits and QC parts of report.json, from the sheet, splits.csv and the manifests."""
    from slidemil.cohort.sheet import load_sheet

    sheet_df = load_sheet(sheet, check_files=False, endpoint=endpoint)
    table = cohort_mod.cohort_table(sheet_df, features, tiles)
    write_csv(out / "cohort.csv", table)
    usable = set(table.loc[table["excluded"] == "", "slide_id"])
    doc = {"cohort": {**cohort_mod.cohort_facts(table), "slides": _records(table),
                      "excluded": _records(table[table["excluded"] != ""][["slide_id", "patient_id", "excluded"]])}}
    # Colours that cannot be right (slidemil.tiling.tile); manifests from before the column have none.
    warned = tiles is not None and "warning" in tiles.columns
    doc["cohort"]["warnings"] = _records(tiles.loc[tiles["warning"] != "", ["slide_id", "warning"]]) if warned else []
    if splits is not None:
        split_table = cohort_mod.split_summary(splits, set(table["slide_id"]) - usable)
        write_csv(out / "splits_summary.csv", split_table)
        doc["splits"] = _records(split_table)
    qc = {} if tiles is None else {s: q for s, q in zip(tiles["slide_id"], tiles["qc"]) if q}
    if qc:
        doc["qc"] = _qc_section(table, qc, out, qc_examples)
    return doc


def _heatmaps(indexes: list, tests: dict, extractors: set[str], out: Path) -> tuple[list, list]:
    """Heatmap entries and notes of every (extractor, model), from the indexes of the heatmap jobs."""
    from slidemil.report.model_heatmaps import read_heatmap_index

    drawn = {}
    for index in indexes:
        doc = read_heatmap_index(index, out)
        drawn[(doc["extractor"], doc["model"])] = doc
    items, notes = [], []
    for extractor, model in sorted(set(tests) | set(drawn)):
        if (extractor, model) in drawn:
            items += drawn[(extractor, model)]["items"]
            notes += drawn[(extractor, model)]["notes"]
        elif indexes and extractor not in extractors:
            # The tile-supervised baseline scores tiles with a CNN: no feature bags, no MIL attention.
            notes.append(f"{extractor} / {model}: no tile features and no instance attention; no heatmaps")
    return items, notes


def provenance(run_settings: dict | None) -> dict:
    """What made a report: the slidemil version, ``git describe`` of its source (when a git checkout) and the
    digest of the run's settings, so an old report cannot pass for the current one."""
    import hashlib
    import subprocess

    import slidemil

    git = ""
    try:
        proc = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], capture_output=True, text=True,
                              cwd=Path(slidemil.__file__).parent, timeout=10)
        git = proc.stdout.strip() if proc.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        pass  # no git, or not a checkout: the version alone
    digest = None
    if run_settings is not None:
        text = json.dumps(run_settings, sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return {"slidemil_version": slidemil.__version__, "git_describe": git, "settings_digest": digest,
            "run_settings": run_settings}


def fold_notes(per_fold: pd.DataFrame) -> list[str]:
    """One plain sentence per fold without a test AUC, saying why."""
    notes = []
    for row in per_fold.itertuples(index=False):
        if math.isfinite(float(row.test_auc)):
            continue
        n, positive = int(row.n_test_patients), int(row.n_test_positive)
        why = ("its test set has no usable patient (every test slide was excluded or none was drawn)" if n == 0 else
               f"its {n} test patient(s) are all {'positive' if positive else 'negative'}, so no AUC can be computed")
        notes.append(f"{row.extractor} / {row.model} fold {row.fold}: no test AUC: {why}; the fold is left out "
                     "of the mean and the CI")
    return notes


def build_report(
    runs: list[dict],
    out_dir: str | os.PathLike,
    settings: dict | None = None,
    seed: int = 0,
    sheet: str | os.PathLike | None = None,
    splits: str | os.PathLike | None = None,
    features: dict[str, str | os.PathLike] | None = None,
    tiles: str | os.PathLike | None = None,
    heatmaps: list[str | os.PathLike] | None = None,
    run_settings: dict | None = None,
    deploy_cohorts: list[str] | None = None,
) -> dict:
    """Write the tables, figures, report.json and report.html into ``out_dir``; return the JSON document.

    ``runs``: extractor, model, fold, predictions and history per trained
    fold; each prediction file is read once. ``settings``: the ``report``
    config section (keys of DEFAULTS). ``features``: extractor -> its feature
    manifest; ``tiles``: the tile manifest (none for precomputed features).
    ``heatmaps``: the indexes written by slidemil.report.model_heatmaps. The
    cohort and split sections need ``sheet``, ``splits`` and ``features``.
    ``run_settings``: the settings the results were made with, recorded with their digest.
    ``deploy_cohorts``: the deploy cohorts (slidemil.deploy) whose pages the report links to.
    """
    cfg = {**DEFAULTS, **(settings or {})}
    out = Path(out_dir)
    task = _report_task(runs, splits)
    manifests = {str(e): read_manifest_table(m) for e, m in (features or {}).items()}
    tile_table = read_manifest_table(tiles) if tiles is not None else None
    excluded = cohort_mod.excluded_from_manifests(list(manifests.values())) if manifests else None
    if task is not None:
        # Multiclass, survival, regression: their metrics and figures (slidemil.report.endpoints).
        out.mkdir(parents=True, exist_ok=True)
        doc = _task_results(task, runs, cfg, seed, out)
        tests = {(r["extractor"], r["model"]): None for r in doc["summary"]}
    else:
        per_fold, tests = load_tests(runs)
        summary = write_summary(per_fold, tests, out, int(cfg["n_bootstrap"]), seed, excluded)
        doc = _results(runs, summary, per_fold, tests, cfg, seed, out)
        doc["notes"] += fold_notes(per_fold)
    if excluded is not None:
        write_csv(out / "excluded.csv", excluded)
    doc["provenance"] = provenance(run_settings)
    if sheet is not None and manifests:
        endpoint = _endpoint(task, run_settings)
        doc.update(_cohort(sheet, splits, next(iter(manifests.values())), tile_table, int(cfg["qc_examples"]), out,
                           endpoint))
    doc["heatmaps"], doc["heatmap_notes"] = _heatmaps(list(heatmaps or []), tests, set(manifests), out)
    if manifests and tile_table is None:
        doc["heatmap_notes"].append("no heatmaps: the features were precomputed, so there are no slides "
                                    "and tile coordinates to draw on")
    if deploy_cohorts:
        doc["deploy"] = [{"cohort": c, "href": deploy_files.report_page(c)} for c in deploy_cohorts]
    write_json(out / "report.json", doc)
    write_text(out / "report.html", render_html(doc, out))
    logger.info("report: %s", out / "report.html")
    return doc


def _qc_section(table: pd.DataFrame, qc: dict[str, str], out: Path, n_shown: int) -> dict:
    """Links to every QC picture; the ones of the slides with the fewest tiles are shown."""
    rows = table[table["slide_id"].isin(qc)].sort_values(["n_tiles", "slide_id"], kind="stable")
    entries = [{"slide_id": r.slide_id, "n_tiles": int(r.n_tiles), "excluded": r.excluded,
                "link": os.path.relpath(qc[r.slide_id], out), "path": str(qc[r.slide_id])}
               for r in rows.itertuples(index=False)]
    return {"shown": entries[:max(0, n_shown)], "all": sorted(entries, key=lambda e: e["slide_id"])}


# --------------------------------------------------------------------------- HTML


def _f(value, digits: int = 3, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _png_uri(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    kind = "jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "png"
    return f"data:image/{kind};base64,{data}"


def _jpeg_uri(path: Path, max_px: int | None = QC_EMBED_PX) -> str | None:
    """A JPEG copy, downscaled to ``max_px``: slide pictures are photographs, ~6x smaller as JPEG than PNG."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        return None
    scale = max_px / max(image.shape[:2]) if max_px else 1.0
    if scale < 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 88])
    return f"data:image/jpeg;base64,{base64.b64encode(buf.tobytes()).decode()}"


def _environment():
    import jinja2

    # autoescape on for every name: slide ids and model names come from users' files.
    env = jinja2.Environment(loader=jinja2.PackageLoader("slidemil.report", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["num"] = _f
    env.tests["mhim"] = lambda model: base_model(str(model)) is not None   # names.py's one MHIM naming rule
    return env


def render_html(doc: dict, out_dir: str | os.PathLike) -> str:
    """The report page of ``doc`` (see :func:`build_report`); figures are read from ``out_dir``."""
    out = Path(out_dir)
    tables = [n for n in TABLE_LINKS if (out / n).exists() or n == "report.json"]
    return _environment().get_template("report.html.j2").render(
        doc=doc, s=doc["settings"], tables=tables,
        png=lambda name: _png_uri(out / name),
        heat=lambda name: _jpeg_uri(out / name, None),
        thumb=lambda path: _jpeg_uri(Path(path)),
    )


# --------------------------------------------------------------------------- CLI


def _manifest(folder: Path, kind: str, out: Path) -> str:
    """The folder's manifest.csv as the pipeline writes it, else one made from its *.h5 files under ``out``."""
    if (folder / "manifest.csv").is_file():
        return str(folder / "manifest.csv")
    from slidemil.cohort.manifest import feature_manifest, tile_manifest

    files = [str(p) for p in sorted(folder.glob("*.h5"))]
    target = out / "manifests" / f"{kind}_{folder.name}.csv"
    if kind == "features":
        feature_manifest(files, target)
    else:
        qc = [folder / "qc" / f"{Path(f).stem}.png" for f in files]
        tile_manifest(files, [str(q) if q.is_file() else "" for q in qc], target)
    return str(target)


def _draw_heatmaps(runs, args, features: dict, tiles: str, out: Path) -> list[str]:
    """Outside the workflow: each (extractor, model)'s heatmaps from its first fold with a checkpoint."""
    from slidemil.report.model_heatmaps import HEATMAP_DEFAULTS, draw_model_heatmaps

    settings = {k: args.settings.get(k, v) for k, v in HEATMAP_DEFAULTS.items()}
    if not (args.sheet and args.splits) or int(settings["heatmaps_per_model"]) <= 0:
        return []
    first = {}
    for run in sorted(runs, key=lambda r: _fold_key(r["fold"])):
        if run.get("checkpoint") and str(run["extractor"]) in features:
            first.setdefault((str(run["extractor"]), str(run["model"])), run)
    indexes = []
    for (extractor, model), run in sorted(first.items()):
        folder = out / "heatmaps" / extractor / model
        draw_model_heatmaps(run["checkpoint"], extractor, model, run["fold"], args.sheet, args.splits,
                            features[extractor], tiles, folder, f"{folder}.json", settings, args.seed, args.device)
        indexes.append(f"{folder}.json")
    return indexes


def main(argv: list[str] | None = None, prog: str = "python -m slidemil.report.page") -> int:
    from slidemil.logs import setup_logging

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="JSON list of {extractor, model, fold, predictions, "
                                                      "history[, checkpoint]}")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--sheet", help="sample sheet (cohort section, slide paths for heatmaps)")
    parser.add_argument("--splits", help="splits.csv (split sizes, heatmap slides)")
    parser.add_argument("--features-dir", help="folder with one subfolder of {slide}.h5 (and manifest.csv) "
                                               "per extractor")
    parser.add_argument("--tiles-dir", help="folder of {slide}.h5 tiles files (and qc/{slide}.png, manifest.csv)")
    parser.add_argument("--settings", type=json.loads, default={},
                        help=f"report and heatmap settings as JSON; defaults: {json.dumps(DEFAULTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    setup_logging()
    runs = json.loads(Path(args.runs).read_text())
    out = Path(args.out)
    features, tiles, indexes = None, None, []
    if args.features_dir:
        features = {d.name: _manifest(d, "features", out) for d in sorted(Path(args.features_dir).iterdir())
                    if d.is_dir()}
    if args.tiles_dir:
        tiles = _manifest(Path(args.tiles_dir), "tiles", out)
        indexes = _draw_heatmaps(runs, args, features or {}, tiles, out)
    build_report(runs, out, args.settings, args.seed, args.sheet, args.splits, features, tiles, indexes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
