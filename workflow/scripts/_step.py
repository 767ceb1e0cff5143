"""The one helper every step script calls: the stage's log, clean input errors, the stage's exit status.

    from _step import run
    from slidemil.tiling.tile import tile_slide

    run(snakemake, tile_slide, snakemake.input.slide, ...)

Nothing else happens here: no excepthook, no atexit handler, no early exit. The process ends the normal way,
so its status is the stage's: 0 after success, 1 after an input error (one line in the log), 1 and a
traceback in the log after a crash, n after a library's sys.exit(n).

Shared behaviour belongs here or in the package rather than in the rule scripts: Snakemake reruns a rule's
jobs when its script file is newer than their outputs, so editing a rule script reruns that stage for every
user who updates; this module is not tracked that way.
"""

import logging
import sys


def run(snakemake, stage, *args, **kwargs):
    """Log to the rule's log, call ``stage(*args, **kwargs)``; an input error ends the job with one line, status 1."""
    from slidemil.errors import USER_ERRORS
    from slidemil.logs import setup_logging

    setup_logging(snakemake.log[0] if snakemake.log else None)
    try:
        return stage(*args, **kwargs)
    except USER_ERRORS as err:
        logging.getLogger("slidemil").error("%s", err)
        sys.exit(1)
