"""Logging setup shared by the step scripts and the command-line entry points."""

from __future__ import annotations

import logging
import sys


def setup_logging(log_path: str | None = None, level: int = logging.INFO) -> None:
    """Log to ``log_path`` (and send stderr there too, so tqdm progress lands in it).

    Without a path, log to stderr: the command-line case.
    """
    if log_path:
        stream = open(log_path, "a", buffering=1)
        sys.stderr = stream
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
