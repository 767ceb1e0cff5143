import _step

_step.start(snakemake)
from slidemil.tiling import tile_slide  # noqa: E402

_step.run(
    tile_slide,
    snakemake.input.slide,
    snakemake.output.h5,
    snakemake.output.qc,
    params=snakemake.params.tiling,
    slide_id=snakemake.wildcards.slide,
    mpp_override=snakemake.params.mpp,
    threads=snakemake.threads,
)
