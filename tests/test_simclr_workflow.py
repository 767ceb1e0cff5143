"""SimCLR pre-training and the tile-supervised baseline inside the whole DAG, through the Snakemake CLI."""

import copy
import re

import h5py
import pandas as pd
import pytest
import torch
import yaml
from factories import job_counts, snakemake_cli, TINY


pytestmark = pytest.mark.workflow

CONFIG = copy.deepcopy(TINY)
CONFIG["demo"] = {"n_patients": 10, "slide_px": [1024, 1024]}
CONFIG["features"] = {"extractors": ["shufflenet_simclr"],
                      "settings": {"shufflenet_simclr": {"weights": "simclr", "input_px": 64, "dtype": "float32"}}}
CONFIG["simclr"] = {"epochs": 1, "batch_size": 16, "tiles_per_slide": 4, "input_px": 64}
CONFIG["mil"] = {
    "models": ["abmil", "tile_supervised"],
    "training": {"epochs": 3, "patience": 3},
    "settings": {"tile_supervised": {"init": "simclr", "input_px": 64, "tiles_per_slide": 4,
                                     "eval_tiles_per_slide": 8, "epochs": 1, "batch_size": 16}},
}


def dag_edges(workdir):
    """(upstream rule, downstream rule) pairs of the job graph, from ``snakemake --dag``."""
    proc = snakemake_cli(workdir, "--cores", "2", "--dag")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Node labels are the rule name, then the wildcards after an escaped newline.
    names = {n: label.split("\\n")[0] for n, label in re.findall(r'^\s*(\d+)\[label = "([^"]+)"', proc.stdout, re.M)}
    return {(names[a], names[b]) for a, b in re.findall(r"^\s*(\d+) -> (\d+)", proc.stdout, re.M)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("simclr_workflow")
    (workdir / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    edges = dag_edges(workdir)
    proc = snakemake_cli(workdir, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-5000:]
    return workdir, edges


def test_simclr_runs_between_splits_and_extraction(run):
    _, edges = run
    assert ("splits", "pretrain_simclr") in edges and ("tile_slide", "pretrain_simclr") in edges
    assert ("pretrain_simclr", "extract_features") in edges
    assert ("pretrain_simclr", "train_tiles") in edges and ("train_tiles", "report") in edges


def test_features_come_from_the_cohort_backbone_trained_without_test_slides(run):
    workdir, _ = run
    res = workdir / "results"
    backbone = torch.load(res / "simclr" / "shufflenet_v2" / "backbone.pt", weights_only=True)
    splits = pd.read_csv(res / "splits" / "splits.csv")
    test = set(splits.loc[(splits.filter(like="fold_") == "test").any(axis=1), "slide_id"])
    assert test and not test & set(backbone["slides"])
    for slide in splits["slide_id"]:
        with h5py.File(res / "features" / "shufflenet_simclr" / f"{slide}.h5") as f:
            assert f.attrs["weights_digest"] == backbone["weights_digest"]
    assert len(pd.read_csv(res / "simclr" / "shufflenet_v2" / "loss.csv")) >= 1


def test_report_has_simclr_mil_and_tile_supervised_rows(run):
    workdir, _ = run
    per_fold = pd.read_csv(workdir / "results" / "report" / "per_fold.csv")
    assert set(zip(per_fold["extractor"], per_fold["model"])) == {("shufflenet_simclr", "abmil"),
                                                                  ("tiles", "tile_supervised")}
    assert len(per_fold) == 4
    assert (workdir / "results" / "report" / "roc_tiles_tile_supervised.png").is_file()


def planned_jobs(workdir, changed) -> dict[str, int]:
    """Jobs a dry run plans under the ``changed`` config (the run's own config is put back after)."""
    (workdir / "config.yaml").write_text(yaml.safe_dump(changed))
    try:
        proc = snakemake_cli(workdir, "--cores", "2", "-n")
    finally:
        (workdir / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return job_counts(proc.stdout + proc.stderr)


# simclr.precision is optional and absent from CONFIG: the schema accepts it and it reruns like any setting.
@pytest.mark.parametrize("key, value", [("temperature", 0.2), ("precision", "bf16")])
def test_a_simclr_change_reruns_pretraining_and_what_uses_it(run, key, value):
    workdir, _ = run
    changed = copy.deepcopy(CONFIG)
    changed["simclr"][key] = value
    jobs = planned_jobs(workdir, changed)
    n_slides = len(pd.read_csv(workdir / "results" / "splits" / "splits.csv"))
    assert jobs.get("pretrain_simclr") == 1 and jobs.get("extract_features") == n_slides
    assert jobs.get("train_tiles") == 2 and "tile_slide" not in jobs and "splits" not in jobs


def test_a_tile_supervised_precision_reruns_only_that_model(run):
    workdir, _ = run
    changed = copy.deepcopy(CONFIG)
    changed["mil"]["settings"]["tile_supervised"]["precision"] = "bf16"
    assert planned_jobs(workdir, changed) == {"train_tiles": 2, "report": 1}
