"""The step scripts' one helper (workflow/scripts/_step.py): the rule's log, clean input errors, plain exits.

A step script runs in its own interpreter, as Snakemake runs it, and must end the normal way with the stage's
status: 0 after success, 1 and one log line after an input error, a traceback and a non-zero status after a
crash, n after a library's sys.exit(n). Every atexit handler runs (nothing cuts the teardown short).
"""

import subprocess
import sys
import textwrap

import pytest

from factories import ROOT


SCRIPTS = ROOT / "workflow" / "scripts"

SCRIPT = """
import atexit, logging, sys, types
from pathlib import Path
sys.path.insert(0, {scripts!r})
out = Path({out!r})
# Registered before the step, like the handlers of anything the script imports: runs whatever happens.
atexit.register(lambda: (out / "teardown").write_text("ran"))
from _step import run
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

snakemake = types.SimpleNamespace(log=[str(out / "step.log")])
run(snakemake, stage, {how!r})
"""


@pytest.mark.parametrize("how, status", [("ok", 0), ("user_error", 1), ("crash", 1), ("library_exit", 3)])
def test_step_exits_with_the_stage_status(tmp_path, how, status):
    script = tmp_path / "step.py"
    script.write_text(textwrap.dedent(SCRIPT.format(scripts=str(SCRIPTS), out=str(tmp_path), how=how)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == status, proc.stderr
    log = (tmp_path / "step.log").read_text()
    # Buffered output reaches the log and stdout either way, also without a final newline.
    assert "stage ran" in log and "progress without a newline" in log and proc.stdout == "result"
    # The interpreter's normal exit: atexit handlers run after success and after failure alike.
    assert (tmp_path / "teardown").read_text() == "ran"
    if how == "user_error":
        errors = [line for line in log.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and errors[0].endswith("slide.svs: cannot be opened"), log
        assert "Traceback" not in log
    else:
        assert " ERROR " not in log
    if how == "crash":
        assert "Traceback" in log and "RuntimeError: a bug" in log
    if how in ("ok", "library_exit"):
        assert "Traceback" not in log


def test_step_scripts_are_one_call_through_the_helper():
    """Each rule script imports its stage and calls it once through _step.run, with nothing after it."""
    import ast

    scripts = sorted(p for p in SCRIPTS.glob("*.py") if not p.name.startswith("_"))
    assert len(scripts) >= 9
    for path in scripts:
        tree = ast.parse(path.read_text())
        body = tree.body
        # demo_cohort's body sits under `if __name__ == "__main__":` (its workers re-import the script).
        if isinstance(body[-1], ast.If):
            body = body[:-1] + body[-1].body
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "run"]
        assert len(calls) == 1, f"{path.name}: {len(calls)} calls of run"
        assert isinstance(calls[0].args[0], ast.Name) and calls[0].args[0].id == "snakemake", path.name
        # The call is the last statement: nothing after it.
        last = body[-1]
        assert any(n is calls[0] for n in ast.walk(last)), f"{path.name}: statements after the call"
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert not {"atexit", "os", "excepthook"} & names, path.name
    helper = ast.parse((SCRIPTS / "_step.py").read_text())
    used = {n.id for n in ast.walk(helper) if isinstance(n, ast.Name)}
    used |= {n.attr for n in ast.walk(helper) if isinstance(n, ast.Attribute)}
    used |= {a.name for n in ast.walk(helper) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert not {"atexit", "os", "_exit", "excepthook"} & used, used
