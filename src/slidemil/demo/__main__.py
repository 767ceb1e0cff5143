"""``python -m slidemil.demo``: the same as ``slidemil demo``."""

import sys

from slidemil.cli import main

raise SystemExit(main(["demo", *sys.argv[1:]]))
