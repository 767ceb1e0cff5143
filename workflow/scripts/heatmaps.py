from _step import run
from slidemil.report.model_heatmaps import draw_model_heatmaps

inp, settings = snakemake.input, snakemake.params.settings
run(
    snakemake,
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
    # The seed is in the settings param so that changing it redraws the heatmaps; it is its own argument.
    settings={k: v for k, v in settings.items() if k != "seed"},
    seed=settings["seed"],
    device=snakemake.resources.device,
)
