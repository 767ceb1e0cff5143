"""slidemil as a Snakemake module of another workflow, the way snakedeploy sets one up.

The wrapper workflow lives in its own folder with its own config and sample sheet, declares

    module slidemil:
        snakefile: "<this repository>/workflow/Snakefile"
        config: config
    use rule * from slidemil as slidemil_*

and runs a tiny cohort to the report. Given `config:`, Snakemake skips the module's own `configfile:`, so the
wrapper's config is complete: config/config.yaml with the tiny settings on top.
"""

import copy
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from factories import ROOT, TINY_SHEET_CONFIG, make_tiny_cohort

pytestmark = pytest.mark.workflow

WRAPPER = """\
configfile: "config/config.yaml"


module slidemil:
    snakefile:
        "{snakefile}"
    config:
        config


use rule * from slidemil as slidemil_*


# A rule of the wrapper's own, downstream of the module's report.
rule collect:
    input:
        rules.slidemil_report.output.html,
    output:
        "collected.txt",
    shell:
        "echo {{input}} > {{output}}"
"""


def deep_update(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def snakemake(workdir, *args, timeout=900, env=None):
    # No -s: Snakemake finds the wrapper's workflow/Snakefile, as it would for a user.
    cmd = [sys.executable, "-m", "snakemake", *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env)


def test_workflow_runs_as_a_module_of_another_workflow(tmp_path):
    sheet = make_tiny_cohort(tmp_path / "cohort")
    wrapper = tmp_path / "analysis"
    (wrapper / "workflow").mkdir(parents=True)
    (wrapper / "config").mkdir()
    (wrapper / "workflow" / "Snakefile").write_text(WRAPPER.format(snakefile=ROOT / "workflow" / "Snakefile"))
    defaults = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    # Its own results folder: the module must take every path from the config it is given.
    config = deep_update(defaults, dict(TINY_SHEET_CONFIG, samples=str(sheet), results="slidemil_out"))
    (wrapper / "config" / "config.yaml").write_text(yaml.safe_dump(config))

    # The default target is the module's `all` (default_target), renamed slidemil_all.
    proc = snakemake(wrapper, "--cores", "2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "rule slidemil_all:" in out and "rule slidemil_tile_slide:" in out and "rule slidemil_report:" in out
    report = wrapper / "slidemil_out" / "report"
    assert (report / "report.html").stat().st_size > 0
    summary = pd.read_csv(report / "summary.csv")
    assert set(summary["model"]) == {"abmil"} and set(summary["extractor"]) == {"shufflenet_v2"}
    assert len(pd.read_csv(report / "per_fold.csv")) == 2
    # The unusable slides were excluded by the module's step scripts (the rule names carry the prefix).
    assert {"BAD-NOMPP", "BAD-BLANK"} <= set(pd.read_csv(report / "excluded.csv")["slide_id"])
    tiles = pd.read_csv(wrapper / "slidemil_out" / "tiles" / "manifest.csv")
    assert "qc" in tiles.columns and len(tiles) == len(pd.read_csv(sheet))
    assert not (wrapper / "results").exists() and not (ROOT / "slidemil_out").exists()

    # The wrapper's own rule builds on the module's outputs; then there is nothing left to do.
    proc = snakemake(wrapper, "--cores", "1", "collect")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (wrapper / "collected.txt").read_text().strip() == "slidemil_out/report/report.html"
    proc = snakemake(wrapper, "-n", "--cores", "1")
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr, proc.stderr[-3000:]


# A `run:` rule runs inside the Snakemake process, so it sees the environment conda would be created with.
SOURCE_RULE = """
import os


rule source:
    output:
        "source.txt",
    run:
        with open(output[0], "w") as out:
            out.write(os.environ.get("SLIDEMIL_SOURCE", "unset"))
"""


def test_the_jobs_conda_environment_installs_the_module_checkout(tmp_path):
    """envs/slidemil.yaml installs `-e ${SLIDEMIL_SOURCE}`; loaded as a module, the workflow sets it to its own
    checkout (not the wrapper's folder, where Snakemake runs conda), and a value the user set is kept."""
    wrapper = tmp_path / "analysis"
    (wrapper / "workflow").mkdir(parents=True)
    (wrapper / "workflow" / "Snakefile").write_text(
        WRAPPER.format(snakefile=ROOT / "workflow" / "Snakefile") + SOURCE_RULE)
    (wrapper / "config").mkdir()
    (wrapper / "config" / "config.yaml").write_text("results: slidemil_out\n")  # the rest from the defaults
    env = {k: v for k, v in os.environ.items() if k != "SLIDEMIL_SOURCE"}

    proc = snakemake(wrapper, "--cores", "1", "source", env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    source = (wrapper / "source.txt").read_text()
    assert source == str(ROOT) and (ROOT / "pyproject.toml").is_file()

    (wrapper / "source.txt").unlink()
    proc = snakemake(wrapper, "--cores", "1", "source", env=dict(env, SLIDEMIL_SOURCE="/opt/slidemil"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (wrapper / "source.txt").read_text() == "/opt/slidemil"
