"""Errors caused by the user's inputs: reported as one clear line, not a traceback."""

from .byof import FeatureFileError
from .sheet import SheetError
from .slides import SlideError
from .splits import SplitError

USER_ERRORS = (SheetError, SlideError, SplitError, FeatureFileError, FileNotFoundError)
