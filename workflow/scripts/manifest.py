from _step import run
from slidemil.cohort.manifest import feature_manifest, tile_manifest

# One script for both manifest rules.
if snakemake.rule == "tile_manifest":
    stage, inputs = tile_manifest, (list(snakemake.input.tiles), list(snakemake.input.qc))
else:
    stage, inputs = feature_manifest, (list(snakemake.input.features),)
run(snakemake, stage, *inputs, snakemake.output[0])
