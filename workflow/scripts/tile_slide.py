from _step import run
from slidemil.tiling.tile import tile_slide

run(
    snakemake,
    tile_slide,
    snakemake.input.slide,
    snakemake.output.h5,
    snakemake.output.qc,
    params=snakemake.params.tiling,
    slide_id=snakemake.wildcards.slide,
    mpp_override=snakemake.params.mpp,
    threads=snakemake.threads,
    # Not a param: it decides what happens to broken slides, not what good slides' tiles are.
    on_error=snakemake.config["tiling"].get("on_error", "exclude"),
)
