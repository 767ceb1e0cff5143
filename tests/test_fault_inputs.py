"""The fault cases of issue 21, items 6-10: bad input is refused early, with one line naming the file and the fix.

Run them alone with ``pytest -m faults``.
"""

from __future__ import annotations

import logging
import re
import urllib.error
from pathlib import Path

import pytest
import yaml

from factories import ROOT, snakemake_cli, tiled_slide, write_sheet
from slidemil import cli
from slidemil.cohort.sheet import load_sheet
from slidemil.config import ConfigError, check_config
from slidemil.demo.render import make_slide
from slidemil.errors import DeviceError, SheetError, WeightsError
from slidemil.names import SLIDE_ID_CHARS, SLIDE_ID_PATTERN

pytestmark = pytest.mark.faults

GOOD = [("S1", "P1", "a.svs", 1), ("S2", "P2", "b.svs", 0)]


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A stage's main sets up logging to the stderr of its test; later tests must not log to that closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    """``slidemil <argv>``: its exit status and its non-empty stderr lines (not what the test wrote before)."""
    capsys.readouterr()
    status = cli.main([str(a) for a in argv])
    return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def sheet_problems(sheet: Path, **settings) -> list[str]:
    with pytest.raises(SheetError) as info:
        load_sheet(sheet, **settings)
    return info.value.problems


# ---- item 6: slide ids and one slide under two ids ----


def test_slide_ids_outside_the_rule_are_refused_with_their_rows(tmp_path):
    rows = GOOD + [("s{x}", "P3", "c.svs", 1), ("a\nb", "P4", "d.svs", 0), ("<b>", "P5", "e.svs", 1),
                   (".hidden", "P6", "f.svs", 0)]
    problems = sheet_problems(write_sheet(tmp_path, rows))
    assert len(problems) == 1, problems
    line = problems[0]
    assert "'s{x}'" in line and "'a\\nb'" in line and "'<b>'" in line and "'.hidden'" in line
    assert "row(s) 4, 5, 6, 7" in line and "letters, digits and ._+-" in line
    assert "\n" not in line  # the newline inside an id is shown escaped: the message stays one line


def test_usual_slide_ids_pass(tmp_path):
    rows = [("TCGA-A1-A0SB-01Z-00-DX1.4D", "P1", "a.svs", 1), ("slide_2+HE", "P2", "b.svs", 0)]
    assert list(load_sheet(write_sheet(tmp_path, rows))["slide_id"]) == [r[0] for r in rows]


def test_sheet_schema_has_the_slide_id_rule():
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "samples.schema.yaml").read_text())
    assert schema["properties"]["slide_id"]["pattern"] == SLIDE_ID_PATTERN
    assert SLIDE_ID_CHARS in schema["properties"]["slide_id"]["description"]


def test_braces_in_a_slide_id_stop_the_dry_run_at_the_sheet(tmp_path):
    """``s{x}`` used to pass the sheet check and end the DAG build with a WildcardError."""
    sheet = write_sheet(tmp_path / "cohort", GOOD + [("s{x}", "P3", "c.svs", 1)])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"samples": str(sheet)}))
    proc = snakemake_cli(tmp_path, "-n", timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "'s{x}' in row(s) 4 unusable as file names" in out and "WildcardError" not in out


def test_one_slide_file_under_two_slide_ids_is_leakage(tmp_path):
    (tmp_path / "sub").mkdir()
    rows = GOOD + [("S3", "P3", "sub/../a.svs", 1), ("S4", "P1", str(tmp_path / "b.svs"), 1)]
    problems = sheet_problems(write_sheet(tmp_path, rows))
    assert len(problems) == 2, problems
    a, b = problems
    assert f"slide file {tmp_path / 'a.svs'} is listed under slide_ids S1, S3 (patients P1, P3) in rows 2, 4" in a
    assert f"slide file {tmp_path / 'b.svs'} is listed under slide_ids S2, S4 (patients P2, P1) in rows 3, 5" in b


def test_a_symlink_to_a_listed_slide_is_the_same_slide(tmp_path):
    write_sheet(tmp_path, GOOD)
    (tmp_path / "link.svs").symlink_to(tmp_path / "a.svs")
    problems = sheet_problems(write_sheet(tmp_path, GOOD + [("S3", "P3", "link.svs", 1)]))
    assert problems == [f"slide file {tmp_path / 'a.svs'} is listed under slide_ids S1, S3 (patients P1, P3) "
                        "in rows 2, 4: one slide, one row, or it may sit in training and test"]


# ---- item 7: one class, a negative seed, a comma-separated .txt ----


def test_a_sheet_with_one_class_is_refused(tmp_path):
    rows = [("S1", "P1", "a.svs", 1), ("S2", "P2", "b.svs", 1), ("S3", "P3", "c.svs", 1)]
    # A sheet for SimCLR pre-training or a report may hold one class; the workflow's check asks for both.
    assert len(load_sheet(write_sheet(tmp_path, rows))) == 3
    assert sheet_problems(write_sheet(tmp_path, rows), both_classes=True) == [
        "every label is '1': a classifier needs slides of both classes; add the other class's slides to the sheet"]


def test_a_one_class_cohort_stops_the_dry_run_at_the_sheet(tmp_path):
    sheet = write_sheet(tmp_path / "cohort", [("S1", "P1", "a.svs", 1), ("S2", "P2", "b.svs", 1)], name="s.txt")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"samples": str(sheet)}))
    proc = snakemake_cli(tmp_path, "-n", timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"sample sheet {sheet}: 1 problem(s):",
                                                "  - every label is '1': a classifier needs slides of both classes; "
                                                "add the other class's slides to the sheet"]


def test_one_class_under_binarize_is_refused(tmp_path):
    rows = [("S1", "P1", "a.svs", 2.5), ("S2", "P2", "b.svs", 2.5)]
    problems = sheet_problems(write_sheet(tmp_path, rows), binarize="median", both_classes=True)
    assert len(problems) == 1 and problems[0].startswith("every label is '2.5'")


def test_a_negative_seed_is_refused_by_the_config_check():
    with pytest.raises(ConfigError, match=r"^config: seed must be an integer at least 0, got -1$"):
        check_config({"seed": -1})


@pytest.mark.parametrize("name, sep", [("sheet.txt", ","), ("sheet.tsv", ","), ("sheet.csv", ";"),
                                       ("sheet.csv", "\t")])
def test_the_separator_is_the_headers_not_the_file_names(tmp_path, name, sep):
    """A comma-separated .txt used to be read as one column and refused as 'missing columns'."""
    sheet = load_sheet(write_sheet(tmp_path, GOOD, name=name, sep=sep))
    assert list(sheet["slide_id"]) == ["S1", "S2"] and list(sheet["label"]) == [1, 0]


# ---- item 8: weights of another architecture, a GPU that is not there, ImageNet weights offline ----


def test_weights_of_another_architecture_are_named(tmp_path):
    import torch
    import torchvision

    from slidemil.features.extractors import create_extractor

    file = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), file)
    with pytest.raises(WeightsError) as info:
        create_extractor("shufflenet_v2", str(file))
    assert str(info.value) == (f"{file}: does not fit shufflenet_v2: this file holds ResNet-18's weights, not "
                               "ShuffleNetV2's; pass weights saved from ShuffleNetV2, or choose the extractor "
                               "they belong to")
    # The truncated form, as SimCLR writes it, is recognised too; a ResNet-18 file fits resnet18.
    truncated, _ = create_extractor("resnet50_trunc", "random")
    torch.save(truncated.state_dict(), tmp_path / "r50.pt")
    with pytest.raises(WeightsError, match="holds ResNet-50's weights, not ResNet-18's"):
        create_extractor("resnet18", str(tmp_path / "r50.pt"))
    assert create_extractor("resnet18", str(file))[0] is not None


def test_a_file_that_is_not_weights_is_one_line(tmp_path):
    from slidemil.features.extractors import create_extractor

    (tmp_path / "notes.pt").write_text("not a torch file")
    with pytest.raises(WeightsError, match=r"notes.pt: cannot be read as PyTorch weights \(\w+\); pass a state"):
        create_extractor("shufflenet_v2", str(tmp_path / "notes.pt"))


def test_wrong_weights_on_the_features_command_line_are_one_line(tmp_path, capsys):
    import torch
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pt")
    tiled = tiled_slide(tmp_path, "A", slide_px=512)
    status, err = run_cli(capsys, "features", tiled["slide"], "--tiles", tiled["tiles"], "--out", tmp_path / "f.h5",
                          "--extractor", "shufflenet_v2", "--weights", tmp_path / "resnet18.pt")
    assert status == 1 and len(err) == 1, err
    assert err[0].startswith("slidemil features: error: ") and "holds ResNet-18's weights, not ShuffleNetV2's" in err[0]


def test_imagenet_weights_offline_say_what_to_download(monkeypatch, tmp_path, capsys):
    import torchvision.models._api as api

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    tiled = tiled_slide(tmp_path, "A", slide_px=512)
    status, err = run_cli(capsys, "features", tiled["slide"], "--tiles", tiled["tiles"], "--out", tmp_path / "f.h5",
                          "--extractor", "shufflenet_v2", "--weights", "imagenet")
    assert status == 1 and len(err) == 1, err
    assert re.search(r"could not download torchvision's ImageNet weights for shufflenet_v2 \(.*name resolution.*\); "
                     r"on a machine with internet download https://download\.pytorch\.org/\S+\.pth, copy it here "
                     r"and set the extractor's weights to that file's path$", err[0]), err[0]


def test_cuda_without_a_gpu_is_one_line_at_job_start(monkeypatch, tmp_path, capsys):
    import torch

    from slidemil.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    no_gpu = (r"^compute.device is 'cuda' but this machine has no CUDA GPU\(s\) visible to PyTorch; "
              r"run the job on a GPU node or set compute.device: auto$")
    with pytest.raises(DeviceError, match=no_gpu):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu" and resolve_device("cpu").type == "cpu"
    tiled = tiled_slide(tmp_path, "A", slide_px=512)
    status, err = run_cli(capsys, "features", tiled["slide"], "--tiles", tiled["tiles"], "--out", tmp_path / "f.h5",
                          "--extractor", "shufflenet_v2", "--weights", "random", "--device", "cuda")
    assert status == 1 and len(err) == 1 and "compute.device is 'cuda' but this machine has no CUDA GPU" in err[0]


def test_a_gpu_index_past_the_last_gpu_is_one_line(monkeypatch):
    """On a one-GPU node ``cuda`` and ``cuda:0`` resolve (test_cuda.py runs them for real); ``cuda:1`` does not."""
    import torch

    from slidemil.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda") and resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(DeviceError, match=r"^compute.device is 'cuda:1' but this machine has 1 CUDA GPU\(s\)"):
        resolve_device("cuda:1")


def test_a_device_typo_is_refused_by_the_config_check():
    """``cuda`` passes the config check (jobs may run on a GPU node); a name that is no device does not."""
    assert check_config({"compute": {"device": "cuda:1"}})["compute"]["device"] == "cuda:1"
    with pytest.raises(ConfigError, match=r"^config: compute.device must be a string matching"):
        check_config({"compute": {"device": "gpu"}})


# ---- item 9: the stage command lines fail with the command-line fix ----


def test_tiling_a_missing_slide_exits_1_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "nope.svs"
    status, err = run_cli(capsys, "tiling", missing, "--out", tmp_path / "t.h5")
    assert status == 1 and err == [f"slidemil tiling: error: {missing}: slide file not found; "
                                   "check the slide path on the command line"]
    assert not (tmp_path / "t.h5").exists()


def test_tiling_a_slide_without_mpp_names_mpp_override(tmp_path, capsys):
    slide = tmp_path / "nompp.tiff"
    make_slide(str(slide), label=1, seed=3, slide_px=(768, 768), mpp=None, objective_power=None)
    status, err = run_cli(capsys, "tiling", slide, "--out", tmp_path / "t.h5")
    assert status == 1 and len(err) == 1, err
    assert "pass --mpp-override with this slide's level-0 microns per pixel" in err[0]
    assert "sample sheet" not in err[0]
    # The fix it names works; exclusion stays available on request (status 0, the reason in the file).
    assert run_cli(capsys, "tiling", slide, "--out", tmp_path / "t.h5", "--mpp-override", "0.5",
                   "--mpp", "1.0", "--tile-px", "64")[0] == 0
    assert run_cli(capsys, "tiling", slide, "--out", tmp_path / "x.h5", "--on-error", "exclude")[0] == 0


def test_python_m_tiling_exits_non_zero_for_a_missing_slide(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "slidemil.tiling", str(tmp_path / "nope.svs"), "--out",
                           str(tmp_path / "t.h5")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("slide file not found; check the slide path on the command line")


def test_features_of_a_missing_slide_exit_1_naming_the_path(tmp_path, capsys):
    tiled = tiled_slide(tmp_path, "A", slide_px=512)
    missing = tmp_path / "moved.tiff"
    status, err = run_cli(capsys, "features", missing, "--tiles", tiled["tiles"], "--out", tmp_path / "f.h5",
                          "--extractor", "shufflenet_v2", "--weights", "random")
    assert status == 1 and err == [f"slidemil features: error: {missing}: slide file not found; "
                                   "check the slide path on the command line"]


def test_heatmap_of_a_missing_slide_names_the_path_before_loading_the_model(tmp_path):
    missing = tmp_path / "moved.tiff"
    with pytest.raises(SystemExit) as info:
        cli.main(["heatmap", "--slide", str(missing), "--features", str(tmp_path / "f.h5"), "--checkpoint",
                  str(tmp_path / "model.pt"), "--out", str(tmp_path / "h.png")])
    assert info.value.code == f"error: {missing}: slide file not found; check the slide path on the command line"


# ---- item 10: a tiles file made from another slide ----


def test_features_refuse_the_tiles_of_another_slide(tmp_path, capsys):
    a, b = tiled_slide(tmp_path, "A", slide_px=512), tiled_slide(tmp_path, "B", slide_px=768)
    status, err = run_cli(capsys, "features", b["slide"], "--tiles", a["tiles"], "--out", tmp_path / "f.h5",
                          "--extractor", "shufflenet_v2", "--weights", "random", "--input-px", "32")
    assert status == 1 and len(err) == 1, err
    assert re.fullmatch(rf"slidemil features: error: {re.escape(a['tiles'])}: tiles of {re.escape(a['slide'])} "
                        rf"\(512 x 512 px, \d+ bytes\), not of {re.escape(b['slide'])} \(768 x 768 px, \d+ bytes\); "
                        rf"tile this slide first \(slidemil tiling .*\) or pass the slide these tiles came from",
                        err[0]), err[0]
    assert not (tmp_path / "f.h5").exists()


def test_a_moved_slide_still_fits_its_tiles(tmp_path, capsys):
    """The path may change (slides are moved); the size in pixels and bytes is what identifies the slide."""
    import h5py

    a = tiled_slide(tmp_path, "A", slide_px=512)
    moved = Path(a["slide"]).rename(tmp_path / "moved.tiff")
    status, _ = run_cli(capsys, "features", moved, "--tiles", a["tiles"], "--out", tmp_path / "f.h5",
                        "--extractor", "shufflenet_v2", "--weights", "random", "--input-px", "32")
    assert status == 0
    with h5py.File(a["tiles"]) as f:
        assert (f.attrs["slide_width_px"], f.attrs["slide_height_px"]) == (512, 512)
        assert f.attrs["slide_bytes"] == moved.stat().st_size
