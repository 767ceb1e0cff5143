from pathlib import Path

from _step import run
from slidemil.deploy.report import build_deploy_report

inp = snakemake.input
run(
    snakemake,
    build_deploy_report,
    snakemake.wildcards.cohort,
    [
        dict(r, slides=s, patients=p, checkpoint=c, features=f, tiles=inp.tiles[0] if inp.tiles else None)
        for r, s, p, c, f in zip(snakemake.params.runs, inp.slides, inp.patients, inp.checkpoints, inp.features)
    ],
    str(Path(snakemake.output.html).parent),
    settings=snakemake.params.settings,
    seed=snakemake.params.seed,
    sheet=inp.sheet,
    positive_class=snakemake.params.positive_class,
    endpoint=snakemake.params.endpoint,
    training_predictions=list(inp.training),
    device=snakemake.resources.device,
)
