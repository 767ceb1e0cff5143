"""``slidemil <stage> ...``: every stage as one command-line program.

Each stage module keeps its own ``main(argv)`` (its options next to the function they feed); this module only
names the stages and turns a user error into one line and exit status 1, whichever stage raised it.
"""

from __future__ import annotations

import importlib
import sys

# stage -> (module, one-line description). Modules are imported only when their stage runs, so
# `slidemil --help` needs no torch.
STAGES = {
    "demo": ("slidemil.demo.render", "write the synthetic demo cohort (pyramidal TIFFs and a sample sheet)"),
    "tiling": ("slidemil.tiling.tile", "tile one slide in microns per pixel and drop the background"),
    "features": ("slidemil.features.extract", "one feature vector per tile of one slide"),
    "byof": ("slidemil.features.byof", "import feature files made elsewhere; MIL benchmark bags"),
    "manifest": ("slidemil.cohort.manifest", "one CSV listing a per-slide stage's outputs"),
    "splits": ("slidemil.cohort.splits", "patient-level stratified test set and folds"),
    "simclr": ("slidemil.pretrain.simclr", "SimCLR pre-training on the cohort's training tiles"),
    "tile-supervised": ("slidemil.pretrain.tile_supervised", "the tile-supervised baseline"),
    "train": ("slidemil.mil.train", "train one MIL model on one fold"),
    "report": ("slidemil.report.stats", "per-fold and summary test AUCs, bootstrap CIs, ROC curves"),
    "report-page": ("slidemil.report.page", "the self-contained HTML report"),
    "heatmap": ("slidemil.report.heatmap", "a trained model's attention drawn over a slide"),
    "predict": ("slidemil.deploy.predict", "score new slides' features with trained models and their ensemble"),
    "heatmaps": ("slidemil.report.model_heatmaps", "one model's heatmaps of its test slides, indexed for the report"),
}


def usage() -> str:
    width = max(map(len, STAGES))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in STAGES.items()]
    return "usage: slidemil <stage> [options]   (slidemil <stage> --help for a stage's options)\n\nstages:\n" + \
        "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"slidemil: unknown stage {stage!r}; one of: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    from slidemil.errors import USER_ERRORS, command_line_message

    module = importlib.import_module(STAGES[stage][0])
    try:
        status = module.main(rest, prog=f"slidemil {stage}")
    except USER_ERRORS as err:
        print(f"slidemil {stage}: error: {command_line_message(err)}", file=sys.stderr)
        return 1
    return status or 0


if __name__ == "__main__":
    raise SystemExit(main())
