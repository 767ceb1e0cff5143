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
        handlers=[_CurrentStderr()],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is logged.

    logging.StreamHandler keeps the stream it was made with; once that stream is replaced and closed (a
    command run in-process, as the tests and notebooks do), every later record would fail with "I/O
    operation on closed file".
    """

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass
