"""``python -m slidemil.features``: the same as ``slidemil features``."""

import sys

from slidemil.cli import main

raise SystemExit(main(["features", *sys.argv[1:]]))
