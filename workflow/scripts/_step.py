"""Shared start of every step script: import path, logging to the rule's log, clean errors."""

import logging
import sys
from pathlib import Path


def start(snakemake):
    sys.path.insert(0, str(Path(snakemake.scriptdir).parent))
    from slidemil.logs import setup_logging

    setup_logging(snakemake.log[0] if snakemake.log else None)


def run(fn, *args, **kwargs):
    """Call a stage; input problems end the job with one clear line instead of a traceback."""
    from slidemil.errors import USER_ERRORS

    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as err:
        logging.getLogger("slidemil").error("%s", err)
        sys.exit(1)
