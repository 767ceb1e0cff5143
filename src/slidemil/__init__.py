"""slidemil: whole-slide image MIL pipeline, one module per stage.

The package never imports snakemake and never reads a global config: every
stage function takes explicit arguments and is also a command-line program
(``python -m slidemil.<stage> --help``).
"""

__version__ = "0.1.0"
