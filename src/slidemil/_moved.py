"""Modules of the flat package before the stage layout: importing one names where it went.

``python -m slidemil.train`` and ``import slidemil.train`` worked before the package was grouped by stage;
they now fail with one line naming the new module and the command that replaces the old entry point,
instead of Python's bare "No module named ...".
"""

from __future__ import annotations

import importlib.abc
import sys

# old module -> (new module, `slidemil <stage>` command or None)
MOVED = {
    "archs": ("slidemil.names", None),
    "byof": ("slidemil.features.byof", "byof"),
    "devices": ("slidemil.runtime", None),
    "extractors": ("slidemil.features.extractors", None),
    "heatmap": ("slidemil.report.heatmap", "heatmap"),
    "io": ("slidemil.files", None),
    "manifest": ("slidemil.cohort.manifest", "manifest"),
    "mhim": ("slidemil.mil.models.mhim_blocks", None),
    "models": ("slidemil.mil.models", None),
    "report_page": ("slidemil.report.page", "report-page"),
    "sheet": ("slidemil.cohort.sheet", None),
    "simclr": ("slidemil.pretrain.simclr", "simclr"),
    "splits": ("slidemil.cohort.splits", "splits"),
    "tiffjpeg": ("slidemil.slides.tiffjpeg", None),
    "tile_supervised": ("slidemil.pretrain.tile_supervised", "tile-supervised"),
    "tilepool": ("slidemil.pretrain.tilepool", None),
    "train": ("slidemil.mil.train", "train"),
}


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package != "slidemil" or name not in MOVED:
            return None
        new, stage = MOVED[name]
        hint = f"; on the command line: slidemil {stage}" if stage else ""
        raise ModuleNotFoundError(f"{fullname} moved to {new}{hint}", name=fullname)


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
