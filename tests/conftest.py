"""Fixtures shared by the test files; the data they build comes from tests/factories.py."""

import pytest

from factories import make_tiny_cohort, SHARED_DATA, snakemake_cli, TINY_SHEET_CONFIG


@pytest.fixture
def shared_slides():
    """Real third-party slides from ../shared/data/slides (never copied into the repository)."""
    folder = SHARED_DATA / "slides"
    if not folder.is_dir():
        pytest.skip(f"third-party test slides not found at {folder}")
    return folder


# ---- one small finished run shared by the rerun, fault and SLURM tests (issue 5) ----


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
