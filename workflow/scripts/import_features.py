from _step import run
from slidemil.features.byof import import_features

run(snakemake, import_features, snakemake.input[0], snakemake.output[0], extractor=snakemake.params.extractor)
