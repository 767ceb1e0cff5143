import _step

_step.start(snakemake)
from slidemil.cohort.manifest import feature_manifest, tile_manifest  # noqa: E402

if snakemake.rule == "tile_manifest":
    _step.run(tile_manifest, list(snakemake.input.tiles), list(snakemake.input.qc), snakemake.output[0])
else:
    _step.run(feature_manifest, list(snakemake.input.features), snakemake.output[0])
