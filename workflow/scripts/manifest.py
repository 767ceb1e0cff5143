from _step import run
from slidemil.cohort.manifest import feature_manifest, tile_manifest

# One script for both manifest rules, told apart by their inputs: the rule's name has a prefix when the
# workflow is used as a module (`use rule * from slidemil as slidemil_*`).
if "qc" in snakemake.input.keys():
    stage, inputs = tile_manifest, (list(snakemake.input.tiles), list(snakemake.input.qc))
else:
    stage, inputs = feature_manifest, (list(snakemake.input.features),)
run(snakemake, stage, *inputs, snakemake.output[0])
