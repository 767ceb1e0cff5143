"""Errors caused by the user's inputs: reported as one clear line, not a traceback.

Every stage raises these (and FileNotFoundError); the step scripts and the command line print their message
alone. They live here, not in the stages, so that catching them imports no stage.
"""

from __future__ import annotations

import os


class SheetError(ValueError):
    """The sample sheet is malformed; the message lists every problem found."""

    def __init__(self, sheet: str | os.PathLike, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"sample sheet {sheet}: {len(problems)} problem(s):\n{lines}")


class SlideError(RuntimeError):
    """A slide cannot be used; the message names the file and what to do.

    The message names the sample sheet's fix (the workflow's); ``command_line``, when given, is the same
    line with the fix a command-line user makes instead (an option, the path argument).
    """

    def __init__(self, message: str, command_line: str | None = None):
        super().__init__(message)
        self.command_line = command_line


class SplitError(ValueError):
    """Splits cannot be drawn or read as asked; the message says why."""


class FeatureFileError(ValueError):
    """A feature file cannot be imported; the message names the file."""


class CorruptFileError(FeatureFileError):
    """A tiles or feature file cannot be read as HDF5 (truncated, damaged); ``path`` is that file."""

    def __init__(self, path: str | os.PathLike, what: str, detail: str, removed: bool = False):
        self.path, self.what, self.detail = str(path), what, detail
        fix = "removed it: run the workflow again to make it anew" if removed else \
            "delete it and run the workflow again to make it anew"
        super().__init__(f"{path}: {what} damaged or truncated ({detail}); {fix}")


class CheckpointError(ValueError):
    """A checkpoint cannot rebuild its model; the message names the file."""


class WeightsError(ValueError):
    """Model weights cannot be had as asked (a file for another architecture, an unreadable file, no internet);
    the one line names the extractor and the file, and says what to pass instead."""


class DeviceError(RuntimeError):
    """The asked compute device is not on this machine; the message names the setting."""


USER_ERRORS = (SheetError, SlideError, SplitError, FeatureFileError, CheckpointError, WeightsError, DeviceError,
               FileNotFoundError)


def command_line_message(err: BaseException) -> str:
    """The error's line as a command-line user should read it (see SlideError.command_line)."""
    return getattr(err, "command_line", None) or str(err)
