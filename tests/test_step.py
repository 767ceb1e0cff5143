"""The step scripts' shared start (workflow/scripts/_step.py): logging, clean errors and the quick exit."""

import subprocess
import sys
import textwrap

import pytest

from factories import ROOT


SCRIPT = """
import atexit, sys, types
from pathlib import Path
sys.path.insert(0, {scripts!r})
out = Path({out!r})
# Registered before the step starts, like the handlers of anything imported before it: skipped on success.
atexit.register(lambda: (out / "teardown").write_text("ran"))
import _step
_step.start(types.SimpleNamespace(scriptdir={scripts!r}, log=[str(out / "step.log")]))
# Registered during the step, like torch's handlers: always run.
atexit.register(lambda: (out / "late").write_text("ran"))
import logging
from slidemil.slides.reader import SlideError

def stage(how):
    logging.getLogger("slidemil.test").info("stage ran")
    print("progress without a newline", end="", file=sys.stderr)
    print("result", end="")
    if how == "user_error":
        raise SlideError("slide.svs: cannot be opened")
    if how == "crash":
        raise RuntimeError("a bug")
    if how == "library_exit":
        sys.exit(3)
    return 0

_step.run(stage, {how!r})
"""


@pytest.mark.parametrize("how, status", [("ok", 0), ("user_error", 1), ("crash", 1), ("library_exit", 3)])
def test_step_exits_quickly_only_after_success(tmp_path, how, status):
    script = tmp_path / "step.py"
    script.write_text(textwrap.dedent(SCRIPT.format(scripts=str(ROOT / "workflow" / "scripts"), out=str(tmp_path),
                                                    how=how)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == status, proc.stderr
    log = (tmp_path / "step.log").read_text()
    # Buffered output reaches the log and stdout either way, also without a final newline.
    assert "stage ran" in log and "progress without a newline" in log and proc.stdout == "result"
    assert (tmp_path / "late").read_text() == "ran"
    # Teardown (and the handlers registered before the step) is skipped only on success.
    assert (tmp_path / "teardown").exists() == (status != 0)
    if how == "user_error":
        assert "slide.svs: cannot be opened" in log and "Traceback" not in log
    if how == "crash":
        assert "RuntimeError: a bug" in log
