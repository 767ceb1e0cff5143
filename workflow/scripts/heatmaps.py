import _step

_step.start(snakemake)
from slidemil.report.model_heatmaps import draw_model_heatmaps  # noqa: E402

inp, settings = snakemake.input, dict(snakemake.params.settings)
seed = settings.pop("seed")
_step.run(
    draw_model_heatmaps,
    inp.checkpoint,
    snakemake.wildcards.extractor,
    snakemake.wildcards.model,
    snakemake.params.fold,
    inp.sheet,
    inp.splits,
    features=inp.features,
    tiles=inp.tiles,
    out_dir=snakemake.output.pngs,
    index=snakemake.output.index,
    settings=settings,
    seed=seed,
    device=snakemake.resources.device,
)
