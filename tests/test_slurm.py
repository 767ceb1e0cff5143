"""The tiny DAG through a real (one-node, local) SLURM cluster with profiles/slurm.

The cluster comes from scripts/slurm-local.sh, which starts slurmctld, slurmd and munged (as root)
but installs nothing: .ci/run installs slurm-wlm and munge, and without them this test skips. The
results must equal those of the local run of the same config (`tiny_sheet_run`), which also makes
this the determinism test: same config, same machine, two runs, identical splits, predictions and AUCs.
"""

import os
import re
import shutil
import subprocess

import pandas as pd
import pytest
import yaml
from factories import ROOT, snakemake_cli


SCRIPT = ROOT / "scripts" / "slurm-local.sh"
PARTITION = "slidemil_test"
SLURM_TOOLS = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "sinfo")
MISSING = [tool for tool in SLURM_TOOLS if not shutil.which(tool)]

# Checked before any fixture runs (the tiny run this test compares with takes a minute).
pytestmark = [
    pytest.mark.workflow,
    pytest.mark.slurm,
    pytest.mark.skipif(bool(MISSING), reason=f"SLURM is not installed (no {', '.join(MISSING)}): "
                       "apt-get install slurm-wlm munge, as .ci/run does"),
    pytest.mark.skipif(os.geteuid() != 0, reason="starting a local SLURM cluster (slurmctld, slurmd, munged) "
                       "needs root"),
]


@pytest.fixture(scope="module")
def slurm_cluster():
    env = dict(os.environ, SLURM_LOCAL_PARTITION=PARTITION)
    proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0:
        pytest.skip(f"local SLURM cluster could not start: {proc.stderr.strip().splitlines()[-1:]}")
    conf = re.search(r"export SLURM_CONF=(\S+)", proc.stdout).group(1)
    # A cluster this script had already started keeps its partition name.
    partition = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, check=True,
                               env=dict(env, SLURM_CONF=conf)).stdout.split()[0]
    yield conf, partition
    subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, timeout=120, env=env)


def test_profile_on_local_slurm_equals_local_run(slurm_cluster, tiny_sheet_run, tmp_path):
    slurm_conf, partition = slurm_cluster
    # The profile as a user edits it: partition set; this test node has 2 CPUs and no GPU.
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    profile["default-resources"]["slurm_partition"] = partition
    for res in profile["set-resources"].values():
        res.update(gpu=0, cpus_per_task=1, mem_mb=min(res["mem_mb"], 2000))
    profile["resources"].update(cpus_per_task=min(2, os.cpu_count()), mem_mb=4000)
    # Same threads as the local run, so that the numbers can be compared bit for bit.
    profile["set-threads"] = {rule: 1 for rule in profile["set-threads"]}
    profile.update({"slurm-status-command": "squeue",    # no accounting database here: sacct cannot answer
                    "slurm-init-seconds-before-status-checks": 2, "slurm-keep-successful-logs": True,
                    "latency-wait": 5})
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "config.yaml").write_text(yaml.safe_dump(profile))
    shutil.copy(tiny_sheet_run / "config.yaml", tmp_path / "config.yaml")   # same sheet, same settings

    env = dict(os.environ, SLURM_CONF=slurm_conf)
    proc = snakemake_cli(tmp_path, "--profile", str(tmp_path / "profile"), timeout=1500, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]

    # Every job went through the scheduler: SLURM job ids in Snakemake's log, completed in squeue,
    # and the per-slide jobs grouped into few submissions.
    slurm_ids = set(re.findall(r"SLURM jobid (\d+)", out))
    assert slurm_ids, out[-3000:]
    states = subprocess.run(["squeue", "--states=all", "-h", "-o", "%i|%T|%k"], capture_output=True,
                            text=True, env=env, check=True).stdout
    state = {line.split("|")[0]: line.split("|", 2)[1:] for line in states.splitlines()}
    assert all(state[i][0] == "COMPLETED" for i in slurm_ids), states
    comments = [state[i][1] for i in slurm_ids]
    n_slides = len(pd.read_csv(tiny_sheet_run / "cohort" / "sheet.csv"))
    assert sum(c.startswith("rule_per_slide") for c in comments) == 1   # 2 x n_slides jobs in one SLURM job
    assert {"rule_splits", "rule_report"} <= set(comments)
    assert sum(c.startswith("rule_train") for c in comments) == 2
    assert sum(c.startswith("rule_heatmaps") for c in comments) == 1
    # per-slide group, splits, 2 folds, the model's heatmaps, the report
    assert len(slurm_ids) == 6 < 2 * n_slides
    logs = list((tmp_path / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert {p.stem for p in logs} == slurm_ids

    # Same results as the local run.
    here, there = tmp_path / "results", tiny_sheet_run / "results"
    pd.testing.assert_frame_equal(pd.read_csv(here / "splits" / "splits.csv"),
                                  pd.read_csv(there / "splits" / "splits.csv"))
    for fold in (0, 1):
        for name in ("predictions_slides.csv", "predictions_patients.csv"):
            path = f"train/shufflenet_v2/abmil/fold_{fold}/{name}"
            pd.testing.assert_frame_equal(pd.read_csv(here / path), pd.read_csv(there / path), check_exact=True)
    for name in ("per_fold.csv", "summary.csv", "excluded.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(here / "report" / name), pd.read_csv(there / "report" / name),
                                      check_exact=True)
