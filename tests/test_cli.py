"""The one command line: `slidemil <stage>`, old module names, one-line user errors."""

import subprocess
import sys

import pytest

from slidemil import cli


def test_help_lists_every_stage(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for stage in cli.STAGES:
        assert f"  {stage} " in out


@pytest.mark.parametrize("stage", list(cli.STAGES))
def test_every_stage_has_its_options_under_its_command_name(stage, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([stage, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: slidemil {stage}")


def test_unknown_stage_names_the_stages(capsys):
    assert cli.main(["tile"]) == 2
    err = capsys.readouterr().err
    assert "unknown stage 'tile'" in err and "tiling" in err


def test_user_error_is_one_line_and_status_1(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "slidemil", "splits", str(tmp_path / "missing.csv"),
                           "--out", str(tmp_path / "splits.csv")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "missing.csv" in proc.stderr.strip().splitlines()[-1]


def test_stage_package_runs_as_its_stage():
    proc = subprocess.run([sys.executable, "-m", "slidemil.tiling", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: slidemil tiling")


@pytest.mark.parametrize("old, new, command", [("train", "slidemil.mil.train", "slidemil train"),
                                                ("io", "slidemil.files", None)])
def test_old_module_names_point_to_their_replacement(old, new, command):
    proc = subprocess.run([sys.executable, "-m", f"slidemil.{old}", "--help"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"slidemil.{old} moved to {new}" in proc.stderr
    assert (command in proc.stderr) if command else "command line" not in proc.stderr
