"""The report and heatmaps rules (issue 7, item 7): what reruns after a report edit, escaping, no per-slide files.

The report page is built from the manifests and the heatmap indexes only; the heatmaps are jobs of their own,
so a report setting reruns the report job alone and a heatmap setting redraws the heatmaps (then the report).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import h5py
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from slidemil.report import page as report_page  # noqa: E402
from factories import job_counts, snakemake_cli

# The sheet check refuses such slide ids (tests/test_fault_inputs.py); a heatmap index or a page built from
# other files may still carry one, so the page escapes every id it shows.
EVIL_SLIDE = "S<script>alert(1)<"
EVIL_MODEL = "ab<script>mil"


# ---- the page from manifests and indexes alone, escaped -------------------------------------


def _png(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(2, 2), dpi=50)
    ax.imshow(np.full((8, 8, 3), color, np.uint8))
    fig.savefig(path)
    plt.close(fig)


def _run(root, model, fold, ids, labels, rng):
    folder = root / "train" / "uni" / model / f"fold_{fold}"
    folder.mkdir(parents=True)
    prob = np.clip(0.5 + 0.3 * (np.array(labels) - 0.5) + rng.normal(0, 0.2, len(ids)), 0.01, 0.99)
    pd.DataFrame({"patient_id": ids, "label": labels, "partition": "test", "n_slides": 1, "prob": prob}).to_csv(
        folder / "predictions_patients.csv", index=False)
    pd.DataFrame({"epoch": [1, 2], "train_loss": [0.7, 0.6], "val_loss": [0.7, 0.65], "val_auc": [0.6, 0.7],
                  "lr": [1e-3, 1e-3]}).to_csv(folder / "history.csv", index=False)
    return {"extractor": "uni", "model": model, "fold": fold, "predictions": str(folder / "predictions_patients.csv"),
            "history": str(folder / "history.csv")}


@pytest.fixture
def study(tmp_path):
    """Predictions, manifests (pointing at .h5 files that do not exist), a QC picture and one heatmap index."""
    rng = np.random.default_rng(0)
    ids, labels = [f"P{i}" for i in range(12)], [i % 2 for i in range(12)]
    runs = [_run(tmp_path, m, f, ids, labels, rng) for m in ("abmil", EVIL_MODEL) for f in (0, 1)]
    slides = [f"S{i}" for i in range(12)]
    pd.DataFrame({"slide_id": slides, "patient_id": ids, "path": [f"{s}.tiff" for s in slides],
                  "label": labels}).to_csv(tmp_path / "samples.csv", index=False)
    pd.DataFrame({"slide_id": slides, "patient_id": ids, "label": labels,
                  "fold_0": ["test"] * 4 + ["train"] * 8, "fold_1": ["train"] * 8 + ["test"] * 4}).to_csv(
        tmp_path / "splits.csv", index=False)
    excluded = ["", "no tissue tiles"] + [""] * 10
    pd.DataFrame({"slide_id": slides, "path": [f"gone/{s}.h5" for s in slides], "n_tiles": [0 if e else 50 for e in excluded],
                  "excluded": excluded, "extractor": "uni", "weights_digest": "abc"}).to_csv(
        tmp_path / "features.csv", index=False)
    _png(tmp_path / "qc" / "S0.png", (200, 100, 150))
    pd.DataFrame({"slide_id": slides, "path": [f"gone/{s}.h5" for s in slides],
                  "qc": [str(tmp_path / "qc" / "S0.png")] + [""] * 11,
                  "n_tiles": [0 if e else 50 for e in excluded], "n_candidates": 60}).to_csv(
        tmp_path / "tiles.csv", index=False)
    heat = tmp_path / "report" / "heatmaps" / "uni"
    _png(heat / EVIL_MODEL / f"{EVIL_SLIDE}.png", (20, 60, 200))
    index = {"extractor": "uni", "model": EVIL_MODEL, "fold": 0, "settings": {}, "notes": [f"note on {EVIL_MODEL}"],
             "items": [{"slide_id": EVIL_SLIDE, "label": 0, "prob": 0.25, "n_tiles": 50,
                        "file": f"{EVIL_MODEL}/{EVIL_SLIDE}.png", "top": []}]}
    (heat / f"{EVIL_MODEL}.json").write_text(json.dumps(index))
    return {"root": tmp_path, "runs": runs, "index": heat / f"{EVIL_MODEL}.json"}


def _build(study):
    root = study["root"]
    return report_page.build_report(study["runs"], root / "report", {"n_bootstrap": 50}, seed=0,
                                    sheet=root / "samples.csv", splits=root / "splits.csv",
                                    features={"uni": root / "features.csv"}, tiles=root / "tiles.csv",
                                    heatmaps=[study["index"]])


def test_report_reads_manifests_not_hdf5_files_and_each_prediction_once(study, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"the report opened an HDF5 file: {args}")

    monkeypatch.setattr(h5py, "File", refuse)
    reads, read_csv = [], pd.read_csv

    def counting_read_csv(path, *args, **kwargs):
        reads.append(str(path))
        return read_csv(path, *args, **kwargs)

    monkeypatch.setattr(pd, "read_csv", counting_read_csv)
    doc = _build(study)
    predictions = sorted(r for r in reads if r.endswith("predictions_patients.csv"))
    assert predictions == sorted(run["predictions"] for run in study["runs"])  # each read once
    assert doc["cohort"]["n_slides"] == 12 and doc["cohort"]["n_slides_excluded"] == 1
    assert doc["cohort"]["tiles_per_slide"]["total"] == 11 * 50
    assert {r["n_candidates"] for r in doc["cohort"]["slides"]} == {60.0}
    assert [h["file"] for h in doc["heatmaps"]] == [f"heatmaps/uni/{EVIL_MODEL}/{EVIL_SLIDE}.png"]
    assert doc["heatmap_notes"] == [f"note on {EVIL_MODEL}"]
    out = study["root"] / "report"
    assert pd.read_csv(out / "excluded.csv").to_dict("records") == [{"slide_id": "S1", "reason": "no tissue tiles"}]
    # One writer: summary.md holds the numbers and the excluded slides, written once.
    md = (out / "summary.md").read_text()
    assert md.count("# Model comparison") == 1 and "## Excluded slides (1)" in md and "`S1`: no tissue tiles" in md


def test_slide_ids_and_model_names_are_escaped(study):
    _build(study)
    page = (study["root"] / "report" / "report.html").read_text()
    assert "<script" not in page
    assert "S&lt;script&gt;alert(1)&lt;" in page and "ab&lt;script&gt;mil" in page
    # Every figure still embedded, ids still addressable.
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/") for s in sources)
    assert len(sources) == 2 + 2 + 1 + 1 + 1  # ROC, training, comparison, heatmap, QC
    assert 'id="summary-uni-ab&lt;script&gt;mil"' in page


def test_report_job_needs_no_torch(study):
    # Drawing is the heatmaps jobs' work: building the page must not load torch (seconds per report job).
    code = ("import sys, json; from slidemil.report.page import build_report; "
            f"build_report(**json.load(open({str(study['root'] / 'args.json')!r}))); print('torch' in sys.modules)")
    root = study["root"]
    (root / "args.json").write_text(json.dumps({
        "runs": study["runs"], "out_dir": str(root / "report"), "settings": {"n_bootstrap": 20},
        "sheet": str(root / "samples.csv"), "splits": str(root / "splits.csv"),
        "features": {"uni": str(root / "features.csv")}, "tiles": str(root / "tiles.csv"),
        "heatmaps": [str(study["index"])]}))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False"


# ---- the rules: what reruns after a report edit ---------------------------------------------


def _dry_run(workdir, edit: dict) -> tuple[dict, str]:
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["report"] = {**config.get("report", {}), **edit}
    (workdir / "report_edit.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake_cli(workdir, "-n", "--cores", "1", configfile="report_edit.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return job_counts(proc.stdout + proc.stderr), proc.stdout + proc.stderr


@pytest.mark.workflow
@pytest.mark.parametrize("edit, expected", [
    ({"n_bootstrap": 300}, {"report": 1}),
    ({"qc_examples": 1}, {"report": 1}),
    ({"heatmap_top_k": 3}, {"heatmaps": 1, "report": 1}),
    ({"heatmaps_per_model": 1}, {"heatmaps": 1, "report": 1}),
])
def test_report_edit_reruns_only_what_it_shapes(tiny_sheet_run, edit, expected):
    counts, out = _dry_run(tiny_sheet_run, edit)
    assert counts == expected
    # The trigger is the changed params of the job that uses the setting, not a changed input.
    rule = "heatmaps" if "heatmaps" in expected else "report"
    reason = re.search(rf"rule {rule}:.*?reason: ([^\n]*)", out, re.S)
    assert reason and "Params have changed" in reason.group(1), out[-3000:]


@pytest.mark.workflow
def test_workflow_report_job_reads_no_per_slide_file(tiny_sheet_run, tmp_path):
    """The report job alone, with every per-slide .h5 file of a finished run made unreadable."""
    work = tmp_path / "run"
    shutil.copytree(tiny_sheet_run, work, symlinks=True)
    res = work / "results"
    h5_files = list((res / "tiles").glob("*.h5")) + list((res / "features").glob("*/*.h5"))
    assert h5_files
    for path in h5_files:
        stat = path.stat()
        path.write_bytes(b"not an HDF5 file")
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same age: nothing upstream reruns
    heatmaps = sorted((res / "report" / "heatmaps").rglob("*.png"))
    before = [p.stat().st_mtime_ns for p in heatmaps]
    proc = snakemake_cli(work, "--cores", "1", "--forcerun", "report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert job_counts(proc.stdout + proc.stderr) == {"report": 1}
    doc = json.loads((res / "report" / "report.json").read_text())
    assert doc["heatmaps"] and doc["cohort"]["n_slides"] == len(pd.read_csv(work / "cohort" / "sheet.csv"))
    assert [p.stat().st_mtime_ns for p in heatmaps] == before  # no heatmap redrawn
