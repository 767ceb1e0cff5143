"""``python -m slidemil.report``: the same as ``slidemil report``."""

import sys

from slidemil.cli import main

raise SystemExit(main(["report", *sys.argv[1:]]))
