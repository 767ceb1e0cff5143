import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_slides():
    """Real third-party slides from ../shared/data/slides (never copied into the repository)."""
    folder = SHARED_DATA / "slides"
    if not folder.is_dir():
        pytest.skip(f"third-party test slides not found at {folder}")
    return folder


# ---- one small finished run shared by the rerun, fault and SLURM tests (issue 5) ----

# TINY of test_workflow.py on a user sample sheet: the demo's slides plus three unusable ones.
TINY_SHEET_CONFIG = {
    "results": "results",
    "tiling": {"mpp": 1.0, "tile_px": 128},
    "features": {"extractors": ["shufflenet_v2"],
                 "settings": {"shufflenet_v2": {"weights": "random", "input_px": 128, "dtype": "float32"}}},
    "splits": {"folds": 2, "test_fraction": 0.25},
    "mil": {"models": ["abmil"], "training": {"epochs": 8, "patience": 4, "lr": 0.0005}},
    "report": {"n_bootstrap": 200},
    "compute": {"threads": 1, "loader_workers": 0, "batch_size": 32},
}


def snakemake_cli(workdir, *args, configfile="config.yaml", timeout=900, env=None):
    import subprocess
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow" / "Snakefile"), "--configfile", configfile, *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env)


def make_tiny_cohort(folder: Path) -> Path:
    """An 8-patient demo cohort plus unusable slides (no mpp, no tissue, unreadable); returns the sheet."""
    import pandas as pd
    from slidemil.demo.render import make_cohort, make_slide

    make_cohort(str(folder), n_patients=8, seed=7, slide_px=(1536, 1536))
    sheet = pd.read_csv(folder / "samples.csv", dtype=str)
    extra = folder / "extra"
    extra.mkdir()
    make_slide(str(extra / "nompp.tiff"), label=1, seed=3, slide_px=(768, 768), mpp=None, objective_power=None)
    make_slide(str(extra / "blank.tiff"), label=0, seed=4, slide_px=(768, 768), tissue=False)
    rows = [("BAD-NOMPP", "BAD-P1", "extra/nompp.tiff", "1"), ("BAD-BLANK", "BAD-P2", "extra/blank.tiff", "0")]
    unreadable = SHARED_DATA / "slides" / "bad" / "unreadable.svs"
    if unreadable.is_file():
        rows.append(("BAD-UNREADABLE", "DEMO-P001", str(unreadable), sheet.loc[0, "label"]))
    sheet = pd.concat([sheet, pd.DataFrame(rows, columns=["slide_id", "patient_id", "path", "label"])])
    sheet.to_csv(folder / "sheet.csv", index=False)
    return folder / "sheet.csv"


@pytest.fixture(scope="session")
def tiny_sheet_run(tmp_path_factory):
    """A finished run of the whole DAG on the tiny cohort (about a minute on 2 cores)."""
    import yaml

    workdir = tmp_path_factory.mktemp("tiny_run")
    sheet = make_tiny_cohort(workdir / "cohort")
    config = dict(TINY_SHEET_CONFIG, samples=str(sheet))
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake_cli(workdir, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-5000:]
    return workdir
