"""The HTML results report on a small synthetic study: real slides, tiles, QC, features, checkpoints."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from slidemil.report import stats as report, page as report_page
from slidemil.demo.render import make_slide
from slidemil.cohort.manifest import feature_manifest, tile_manifest
from slidemil.report.heatmap import load_checkpoint, tile_attention
from slidemil.report.model_heatmaps import draw_model_heatmaps
from slidemil.files import write_h5
from slidemil.mil.models import create_model
from slidemil.tiling.tile import tile_slide
from factories import shared_runs, test_rows

IN_DIM = 8
SETTINGS = {"n_bootstrap": 200, "reference_model": "abmil", "heatmaps_per_model": 2, "heatmap_top_k": 4,
            "qc_examples": 2}
BROKEN = "OpenSlide cannot open this file (corrupt or truncated)"


def _checkpoint(path, model, fold):
    torch.manual_seed(fold)
    kwargs = {"embed_dim": 16, "attn_dim": 8, "dropout": 0.0}
    net = create_model(model, in_dim=IN_DIM, n_classes=2, **kwargs)
    torch.save({"state_dict": net.state_dict(), "model": model, "model_kwargs": kwargs, "in_dim": IN_DIM,
                "n_classes": 2, "fold": fold, "feature_mean": torch.zeros(IN_DIM),
                "feature_std": torch.ones(IN_DIM)}, path)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    sheet = pd.DataFrame({
        "slide_id": ["S-POS", "S-NEG", "S-BAD", "S-EMPTY"],
        "patient_id": ["P1", "P2", "P3", "P4"],
        "path": ["slides/S-POS.tiff", "slides/S-NEG.tiff", "slides/S-BAD.tiff", "slides/S-EMPTY.tiff"],
        "label": [1, 0, 0, 1],
    })
    (root / "slides").mkdir()
    sheet.to_csv(root / "samples.csv", index=False)
    tiles, qc, features = {}, {}, {}
    rng = np.random.default_rng(0)
    for slide, label in zip(sheet["slide_id"], sheet["label"]):
        tiles[slide] = str(root / "tiles" / f"{slide}.h5")
        features[slide] = str(root / "features" / "uni" / f"{slide}.h5")
        if slide in ("S-POS", "S-NEG"):
            make_slide(root / "slides" / f"{slide}.tiff", label, seed=3, slide_px=(1024, 1024))
            qc[slide] = str(root / "tiles" / "qc" / f"{slide}.png")
            tile_slide(root / "slides" / f"{slide}.tiff", tiles[slide], qc[slide], {"mpp": 1.0, "tile_px": 128})
            with h5py.File(tiles[slide]) as f:
                coords, size0 = f["coords"][()], int(f.attrs["tile_size_level0"])
            feats = rng.normal(size=(len(coords), IN_DIM)).astype(np.float32)
            attrs = {"tile_size_level0": size0, "level": 0, "excluded": ""}
        else:
            # The exclusion contract: valid, empty files; the reason (if any) in the `excluded` attribute.
            coords, feats = np.zeros((0, 2), np.int64), np.zeros((0, IN_DIM), np.float32)
            attrs = {"tile_size_level0": 256, "excluded": BROKEN} if slide == "S-BAD" else {"tile_size_level0": 256}
            write_h5(tiles[slide], {"coords": coords}, attrs)
        write_h5(features[slide], {"features": feats, "coords": coords}, attrs)
    splits = sheet[["slide_id", "patient_id", "label"]].assign(
        fold_0=["test", "test", "train", "val"], fold_1=["test", "test", "val", "train"])
    splits.to_csv(root / "splits.csv", index=False)

    runs = (shared_runs(root, "uni", "abmil", 2, 40, signal=2.0, seed=1)
            + shared_runs(root / "g", "uni", "abmil_gated", 2, 40, signal=0.7, seed=1))
    for run in runs:
        run["checkpoint"] = str(Path(run["predictions"]).parent / "model.pt")
        _checkpoint(run["checkpoint"], run["model"], run["fold"])
    # What the workflow does: the manifests, one heatmap job per model (its first fold), then the report.
    manifests = {"features": root / "features" / "uni" / "manifest.csv", "tiles": root / "tiles" / "manifest.csv"}
    feature_manifest(list(features.values()), manifests["features"])
    tile_manifest(list(tiles.values()), [qc.get(s, "") for s in tiles], manifests["tiles"])
    out = root / "report"
    indexes = []
    for run in runs:
        if run["fold"] == 0:
            folder = out / "heatmaps" / "uni" / run["model"]
            draw_model_heatmaps(run["checkpoint"], "uni", run["model"], 0, root / "samples.csv", root / "splits.csv",
                                manifests["features"], manifests["tiles"], folder, f"{folder}.json", SETTINGS, seed=0)
            indexes.append(f"{folder}.json")
    doc = report_page.build_report(runs, out, SETTINGS, seed=0, sheet=root / "samples.csv",
                                   splits=root / "splits.csv", features={"uni": manifests["features"]},
                                   tiles=manifests["tiles"], heatmaps=indexes)
    return {"root": root, "out": out, "doc": doc, "runs": runs, "features": features, "sheet": sheet,
            "splits": splits, "manifests": manifests}


def test_json_numbers_match_prediction_files(study):
    doc = json.loads((study["out"] / "report.json").read_text())
    assert doc == json.loads(json.dumps(study["doc"]))  # what the page was rendered from is what is on disk
    for run in study["runs"]:
        row = next(r for r in doc["per_fold"] if (r["model"], r["fold"]) == (run["model"], run["fold"]))
        test = test_rows(run)
        assert row["test_auc"] == pytest.approx(roc_auc_score(test["label"], test["prob"]), abs=1e-12)
    for row in doc["summary"]:
        aucs = [r["test_auc"] for r in doc["per_fold"] if r["model"] == row["model"]]
        assert row["auc_mean"] == pytest.approx(np.mean(aucs)) and row["ci_low"] <= row["auc_mean"] <= row["ci_high"]
    # Comparison: gated against abmil, per fold and mean, on the same patients.
    comp = {r["fold"]: r for r in doc["comparison"]}
    assert set(comp) == {"0", "1", "mean"} and all(r["model"] == "abmil_gated" for r in comp.values())
    for fold in (0, 1):
        gated, base = test_rows(study["runs"][2 + fold]), test_rows(study["runs"][fold])
        diff = roc_auc_score(gated["label"], gated["prob"]) - roc_auc_score(base["label"], base["prob"])
        assert comp[str(fold)]["auc_diff"] == pytest.approx(diff, abs=1e-12)
        assert comp[str(fold)]["ci_low"] <= diff <= comp[str(fold)]["ci_high"]
    assert comp["mean"]["auc_diff"] == pytest.approx((comp["0"]["auc_diff"] + comp["1"]["auc_diff"]) / 2)
    on_disk = pd.read_csv(study["out"] / "comparison.csv", dtype={"fold": str})
    assert list(on_disk.columns) == report.COMPARISON_COLUMNS and len(on_disk) == 3


def test_cohort_and_splits_come_from_the_files(study):
    cohort = study["doc"]["cohort"]
    assert (cohort["n_slides"], cohort["n_patients"], cohort["n_slides_excluded"]) == (4, 4, 2)
    assert cohort["labels"] == {"0": {"slides": 2, "patients": 2}, "1": {"slides": 2, "patients": 2}}
    reasons = {r["slide_id"]: r["excluded"] for r in cohort["excluded"]}
    assert reasons == {"S-BAD": BROKEN, "S-EMPTY": "no tissue tiles"}
    for row in cohort["slides"]:
        with h5py.File(study["features"][row["slide_id"]]) as f:
            assert row["n_tiles"] == len(f["features"])
    usable = [r["n_tiles"] for r in cohort["slides"] if not r["excluded"]]
    assert min(usable) > 5 and cohort["tiles_per_slide"]["total"] == sum(usable)
    splits = pd.DataFrame(study["doc"]["splits"])
    test0 = splits[(splits["fold"] == 0) & (splits["partition"] == "test")].iloc[0]
    assert (test0["n_patients"], test0["n_slides"], test0["n_patients_positive"], test0["n_slides_without_tiles"]) \
        == (2, 2, 1, 0)
    val0 = splits[(splits["fold"] == 0) & (splits["partition"] == "val")].iloc[0]
    assert (val0["n_slides"], val0["n_slides_without_tiles"]) == (1, 1)


def test_heatmaps_show_each_models_top_tiles(study):
    heat = study["doc"]["heatmaps"]
    assert [(h["model"], h["slide_id"]) for h in heat] == [
        ("abmil", "S-POS"), ("abmil", "S-NEG"), ("abmil_gated", "S-POS"), ("abmil_gated", "S-NEG")]
    for item in heat:
        run = next(r for r in study["runs"] if (r["model"], r["fold"]) == (item["model"], 0))
        model, ckpt = load_checkpoint(run["checkpoint"])
        with h5py.File(study["features"][item["slide_id"]]) as f:
            feats, coords = f["features"][()], f["coords"][()]
        attention, prob = tile_attention(model, ckpt, feats)
        top = np.argsort(-attention)[:4]
        assert [(t["x"], t["y"]) for t in item["top"]] == [tuple(coords[i]) for i in top]
        assert item["prob"] == pytest.approx(prob, abs=1e-6)
        image = mpimg.imread(study["out"] / item["file"])
        assert image.shape[0] > 600 and image[..., :3].std() > 0.05


def _row(page: str, row_id: str) -> list[str]:
    match = re.search(rf'<tr id="{re.escape(row_id)}"[^>]*>(.*?)</tr>', page)
    assert match, f"no table row {row_id}"
    return [re.sub("<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", match.group(1))]


def test_html_shows_the_json_numbers_and_is_self_contained(study):
    page = (study["out"] / "report.html").read_text()
    doc = study["doc"]
    for row in doc["summary"]:
        cells = _row(page, f"summary-{row['extractor']}-{row['model']}")
        assert cells[3] == f"{row['auc_mean']:.3f} ± {row['auc_std']:.3f}"
        assert cells[4] == f"{row['ci_low']:.3f} – {row['ci_high']:.3f}"
    for row in doc["comparison"]:
        cells = _row(page, f"comparison-uni-abmil_gated-{row['fold']}")
        assert cells[6] == f"{row['auc_diff']:+.3f}" and cells[7] == f"{row['ci_low']:+.3f} – {row['ci_high']:+.3f}"
    assert BROKEN in page and "no tissue tiles" in page
    # Self-contained: every image is a data URI, no scripts, no external stylesheet; links are relative and resolve.
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 2 + 2 + 1 + 4 + 2  # ROC, training, comparison, heatmaps, QC examples
    assert all(s.startswith("data:image/") for s in sources)
    assert "<script" not in page and "<link" not in page and "http" not in page
    links = [h for h in re.findall(r"href='([^']*)'", page) if not h.startswith("#")]
    assert any(h.endswith("qc/S-POS.png") for h in links) and "cohort.csv" in links
    for href in links:
        assert not os.path.isabs(href) and (study["out"] / href).exists(), href


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    if shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=600,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if shutil.which("chromium"):
            return shutil.which("chromium")
    pytest.skip("no chromium/chrome found and `apt-get install chromium` was not possible")


def _headless(browser, study, tmp_path, *args):
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", *args,
           (study["out"] / "report.html").as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_page_opens_in_a_headless_browser(study, tmp_path):
    browser = _chromium()
    shot = tmp_path / "report.png"
    proc = _headless(browser, study, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The page's own console messages (script errors, failed loads) are logged as CONSOLE lines.
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "net::ERR" in line]
    assert not console, console
    image = mpimg.imread(shot)
    assert image.shape[:2] == (2000, 1280)
    assert image[..., :3].std() > 0.05 and (image[..., :3] < 0.5).mean() > 0.005  # text and figures drawn
    dom = _headless(browser, study, tmp_path, "--dump-dom")
    assert dom.returncode == 0
    for section in ("results", "comparison", "roc", "training", "heatmaps", "cohort", "splits", "qc"):
        assert f'id="{section}"' in dom.stdout
    assert "abmil_gated" in dom.stdout and "S-BAD" in dom.stdout


def test_precomputed_features_skip_heatmaps_with_a_note(study, tmp_path):
    doc = report_page.build_report(study["runs"][:2], tmp_path, SETTINGS, seed=0, sheet=study["root"] / "samples.csv",
                                   splits=study["root"] / "splits.csv", features={"uni": study["manifests"]["features"]})
    assert doc["heatmaps"] == [] and "precomputed" in doc["heatmap_notes"][0]
    assert doc["qc"] is None and doc["comparison"] == []  # one model only: nothing to compare
    page = (tmp_path / "report.html").read_text()
    assert "precomputed" in page and "Only one model" in page and not (tmp_path / "heatmaps").exists()
    assert doc["cohort"]["n_slides_excluded"] == 2


def test_cli_renders_the_same_report(study, tmp_path):
    runs_json = tmp_path / "runs.json"
    runs_json.write_text(json.dumps(study["runs"]))
    assert report_page.main(["--runs", str(runs_json), "--out", str(tmp_path / "out"),
                             "--sheet", str(study["root"] / "samples.csv"), "--splits", str(study["root"] / "splits.csv"),
                             "--features-dir", str(study["root"] / "features"), "--tiles-dir", str(study["root"] / "tiles"),
                             "--settings", json.dumps(SETTINGS)]) == 0
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    expected = json.loads((study["out"] / "report.json").read_text())
    for key in ("summary", "per_fold", "comparison", "cohort", "splits"):
        assert doc[key] == expected[key], key
    assert [h["slide_id"] for h in doc["heatmaps"]] == [h["slide_id"] for h in expected["heatmaps"]]
