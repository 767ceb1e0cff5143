"""The results report: one self-contained HTML page, rendered from report.json.

Everything the page shows is first collected in ``report.json`` (numbers,
tables, figure names), so scripts and tests read the same values a person
reads. The page embeds its figures as base64 data URIs and needs neither
JavaScript nor any file beside it; it links (relatively) to the CSV tables and
the tiling QC pictures, which stay where the pipeline wrote them.

Sections: summary of test AUCs; paired comparison of every model with the
reference model; ROC curves; training curves; attention heatmaps; cohort
(slides, patients, tiles, excluded slides); splits; tiling QC.

Command line::

    python -m slidemil.report.page --runs RUNS.json --out DIR [--sheet S.csv --splits splits.csv
        --features-dir results/features --tiles-dir results/tiles] [--n-bootstrap N] [--seed S]
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from slidemil.cohort import facts as cohort_mod
from slidemil.files import write_csv, write_json, write_text
from slidemil.files.splits import read_splits
from slidemil.report.stats import (
    compare_models, load_tests, make_report, plot_comparison, plot_history,
)

logger = logging.getLogger(__name__)

DEFAULTS = {
    "n_bootstrap": 1000,
    "reference_model": "abmil",
    "heatmaps_per_model": 2,
    "heatmap_top_k": 8,
    "qc_examples": 4,
}
QC_EMBED_PX = 420


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


def pick_heatmap_slides(splits: pd.DataFrame, fold, usable: set[str], n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` test slides of ``fold`` with tiles, alternating positive and negative, drawn by ``seed``.

    Drawn rather than chosen by prediction so the page shows typical slides,
    not the model's best; every model of an extractor gets the same slides.
    """
    column = f"fold_{fold}"
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


def _heatmaps(runs, splits, sheet, features, tiles, n, top_k, seed, usable, out, device) -> tuple[list, list]:
    """Heatmaps of each (extractor, model) with a checkpoint, from its first fold; and notes."""
    from slidemil.report.heatmap import make_heatmap  # torch is only needed here

    first = {}
    for run in sorted(runs, key=lambda r: _fold_key(r["fold"])):
        if run.get("checkpoint"):
            first.setdefault((str(run["extractor"]), str(run["model"])), run)
    items, notes = [], []
    folder = out / "heatmaps"
    folder.mkdir(parents=True, exist_ok=True)
    slide_paths = dict(zip(sheet["slide_id"].astype(str), sheet["path"]))
    for (extractor, model), run in sorted(first.items()):
        if extractor not in features:
            # The tile-supervised baseline scores tiles with a CNN: no feature bags, no MIL attention.
            notes.append(f"{extractor} / {model}: no tile features and no instance attention; no heatmaps")
            continue
        picked = pick_heatmap_slides(splits, run["fold"], usable, n, seed)
        if not picked:
            notes.append(f"{extractor} / {model}: no test slide with tiles in fold {run['fold']}")
            continue
        for slide, label in picked:
            png = folder / f"{extractor}_{model}_{slide}.png"
            result = make_heatmap(slide_paths[slide], features[extractor][slide], run["checkpoint"], png,
                                  tiles_h5=tiles.get(slide), top_k=top_k, slide_id=slide, label=label,
                                  device=device)
            if result.png is None:
                notes.append(f"{extractor} / {model}: {result.note}; no heatmaps")
                break
            items.append({"extractor": extractor, "model": model, "fold": run["fold"], "slide_id": slide,
                          "label": label, "prob": result.prob, "n_tiles": result.n_tiles,
                          "file": f"heatmaps/{png.name}", "top": result.top})
    return items, notes


def build_report(
    runs: list[dict],
    out_dir: str | os.PathLike,
    settings: dict | None = None,
    seed: int = 0,
    sheet: str | os.PathLike | None = None,
    splits: str | os.PathLike | None = None,
    features: dict[str, dict[str, str]] | None = None,
    tiles: dict[str, str] | None = None,
    qc: dict[str, str] | None = None,
    device: str = "cpu",
) -> dict:
    """Write the tables, figures, report.json and report.html into ``out_dir``; return the JSON document.

    ``runs``: extractor, model, fold, predictions, history and optionally
    checkpoint (model.pt) per trained fold. ``settings``: the ``report``
    config section (keys of DEFAULTS). ``features``: extractor -> slide ->
    feature file. ``tiles`` / ``qc``: slide -> tiles HDF5 / QC picture; without
    tiles (precomputed features) there are no heatmaps. The cohort and split
    sections need ``sheet``, ``splits`` and ``features``.
    """
    cfg = {**DEFAULTS, **(settings or {})}
    out = Path(out_dir)
    n_bootstrap, reference = int(cfg["n_bootstrap"]), str(cfg["reference_model"])
    summary = make_report(runs, str(out), n_bootstrap=n_bootstrap, seed=seed)
    per_fold, tests = load_tests(runs)
    notes: list[str] = []

    comparison = compare_models(tests, reference, n_bootstrap, seed)
    write_csv(out / "comparison.csv", comparison)
    comparison_png = None
    if len(comparison):
        plot_comparison(comparison, out / "comparison.png")
        comparison_png = "comparison.png"
    elif len(tests) > 1:
        notes.append(f"no comparison: the reference model {reference!r} is not among the trained models")

    figures = {"roc": [], "history": []}
    for extractor, model in sorted(tests):
        figures["roc"].append({"extractor": extractor, "model": model, "file": f"roc_{extractor}_{model}.png"})
        history = [(r["fold"], r["history"]) for r in runs
                   if (str(r["extractor"]), str(r["model"])) == (extractor, model) and r.get("history")]
        if history:
            name = f"history_{extractor}_{model}.png"
            plot_history(sorted(history, key=lambda h: _fold_key(h[0])), f"{extractor} / {model}: training", out / name)
            figures["history"].append({"extractor": extractor, "model": model, "file": name})

    doc = {
        "settings": {**cfg, "seed": seed},
        "summary": _records(summary),
        "per_fold": _records(per_fold),
        "comparison": _records(comparison),
        "figures": {**figures, "comparison": comparison_png},
        "cohort": None, "splits": None, "heatmaps": [], "heatmap_notes": [], "qc": None, "notes": notes,
    }

    if sheet is not None and features:
        from slidemil.cohort.sheet import load_sheet

        sheet_df = load_sheet(sheet, check_files=False)
        table = cohort_mod.cohort_table(sheet_df, next(iter(features.values())), tiles)
        write_csv(out / "cohort.csv", table)
        usable = set(table.loc[table["excluded"] == "", "slide_id"])
        doc["cohort"] = {**cohort_mod.cohort_facts(table), "slides": _records(table),
                         "excluded": _records(table[table["excluded"] != ""][["slide_id", "patient_id", "excluded"]])}
        if splits is not None:
            split_table = cohort_mod.split_summary(splits, set(table["slide_id"]) - usable)
            write_csv(out / "splits_summary.csv", split_table)
            doc["splits"] = _records(split_table)
            if tiles is not None and int(cfg["heatmaps_per_model"]) > 0:
                split_df = read_splits(splits)
                doc["heatmaps"], doc["heatmap_notes"] = _heatmaps(
                    runs, split_df, sheet_df, features, tiles, int(cfg["heatmaps_per_model"]),
                    int(cfg["heatmap_top_k"]), seed, usable, out, device)
        if tiles is None:
            doc["heatmap_notes"].append("no heatmaps: the features were precomputed, so there are no slides "
                                        "and tile coordinates to draw on")
        if qc:
            doc["qc"] = _qc_section(table, qc, out, int(cfg["qc_examples"]))

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


CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0; color: #1d2733;
       background: #f6f7f9; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 20px; margin: 34px 0 8px; border-bottom: 2px solid #dde3ea;
  padding-bottom: 4px; } h3 { font-size: 16px; margin: 20px 0 6px; }
nav { font-size: 14px; margin: 8px 0 18px; } nav a { margin-right: 14px; }
table { border-collapse: collapse; font-size: 13.5px; margin: 8px 0 12px; }
th, td { border: 1px solid #d5dbe2; padding: 4px 9px; text-align: right; }
th { background: #eef2f6; } td.l, th.l { text-align: left; }
tr.best td { background: #eefaf0; font-weight: 600; }
.note { color: #5b6672; font-size: 13.5px; max-width: 980px; }
.warn { color: #8a4b00; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; } figure img { max-width: 100%; border: 1px solid #e3e7ec; }
figcaption { font-size: 12.5px; color: #5b6672; max-width: 560px; }
.roc img { width: 360px; } .hist img { width: 560px; } .qc img { width: 270px; }
.heat img { width: 100%; } .kpi { display: inline-block; margin: 0 26px 8px 0; }
.kpi b { display: block; font-size: 22px; } details { margin: 8px 0; } summary { cursor: pointer; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _f(value, digits: int = 3, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    kind = "jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "png"
    return f'<img alt="{_e(alt)}" src="data:image/{kind};base64,{data}">'


def _img_jpeg(path: Path, alt: str, max_px: int | None = QC_EMBED_PX) -> str:
    """A JPEG copy, downscaled to ``max_px``: slide pictures are photographs, ~6x smaller as JPEG than PNG."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        return f'<span class="warn">cannot read {_e(path)}</span>'
    scale = max_px / max(image.shape[:2]) if max_px else 1.0
    if scale < 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 88])
    data = base64.b64encode(buf.tobytes()).decode()
    return f'<img alt="{_e(alt)}" src="data:image/jpeg;base64,{data}">'


def _table(headers: list[str], rows: list[list[str]], left: int = 1, row_ids: list[str] | None = None,
           classes: list[str] | None = None) -> str:
    """Cells are HTML already; the first ``left`` columns are left aligned."""
    head = "".join(f'<th class="l">{h}</th>' if i < left else f"<th>{h}</th>" for i, h in enumerate(headers))
    body = []
    for k, row in enumerate(rows):
        attrs = ""
        if row_ids:
            attrs += f' id="{_e(row_ids[k])}"'
        if classes and classes[k]:
            attrs += f' class="{classes[k]}"'
        cells = "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>" for i, c in enumerate(row))
        body.append(f"<tr{attrs}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _summary_section(doc: dict) -> str:
    s = doc["settings"]
    rows, ids, classes = [], [], []
    best = doc["summary"][0]["auc_mean"] if doc["summary"] else None
    for r in doc["summary"]:
        folds = [f for f in doc["per_fold"] if f["extractor"] == r["extractor"] and f["model"] == r["model"]]
        per = ", ".join(f"{f['fold']}: {_f(f['test_auc'])}" for f in folds)
        ci = "n/a" if r["ci_low"] is None else f"{_f(r['ci_low'])} – {_f(r['ci_high'])}"
        rows.append([_e(r["extractor"]), _e(r["model"]), str(r["n_folds"]),
                     f"{_f(r['auc_mean'])} ± {_f(r['auc_std'])}", ci, _e(per)])
        ids.append(f"summary-{r['extractor']}-{r['model']}")
        classes.append("best" if best is not None and r["auc_mean"] == best else "")
    text = (
        "<p class='note'>Patient-level AUC on the held-out test patients (a patient's score is the mean of "
        "its slides' probabilities), as mean ± sample standard deviation over the cross-validation folds. "
        f"95 % CI: percentile bootstrap of the fold-mean AUC over test patients ({s['n_bootstrap']} replicates, "
        f"seed {s['seed']}); when all folds share one test set, each replicate resamples it once for all "
        "folds. Folds whose test set has one class have no AUC and are left out.</p>"
    )
    table = _table(["Extractor", "Model", "Folds", "Test AUC (mean ± std)", "95 % CI", "Per-fold test AUC"],
                   rows, left=2, row_ids=ids, classes=classes)
    return f"<section id='results'><h2>Results</h2>{text}{table}</section>"


def _comparison_section(doc: dict, out: Path) -> str:
    ref = doc["settings"]["reference_model"]
    text = (
        f"<p class='note'>Each model against <b>{_e(ref)}</b> trained on the same features and folds, scored on "
        "the same test patients: ΔAUC = AUC(model) − AUC(reference). The 95 % CI is a <i>paired</i> "
        "percentile bootstrap: every replicate resamples the test patients once and scores both models on that "
        "resample, so the variation the two models share cancels and the interval reflects how much they "
        "disagree. Per fold: percentiles of that fold's replicate differences; mean: percentiles of the mean "
        "over folds of the replicate differences (one resample of the shared test set per replicate). "
        "Replicates whose resample has a single class are skipped. A CI that excludes 0 suggests a real "
        "difference on this test set; it does not account for training variability beyond the folds.</p>"
    )
    if not doc["comparison"]:
        notes = "".join(f"<p class='note'>{_e(n)}</p>" for n in doc["notes"] if "comparison" in n)
        return (f"<section id='comparison'><h2>Comparison with {_e(ref)}</h2>{text}"
                f"{notes or '<p class=note>Only one model: nothing to compare.</p>'}</section>")
    rows, ids = [], []
    for r in doc["comparison"]:
        ci = "n/a" if r["ci_low"] is None else f"{_f(r['ci_low'], signed=True)} – {_f(r['ci_high'], signed=True)}"
        fold = "<b>mean</b>" if r["fold"] == "mean" else _e(r["fold"])
        rows.append([_e(r["extractor"]), _e(r["model"]), fold, str(r["n_test_patients"]), _f(r["auc_model"]),
                     _f(r["auc_reference"]), _f(r["auc_diff"], signed=True), ci, str(r["n_bootstrap_used"])])
        ids.append(f"comparison-{r['extractor']}-{r['model']}-{r['fold']}")
    table = _table(["Extractor", "Model", "Fold", "Test patients", "AUC model", f"AUC {_e(ref)}", "ΔAUC",
                    "95 % CI (paired)", "Replicates used"], rows, left=2, row_ids=ids)
    figure = ""
    if doc["figures"]["comparison"]:
        figure = (f"<figure>{_img(out / doc['figures']['comparison'], 'AUC differences')}<figcaption>ΔAUC to "
                  f"{_e(ref)}: diamonds the mean over folds with its paired-bootstrap 95 % CI, dots single "
                  "folds.</figcaption></figure>")
    return f"<section id='comparison'><h2>Comparison with {_e(ref)}</h2>{text}{table}{figure}</section>"


def _figure_grid(items: list[dict], out: Path, css: str, caption) -> str:
    figs = "".join(f"<figure>{_img(out / i['file'], i['file'])}<figcaption>{caption(i)}</figcaption></figure>"
                   for i in items)
    return f"<div class='grid {css}'>{figs}</div>"


def _heatmap_section(doc: dict, out: Path) -> str:
    text = (
        "<p class='note'>Each tile coloured by the percentile of its attention within the slide (red = most "
        "attended), computed by the model's own forward pass over the whole bag with the features standardised "
        "as in training; the numbered outlines are the most attended tiles, shown below each map as read from "
        "the slide. Test slides of the model's first fold, drawn at random (alternating positive and negative) "
        "with the run's seed; every model of an extractor gets the same slides. Any slide can be drawn with "
        "<code>python -m slidemil.report.heatmap --slide S.svs --tiles T.h5 --features F.h5 --checkpoint model.pt "
        "--out heat.png</code>.</p>"
    )
    notes = "".join(f"<p class='note warn'>{_e(n)}</p>" for n in doc["heatmap_notes"])
    parts = []
    for item in doc["heatmaps"]:
        caption = (f"{_e(item['extractor'])} / {_e(item['model'])}, fold {_e(item['fold'])}: slide "
                   f"{_e(item['slide_id'])}, label {_e(item['label'])}, predicted P(positive) "
                   f"{_f(item['prob'])}, {item['n_tiles']} tiles")
        if str(item["model"]).startswith("mhim_"):
            # MHIM-MIL checkpoints hold the trained network that makes the predictions (the student).
            caption += " (MHIM-MIL: attention of the checkpoint's network, which sees the full bag here)"
        parts.append(f"<h3>{caption}</h3><figure class='heat'>{_img_jpeg(out / item['file'], item['slide_id'], None)}"
                     "</figure>")
    return f"<section id='heatmaps'><h2>Attention heatmaps</h2>{text}{notes}{''.join(parts)}</section>"


def _cohort_section(doc: dict) -> str:
    c = doc["cohort"]
    if c is None:
        return ""
    t = c["tiles_per_slide"]
    kpis = "".join(f"<span class='kpi'><b>{v}</b>{_e(k)}</span>" for k, v in (
        ("slides", c["n_slides"]), ("patients", c["n_patients"]), ("slides excluded", c["n_slides_excluded"]),
        ("tiles in total", t["total"])))
    labels = _table(["Label", "Slides", "Patients"],
                    [[_e(k), str(v["slides"]), str(v["patients"])] for k, v in c["labels"].items()])
    tiles = (f"<p class='note'>Tiles kept per usable slide: min {t['min']}, median {t['median']:g}, "
             f"max {t['max']}.</p>")
    if c["excluded"]:
        excluded = "<h3>Excluded slides</h3>" + _table(
            ["Slide", "Patient", "Reason"], [[_e(r["slide_id"]), _e(r["patient_id"]), _e(r["excluded"])]
                                             for r in c["excluded"]], left=3)
    else:
        excluded = "<p class='note'>No slide was excluded.</p>"
    per_slide = _table(
        ["Slide", "Patient", "Label", "Tiles kept", "Tissue candidates", "Excluded"],
        [[_e(r["slide_id"]), _e(r["patient_id"]), _e(r["label"]), str(r["n_tiles"]),
          "n/a" if r["n_candidates"] is None else f"{r['n_candidates']:g}", _e(r["excluded"])]
         for r in c["slides"]], left=3)
    return (f"<section id='cohort'><h2>Cohort</h2>{kpis}{labels}{tiles}{excluded}"
            f"<details><summary>All {c['n_slides']} slides (<a href='cohort.csv'>cohort.csv</a>)</summary>"
            f"{per_slide}</details></section>")


def _splits_section(doc: dict) -> str:
    if doc["splits"] is None:
        return ""
    rows = [[str(r["fold"]), _e(r["partition"]), str(r["n_patients"]), str(r["n_slides"]),
             str(r["n_slides_without_tiles"]), str(r["n_patients_negative"]), str(r["n_patients_positive"])]
            for r in doc["splits"]]
    text = ("<p class='note'>Patient-level splits: a patient's slides are always in one partition. Slides "
            "without tiles stay in their partition but are skipped in training and evaluation.</p>")
    table = _table(["Fold", "Partition", "Patients", "Slides", "Slides without tiles", "Negative patients",
                    "Positive patients"], rows, left=2)
    return f"<section id='splits'><h2>Splits</h2>{text}{table}</section>"


def _qc_section_html(doc: dict) -> str:
    q = doc["qc"]
    if q is None:
        return ""
    shown = "".join(
        f"<figure><a href='{_e(e['link'])}'>{_img_jpeg(Path(e['path']), e['slide_id'])}</a>"
        f"<figcaption>{_e(e['slide_id'])}: {e['n_tiles']} tiles{(' – ' + _e(e['excluded'])) if e['excluded'] else ''}"
        "</figcaption></figure>" for e in q["shown"])
    links = ", ".join(f"<a href='{_e(e['link'])}'>{_e(e['slide_id'])}</a>" for e in q["all"])
    text = ("<p class='note'>Tiling QC: slide thumbnails with kept tiles outlined in green and rejected "
            "tissue candidates in red. Shown: the slides with the fewest kept tiles, the likeliest to need a look; "
            "every slide's picture is linked below (files next to this report's folder).</p>")
    return (f"<section id='qc'><h2>Tiling QC</h2>{text}<div class='grid qc'>{shown}</div>"
            f"<details><summary>QC pictures of all {len(q['all'])} slides</summary><p>{links}</p></details></section>")


def render_html(doc: dict, out_dir: str | os.PathLike) -> str:
    """The report page of ``doc`` (see :func:`build_report`); figures are read from ``out_dir``."""
    out = Path(out_dir)
    s = doc["settings"]
    sections = [
        _summary_section(doc),
        _comparison_section(doc, out),
        "<section id='roc'><h2>ROC curves</h2><p class='note'>Patient-level test ROC curve of every fold.</p>"
        + _figure_grid(doc["figures"]["roc"], out, "roc", lambda i: f"{_e(i['extractor'])} / {_e(i['model'])}")
        + "</section>",
        "<section id='training'><h2>Training curves</h2><p class='note'>Validation AUC (patient level) and "
        "losses per epoch; the checkpoint of the best validation AUC was kept.</p>"
        + _figure_grid(doc["figures"]["history"], out, "hist",
                       lambda i: f"{_e(i['extractor'])} / {_e(i['model'])}") + "</section>",
        _heatmap_section(doc, out),
        _cohort_section(doc),
        _splits_section(doc),
        _qc_section_html(doc),
    ]
    nav_items = [("results", "Results"), ("comparison", "Comparison"), ("roc", "ROC"), ("training", "Training"),
                 ("heatmaps", "Heatmaps")]
    nav_items += [(k, t) for k, t in (("cohort", "Cohort"), ("splits", "Splits"), ("qc", "Tiling QC"))
                  if doc[k] is not None]
    nav = "".join(f"<a href='#{k}'>{t}</a>" for k, t in nav_items)
    tables = ", ".join(f"<a href='{n}'>{n}</a>" for n in
                       ("summary.csv", "per_fold.csv", "comparison.csv", "cohort.csv", "splits_summary.csv",
                        "report.json") if (out / n).exists() or n == "report.json")
    notes = "".join(f"<p class='note warn'>{_e(n)}</p>" for n in doc["notes"] if "comparison" not in n)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>slidemil report</title><style>{CSS}</style></head><body><main>"
        "<h1>slidemil results report</h1>"
        f"<p class='note'>Bootstrap replicates {s['n_bootstrap']}, seed {s['seed']}, reference model "
        f"{_e(s['reference_model'])}. Tables: {tables}.</p><nav>{nav}</nav>{notes}"
        + "".join(sections)
        + "</main></body></html>\n"
    )


# --------------------------------------------------------------------------- CLI


def _by_stem(folder: str | None, pattern: str) -> dict[str, str] | None:
    if not folder:
        return None
    return {p.stem: str(p) for p in sorted(Path(folder).glob(pattern))}


def main(argv: list[str] | None = None, prog: str = "python -m slidemil.report.page") -> int:
    from slidemil.logs import setup_logging

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="JSON list of {extractor, model, fold, predictions, "
                                                      "history[, checkpoint]}")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--sheet", help="sample sheet (cohort section, slide paths for heatmaps)")
    parser.add_argument("--splits", help="splits.csv (split sizes, heatmap slides)")
    parser.add_argument("--features-dir", help="folder with one subfolder of {slide}.h5 per extractor")
    parser.add_argument("--tiles-dir", help="folder of {slide}.h5 tiles files (and qc/{slide}.png)")
    parser.add_argument("--settings", type=json.loads, default={},
                        help=f"report settings as JSON; defaults: {json.dumps(DEFAULTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    setup_logging()
    runs = json.loads(Path(args.runs).read_text())
    features = None
    if args.features_dir:
        features = {d.name: _by_stem(str(d), "*.h5") for d in sorted(Path(args.features_dir).iterdir()) if d.is_dir()}
    tiles = _by_stem(args.tiles_dir, "*.h5")
    qc = _by_stem(str(Path(args.tiles_dir) / "qc"), "*.png") if args.tiles_dir else None
    build_report(runs, args.out, args.settings, args.seed, args.sheet, args.splits, features, tiles, qc,
                 device=args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
