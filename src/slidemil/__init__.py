"""slidemil: whole-slide image MIL pipeline, one subpackage per stage.

The package never imports snakemake and never reads a global config: every
stage function takes explicit arguments and is also a command-line program
(``slidemil <stage> --help``; ``slidemil --help`` lists the stages).
"""

from slidemil import _moved

__version__ = "0.1.0"

_moved.install()
