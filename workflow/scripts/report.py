from pathlib import Path

import _step

_step.start(snakemake)
from slidemil.report.page import build_report  # noqa: E402

inp = snakemake.input
runs = [
    dict(run, predictions=pred, history=hist)
    for run, pred, hist in zip(snakemake.params.runs, inp.predictions, inp.histories)
]
_step.run(
    build_report,
    runs,
    out_dir=str(Path(snakemake.output.html).parent),
    settings=snakemake.params.report,
    seed=snakemake.params.seed,
    sheet=inp.sheet,
    splits=inp.splits,
    # One feature manifest per extractor, in the folder named after it; the tile manifest unless precomputed.
    features={Path(m).parent.name: m for m in inp.features},
    tiles=inp.tiles[0] if inp.tiles else None,
    heatmaps=list(inp.heatmaps),
)
