from pathlib import Path

from _step import run
from slidemil.report.page import build_report

inp = snakemake.input
run(
    snakemake,
    build_report,
    [
        dict(r, predictions=pred, history=hist)
        for r, pred, hist in zip(snakemake.params.runs, inp.predictions, inp.histories)
    ],
    out_dir=str(Path(snakemake.output.html).parent),
    settings=snakemake.params.report,
    seed=snakemake.params.seed,
    sheet=inp.sheet,
    splits=inp.splits,
    # One feature manifest per extractor, in the folder named after it; the tile manifest unless precomputed.
    features={Path(m).parent.name: m for m in inp.features},
    tiles=inp.tiles[0] if inp.tiles else None,
    heatmaps=list(inp.heatmaps),
    run_settings=snakemake.params.run_settings,
    deploy_cohorts=snakemake.params.deploy_cohorts,
)
