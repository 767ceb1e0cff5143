"""Issue 21, items 1-3: splits over usable slides, reruns after a failure, missing or damaged intermediate files.

Unit tests first (splits, the damaged-file error, the report's fold notes and provenance), then one tiny
workflow run (module fixture, about a minute on 2 cores) that a failed retrain, a deleted feature file and
a truncated tiles file are played against.
"""

import copy
import json
import math

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from factories import job_counts, make_tiny_cohort, snakemake_cli, TINY_SHEET_CONFIG

from slidemil.cohort.manifest import feature_manifest, tile_manifest
from slidemil.cohort.splits import make_splits, unusable_slides
from slidemil.config import Splits
from slidemil.errors import CorruptFileError, FeatureFileError, SplitError
from slidemil.files.features import map_features, read_features, read_features_attrs, write_features
from slidemil.files.splits import fold_columns, read_fold
from slidemil.files.tiles import read_tiles_attrs, write_tiles
from slidemil.report.page import fold_notes, provenance

EXTRACTOR = "shufflenet_v2"


# ---- item 1: splits over the patients with a usable slide ----------------------------------------

def _cohort_of_ten():
    """The issue's cohort: 10 one-slide patients, 3 of their slides unusable; and the exclusions."""
    labels = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    sheet = pd.DataFrame({"slide_id": [f"S{i}" for i in range(10)], "patient_id": [f"P{i}" for i in range(10)],
                          "path": "x", "label": labels})
    excluded = {"S0": "no tissue tiles", "S3": "unreadable", "S7": "no mpp"}
    return sheet, excluded


@pytest.mark.parametrize("seed", range(6))
def test_unusable_slides_take_no_place_in_any_fold(seed):
    sheet, excluded = _cohort_of_ten()
    splits = make_splits(sheet, Splits(folds=2, test_fraction=0.25), seed=seed, excluded=excluded)
    rows = splits.set_index("slide_id")
    for column in fold_columns(splits):
        assert (rows.loc[list(excluded), column] == "excluded").all()
        # the test set is drawn over the 7 usable patients: 2 of them, one of each class
        test = rows[rows[column] == "test"]
        assert len(test) == 2 and sorted(test["label"].astype(int)) == [0, 1]
        assert not set(test.index) & set(excluded)
    assert rows.loc["S3", "excluded"] == "unreadable"
    assert set(rows.loc[[s for s in rows.index if s not in excluded], "excluded"].fillna("")) == {""}


def test_a_patients_unusable_slide_is_excluded_while_its_other_slide_is_used():
    sheet, _ = _cohort_of_ten()
    extra = pd.DataFrame([{"slide_id": "S1-b", "patient_id": "P1", "path": "x", "label": 1}])
    splits = make_splits(pd.concat([sheet, extra]), Splits(folds=2, test_fraction=0.25), seed=0,
                         excluded={"S1-b": "no tissue tiles"})
    rows = splits.set_index("slide_id")
    assert (rows.loc["S1-b", fold_columns(splits)] == "excluded").all()
    assert (rows.loc["S1", fold_columns(splits)] != "excluded").all()
    assert int(rows.loc["S1-b", "label"]) == 1


def test_no_usable_slide_is_one_line():
    sheet, _ = _cohort_of_ten()
    with pytest.raises(SplitError) as err:
        make_splits(sheet, Splits(folds=2), excluded={s: "no tissue tiles" for s in sheet["slide_id"]})
    assert str(err.value).startswith("no usable slide: all 10 slides") and "\n" not in str(err.value)


def test_an_empty_test_set_after_exclusion_is_one_line():
    sheet, excluded = _cohort_of_ten()
    sheet["is_test"] = sheet["slide_id"].isin(["S0", "S3"])
    with pytest.raises(SplitError, match=r"^no usable slide in the test set of fold 0: 3 slide\(s\) are excluded"):
        make_splits(sheet, Splits(folds=2, test_column="is_test"), excluded=excluded)


def test_predefined_folds_leave_unusable_slides_out():
    labels = [i % 2 for i in range(24)]
    sheet = pd.DataFrame({"slide_id": [f"S{i}" for i in range(24)], "patient_id": [f"P{i}" for i in range(24)],
                          "path": "x", "label": labels, "fold": [i % 3 for i in range(24)]})
    excluded = {"S0": "no tissue tiles", "S4": "unreadable"}
    splits = make_splits(sheet, Splits(fold_column="fold"), excluded=excluded)
    rows = splits.set_index("slide_id")
    assert (rows.loc[list(excluded), fold_columns(splits)] == "excluded").all().all()
    assert (rows.loc["S3", "fold_0"], rows.loc["S1", "fold_1"]) == ("test", "test")
    every_fold_2 = {f"S{i}": "no mpp" for i in range(2, 24, 3)}
    with pytest.raises(SplitError, match=r"^no usable slide in the test set of fold 2: its 8 slide\(s\) in 'fold'"):
        make_splits(sheet, Splits(fold_column="fold"), excluded=every_fold_2)


def test_unusable_slides_read_from_a_tile_manifest(tmp_path):
    good, blank = tmp_path / "good.h5", tmp_path / "blank.h5"
    write_tiles(good, np.zeros((4, 2)), {"excluded": ""})
    write_tiles(blank, np.zeros((0, 2)), {"excluded": "blank.tiff: no tissue tiles found"})
    tile_manifest([str(good), str(blank)], [], tmp_path / "manifest.csv")
    assert unusable_slides(tmp_path / "manifest.csv") == {"blank": "blank.tiff: no tissue tiles found"}
    # a manifest from before the excluded column: the reason comes from the slide's tiles file
    pd.read_csv(tmp_path / "manifest.csv").drop(columns="excluded").to_csv(tmp_path / "old.csv", index=False)
    assert unusable_slides(tmp_path / "old.csv") == {"blank": "blank.tiff: no tissue tiles found"}


# ---- item 3: damaged intermediate files are named, and removed by the manifests ---------------

def _truncated(path, n_bytes=2000):
    data = path.read_bytes()
    path.write_bytes(data[:n_bytes])
    return path


def test_a_truncated_feature_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "S1.h5"
    write_features(path, np.ones((50, 64), np.float32), np.zeros((50, 2)), {"extractor": "x"})
    _truncated(path)
    for read in (read_features_attrs, map_features, read_features):
        with pytest.raises(FeatureFileError) as err:
            read(path)
        message = str(err.value)
        assert message.startswith(f"{path}: feature file damaged or truncated") and "\n" not in message
        assert "delete it and run the workflow again" in message


def test_the_manifests_remove_a_damaged_file_so_that_it_is_made_again(tmp_path):
    good, bad = tmp_path / "S1.h5", tmp_path / "S2.h5"
    for path in (good, bad):
        write_features(path, np.ones((50, 64), np.float32), np.zeros((50, 2)), {"extractor": "x"})
    _truncated(bad)
    with pytest.raises(CorruptFileError, match="S2.h5: feature file damaged .*removed it: run the workflow again"):
        feature_manifest([str(good), str(bad)], tmp_path / "manifest.csv")
    assert good.exists() and not bad.exists() and not (tmp_path / "manifest.csv").exists()

    tiles = tmp_path / "T1.h5"
    write_tiles(tiles, np.zeros((40, 2)), {})
    _truncated(tiles, 1000)
    with pytest.raises(CorruptFileError, match="T1.h5: tiles file damaged"):
        read_tiles_attrs(tiles)
    with pytest.raises(CorruptFileError, match="removed it"):
        tile_manifest([str(tiles)], [], tmp_path / "tiles.csv")
    assert not tiles.exists()


def test_a_missing_feature_file_is_one_line_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"S9.h5: feature file not found; run the workflow again"):
        map_features(tmp_path / "S9.h5")


# ---- the report: why a fold has no test AUC; what made it ----------------------------------------

def test_fold_notes_say_why_a_fold_has_no_test_auc():
    per_fold = pd.DataFrame([
        {"extractor": "e", "model": "abmil", "fold": 0, "n_test_patients": 0, "n_test_positive": 0, "test_auc": math.nan},
        {"extractor": "e", "model": "abmil", "fold": 1, "n_test_patients": 3, "n_test_positive": 0, "test_auc": math.nan},
        {"extractor": "e", "model": "abmil", "fold": 2, "n_test_patients": 4, "n_test_positive": 2, "test_auc": 0.75},
    ])
    notes = fold_notes(per_fold)
    assert len(notes) == 2
    assert notes[0].startswith("e / abmil fold 0: no test AUC: its test set has no usable patient")
    assert "fold 1: no test AUC: its 3 test patient(s) are all negative" in notes[1]


def test_provenance_digest_follows_the_settings():
    a = provenance({"mil": {"training": {"epochs": 8}}})
    b = provenance({"mil": {"training": {"epochs": 9}}})
    assert a["settings_digest"] != b["settings_digest"] and len(a["settings_digest"]) == 12
    assert a["slidemil_version"] and a == provenance({"mil": {"training": {"epochs": 8}}})


# ---- the workflow: a failed retrain, a deleted and a truncated file ------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("integrity_run")
    sheet = make_tiny_cohort(workdir / "cohort")
    (workdir / "config.yaml").write_text(yaml.safe_dump(dict(TINY_SHEET_CONFIG, samples=str(sheet))))
    proc = snakemake_cli(workdir, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-5000:]
    return workdir


def _config(workdir, **edits) -> str:
    config = copy.deepcopy(yaml.safe_load((workdir / "config.yaml").read_text()))
    for dotted, value in edits.items():
        node = config
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    (workdir / "edited.yaml").write_text(yaml.safe_dump(config))
    return "edited.yaml"


def _dry_run(workdir, configfile="config.yaml", *args) -> dict:
    proc = snakemake_cli(workdir, "-n", "--cores", "2", *args, configfile=configfile)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return job_counts(proc.stdout + proc.stderr)


@pytest.mark.workflow
def test_workflow_splits_leave_the_unusable_slides_out(tiny_run):
    splits = pd.read_csv(tiny_run / "results" / "splits" / "splits.csv", dtype=str, keep_default_na=False)
    tiles = pd.read_csv(tiny_run / "results" / "tiles" / "manifest.csv", dtype=str, keep_default_na=False)
    unusable = dict(zip(tiles.loc[tiles["excluded"] != "", "slide_id"], tiles.loc[tiles["excluded"] != "", "excluded"]))
    assert {"BAD-NOMPP", "BAD-BLANK"} <= set(unusable)
    rows = splits.set_index("slide_id")
    for slide, reason in unusable.items():
        assert (rows.loc[slide, fold_columns(splits)] == "excluded").all() and rows.loc[slide, "excluded"] == reason
    for fold in (0, 1):
        used = read_fold(tiny_run / "results" / "splits" / "splits.csv", fold)
        assert not set(used["slide_id"]) & set(unusable)
        assert sorted(used.loc[used["partition"] == "test"].drop_duplicates("patient_id")["label"]) == [0, 1]


@pytest.mark.workflow
def test_a_failed_retrain_is_redone_down_to_the_report(tiny_run):
    import torch

    if torch.cuda.is_available():
        pytest.skip("compute.device: cuda does not fail on a machine with a GPU")
    report = tiny_run / "results" / "report" / "report.json"
    before = json.loads(report.read_text())["provenance"]
    failing = snakemake_cli(tiny_run, "--cores", "2", configfile=_config(tiny_run, mil__training__epochs=9,
                                                                          compute__device="cuda"))
    assert failing.returncode != 0 and "Error in rule train" in failing.stdout + failing.stderr
    fixed = _config(tiny_run, mil__training__epochs=9)
    # Snakemake alone said "Nothing to be done" here, and kept the old report
    assert _dry_run(tiny_run, fixed) == {"train": 2, "heatmaps": 1, "report": 1}
    proc = snakemake_cli(tiny_run, "--cores", "2", configfile=fixed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads(report.read_text())["provenance"]
    assert after["run_settings"]["mil"]["training"]["epochs"] == 9
    assert after["settings_digest"] != before["settings_digest"]
    assert after["settings_digest"] in (tiny_run / "results" / "report" / "report.html").read_text()
    assert _dry_run(tiny_run, fixed) == {}


@pytest.mark.workflow
def test_deleted_and_truncated_files_are_named_and_made_again(tiny_run):
    features = tiny_run / "results" / "features" / EXTRACTOR
    config = _config(tiny_run, mil__training__epochs=9)  # the settings of the last run
    (features / "DEMO-P002-S1.h5").unlink()
    expected = {"extract_features": 1, "feature_manifest": 1, "train": 2, "heatmaps": 1, "report": 1}
    assert _dry_run(tiny_run, config) == expected

    tiles = tiny_run / "results" / "tiles" / "DEMO-P003-S1.h5"
    _truncated(tiles)
    # --keep-going: the slide's feature job fails on the same file, and may fail first; the manifest job
    # must still run for its line to be checked.
    proc = snakemake_cli(tiny_run, "--cores", "2", "--keep-going", configfile=config)
    assert proc.returncode != 0
    log = (tiny_run / "results" / "logs" / "tiling" / "manifest.log").read_text()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"{tiles.relative_to(tiny_run)}: tiles file damaged or truncated" in errors[0], log
    assert "removed it" in errors[0] and "Traceback" not in log and not tiles.exists()
    # As the shipped profiles do (rerun-incomplete: true): a job cut short by the failure is redone.
    counts = _dry_run(tiny_run, config, "--rerun-incomplete")
    assert counts["tile_slide"] == 1 and counts["report"] == 1 and counts["splits"] == 1
    proc = snakemake_cli(tiny_run, "--cores", "2", "--rerun-incomplete", configfile=config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with h5py.File(tiles) as f:
        assert len(f["coords"]) > 0
    assert _dry_run(tiny_run, config) == {}
