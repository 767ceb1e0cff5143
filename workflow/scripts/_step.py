"""Shared start of every step script: import path, logging to the rule's log, clean errors, a quick exit.

Shared behaviour belongs here or in the package rather than in the rule scripts: Snakemake reruns a rule's
jobs when its script file is newer than their outputs, so editing a rule script reruns that stage for every
user who updates; this module is not tracked that way.
"""

import atexit
import logging
import os
import sys

_failed = False


def start(snakemake):
    from slidemil.logs import setup_logging

    setup_logging(snakemake.log[0] if snakemake.log else None)
    _exit_quickly_on_success()


def run(fn, *args, **kwargs):
    """Call a stage; input problems end the job with one clear line instead of a traceback."""
    global _failed
    from slidemil.errors import USER_ERRORS

    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as err:
        logging.getLogger("slidemil").error("%s", err)
        _failed = True
        sys.exit(1)
    except BaseException:
        # Any other way out keeps the normal exit and its status: sys.exit(n) from a library never reaches
        # the excepthook, and the quick exit would turn it into success.
        _failed = True
        raise


def _exit_quickly_on_success():
    """Skip the interpreter's teardown once a step has succeeded.

    With torch and torchvision loaded (about 2,700 modules) tearing them down takes about 1 s per job
    (docs/performance.md), paid by every per-slide job for nothing: the outputs are already written and
    closed (atomically). Registered before those imports, so every atexit handler they add still runs
    first. A failed step exits the normal way, with its status.
    """
    hook = sys.excepthook

    def record_failure(*exc_info):
        global _failed
        _failed = True
        hook(*exc_info)

    sys.excepthook = record_failure
    atexit.register(_exit_now)


def _exit_now():
    mp = sys.modules.get("multiprocessing")
    if _failed or (mp is not None and mp.active_children()):
        return  # children to join, or a failure: the normal exit
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)
