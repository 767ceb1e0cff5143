"""``python -m slidemil.tiling``: the same as ``slidemil tiling``."""

import sys

from slidemil.cli import main

raise SystemExit(main(["tiling", *sys.argv[1:]]))
