"""Issue 5 on one finished tiny run: what reruns after a config edit, excluded slides, bad sheets, kill -9.

The rerun table in the README is asserted here with dry runs (`snakemake -n`) against the run of
the `tiny_sheet_run` fixture, which is shared with tests/test_slurm.py.
"""

import copy
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from factories import job_counts, ROOT, snakemake_cli, TINY_SHEET_CONFIG


pytestmark = pytest.mark.workflow

EXTRACTOR = "shufflenet_v2"


def dry_run(workdir, config: dict) -> dict:
    (workdir / "edited.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake_cli(workdir, "-n", "--cores", "2", configfile="edited.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return job_counts(proc.stdout + proc.stderr)


def base_config(workdir) -> dict:
    return yaml.safe_load((workdir / "config.yaml").read_text())


def n_slides(workdir) -> int:
    return len(pd.read_csv(workdir / "cohort" / "sheet.csv"))


def _set(config, dotted, value):
    keys = dotted.split(".")
    node = config
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


# section edit -> what reruns; "N" stands for one job per slide. The README's table says the same.
# A new first-fold checkpoint redraws that model's heatmaps (one heatmaps job: one extractor, abmil).
RERUN_TABLE = [
    ("mil.training.epochs", 9, {"train": 2, "heatmaps": 1, "report": 1}),
    # optional, absent from config.yaml: the schema accepts it and it reruns training like any setting
    ("mil.training.precision", "bf16", {"train": 2, "heatmaps": 1, "report": 1}),
    ("mil.training.selection", "val_loss", {"train": 2, "heatmaps": 1, "report": 1}),
    ("mil.settings.abmil", {"embed_dim": 256, "attn_dim": 128, "dropout": 0.25}, {"train": 2, "heatmaps": 1, "report": 1}),
    ("report.n_bootstrap", 300, {"report": 1}),
    ("splits.folds", 3, {"splits": 1, "train": 3, "heatmaps": 1, "report": 1}),
    # the splits are drawn over the usable slides of the tile manifest, so they wait for it
    ("tiling.tile_px", 96, {"tile_slide": "N", "tile_manifest": 1, "extract_features": "N", "feature_manifest": 1,
                            "splits": 1, "train": 2, "heatmaps": 1, "report": 1}),
    (f"features.settings.{EXTRACTOR}.input_px", 96,
     {"extract_features": "N", "feature_manifest": 1, "train": 2, "heatmaps": 1, "report": 1}),
    # random weights are seeded
    ("seed", 1, {"extract_features": "N", "feature_manifest": 1, "splits": 1, "train": 2, "heatmaps": 1, "report": 1}),
    ("tiling.on_error", "fail", {}),
    # the survival columns shape only a survival task's splits
    ("splits.time_column", "os_months", {}),
    ("compute.batch_size", 7, {}),
    ("compute.loader_workers", 2, {}),
    ("compute.device", "cpu", {}),
    ("compute.threads", 2, {}),
    ("compute.train_threads", 2, {}),
]


def test_complete_run_has_nothing_to_do(tiny_sheet_run):
    assert dry_run(tiny_sheet_run, base_config(tiny_sheet_run)) == {}


def test_updating_the_shared_step_code_reruns_nothing(tiny_sheet_run):
    # Snakemake reruns a rule when its script is newer than the outputs; the scripts' shared module is not
    # a rule script, so changes that live there (workflow/scripts/_step.py) reach users without a rerun.
    step = ROOT / "workflow" / "scripts" / "_step.py"
    stat = step.stat()
    os.utime(step, (stat.st_atime, time.time() + 60))
    try:
        assert dry_run(tiny_sheet_run, base_config(tiny_sheet_run)) == {}
    finally:
        os.utime(step, (stat.st_atime, stat.st_mtime))


@pytest.mark.parametrize("key, value, expected", RERUN_TABLE, ids=[r[0] for r in RERUN_TABLE])
def test_config_edit_reruns_exactly_its_stages(tiny_sheet_run, key, value, expected):
    config = copy.deepcopy(base_config(tiny_sheet_run))
    _set(config, key, value)
    n = n_slides(tiny_sheet_run)
    assert dry_run(tiny_sheet_run, config) == {k: n if v == "N" else v for k, v in expected.items()}


def test_one_new_slide_runs_only_that_slide(tiny_sheet_run):
    cohort = tiny_sheet_run / "cohort"
    sheet = pd.read_csv(cohort / "sheet.csv", dtype=str)
    shutil.copy(cohort / "slides" / "DEMO-P002-S1.tiff", cohort / "extra" / "new.tiff")
    new = pd.DataFrame([{"slide_id": "NEW-S1", "patient_id": "NEW-P1", "path": "extra/new.tiff", "label": "1"}])
    pd.concat([sheet, new]).to_csv(cohort / "sheet_plus.csv", index=False)
    config = dict(base_config(tiny_sheet_run), samples=str(cohort / "sheet_plus.csv"))
    assert dry_run(tiny_sheet_run, config) == {
        "tile_slide": 1, "tile_manifest": 1, "extract_features": 1, "feature_manifest": 1, "splits": 1, "train": 2,
        "heatmaps": 1, "report": 1}
    (tiny_sheet_run / "edited.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake_cli(tiny_sheet_run, "-n", "--cores", "1", configfile="edited.yaml")
    assert "NEW-S1" in proc.stdout + proc.stderr


# ---- unusable slides: excluded with one line each, the run finishes ---------------------------

EXCLUDED = {"BAD-NOMPP": "no resolution", "BAD-BLANK": "no tissue tiles", "BAD-UNREADABLE": "smaller than one"}


def test_unusable_slides_are_excluded_and_reported(tiny_sheet_run):
    res = tiny_sheet_run / "results"
    sheet = pd.read_csv(tiny_sheet_run / "cohort" / "sheet.csv")
    expected = {s: m for s, m in EXCLUDED.items() if s in set(sheet["slide_id"])}
    assert len(expected) >= 2
    report = pd.read_csv(res / "report" / "excluded.csv")
    assert set(report["slide_id"]) == set(expected)
    md = (res / "report" / "summary.md").read_text()
    for slide, message in expected.items():
        reason = report.set_index("slide_id").loc[slide, "reason"]
        assert message in reason and reason in md
        with h5py.File(res / "tiles" / f"{slide}.h5") as t, h5py.File(res / "features" / EXTRACTOR / f"{slide}.h5") as f:
            assert t["coords"].shape == (0, 2) and f["features"].shape == (0, 1024)
            assert t.attrs["excluded"] == f.attrs["excluded"] == reason
        assert (res / "tiles" / "qc" / f"{slide}.png").stat().st_size > 0
        log = (res / "logs" / "tiling" / f"{slide}.log").read_text()
        errors = [line for line in log.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and slide in errors[0] and message in errors[0], log
        assert "Traceback" not in log
    # Usable slides carry an empty reason; training never saw the excluded ones.
    with h5py.File(res / "features" / EXTRACTOR / "DEMO-P001-S1.h5") as f:
        assert f.attrs["excluded"] == "" and len(f["features"]) > 0
    preds = pd.read_csv(res / "train" / EXTRACTOR / "abmil" / "fold_0" / "predictions_slides.csv")
    assert not set(preds["slide_id"]) & set(expected)


def test_on_error_fail_stops_only_the_bad_slide(tiny_sheet_run, tmp_path):
    """With tiling.on_error: fail the broken slide's job fails with its one line; --keep-going finishes the rest."""
    config = dict(base_config(tiny_sheet_run), results=str(tmp_path / "results"))
    config["tiling"] = dict(config["tiling"], on_error="fail")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    targets = [f"{tmp_path}/results/tiles/{s}.h5" for s in ("BAD-NOMPP", "DEMO-P001-S1", "DEMO-P002-S1")]
    proc = snakemake_cli(tmp_path, "--cores", "2", "--keep-going", *targets)
    assert proc.returncode != 0
    assert (tmp_path / "results" / "tiles" / "DEMO-P001-S1.h5").exists()
    assert (tmp_path / "results" / "tiles" / "DEMO-P002-S1.h5").exists()
    assert not (tmp_path / "results" / "tiles" / "BAD-NOMPP.h5").exists()
    log = (tmp_path / "results" / "logs" / "tiling" / "BAD-NOMPP.log").read_text()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "nompp.tiff" in errors[0] and "'mpp' column" in errors[0]
    assert "Error in rule tile_slide" in proc.stdout + proc.stderr


# ---- a malformed sample sheet is refused before any job, every problem at once -------------

def test_malformed_sheet_refused_before_any_job(tmp_path):
    (tmp_path / "a.tiff").write_bytes(b"x")
    (tmp_path / "sheet.csv").write_text(
        "slide_id,patient_id,path,label\n"
        "s1,p1,a.tiff,1\n"
        "s1,p2,a.tiff,0\n"          # duplicate slide id
        "s2,p1,a.tiff,0\n"          # p1 has two labels
        "s3,p3,missing.tiff,2\n"    # missing file; label 2: not binary
    )
    (tmp_path / "bad_cols.csv").write_text("slide_id,patient,path\ns1,p1,a.tiff\n")
    config = dict(TINY_SHEET_CONFIG, samples=str(tmp_path / "sheet.csv"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake_cli(tmp_path, "-n", "--cores", "1")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    for problem in ("5 problem(s)", "duplicate slide_id(s): s1", "different labels on their slides: p1",
                    "is listed under slide_ids s1, s2 (patients p1, p2)",
                    "missing.tiff", "the label column is not binary (values: 0, 1, 2)"):
        assert problem in out, out[-3000:]
    assert "Job stats" not in out and not (tmp_path / "results").exists()

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(dict(config, samples=str(tmp_path / "bad_cols.csv"))))
    proc = snakemake_cli(tmp_path, "-n", "--cores", "1")
    assert proc.returncode != 0 and "missing column(s) patient_id, label" in proc.stdout + proc.stderr


# ---- kill -9 in the middle of feature extraction ------------------------------------------

def test_kill_during_extraction_leaves_no_file_and_rerun_matches(shared_slides, tmp_path):
    slide = shared_slides / "CMU-1-Small-Region.svs"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "workflow"), OMP_NUM_THREADS="1")
    run = [sys.executable, "-m"]
    tiles = tmp_path / "tiles.h5"
    subprocess.run(run + ["slidemil.tiling.tile", str(slide), "--out", str(tiles), "--mpp", "1.0", "--tile-px", "64"],
                   env=env, check=True, capture_output=True, timeout=120)
    n_tiles = len(h5py.File(tiles)["coords"])
    assert n_tiles > 100

    def extract(out):
        return run + ["slidemil.features.extract", str(slide), "--tiles", str(tiles), "--out", str(out),
                      "--extractor", EXTRACTOR, "--weights", "random", "--input-px", "64",
                      "--batch-size", "8", "--threads", "1", "--device", "cpu"]

    out = tmp_path / "feats" / "slide.h5"
    proc = subprocess.Popen(extract(out), env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    progress = None
    deadline = time.time() + 120
    for line in proc.stderr:  # the first progress line: extraction is under way
        m = re.search(r"(\d+)/(\d+) tiles", line)
        if m and 0 < int(m.group(1)) < int(m.group(2)):
            progress = m.group(0)
            break
        assert time.time() < deadline
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert progress and proc.returncode == -signal.SIGKILL
    # Nothing half-written where a reader (or Snakemake) would take it for the result.
    assert not out.exists()
    leftovers = list(out.parent.glob("*")) if out.parent.exists() else []
    assert all(p.name.startswith(".") and p.name.endswith(".tmp") for p in leftovers)

    stale = out.parent / f".{out.name}.killed.tmp"   # what a kill during the final write leaves
    out.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"half an HDF5 file")
    subprocess.run(extract(out), env=env, check=True, capture_output=True, timeout=300)
    assert not stale.exists()
    reference = tmp_path / "reference.h5"
    subprocess.run(extract(reference), env=env, check=True, capture_output=True, timeout=300)
    with h5py.File(out) as a, h5py.File(reference) as b:
        assert a["features"].shape == (n_tiles, 1024)
        np.testing.assert_array_equal(a["features"][()], b["features"][()])
        np.testing.assert_array_equal(a["coords"][()], b["coords"][()])
