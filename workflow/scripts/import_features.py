import _step

_step.start(snakemake)
from slidemil.features.byof import import_features  # noqa: E402

_step.run(import_features, snakemake.input[0], snakemake.output[0], extractor=snakemake.params.extractor)
