from pathlib import Path

from _step import run
from slidemil.demo.external import make_external_cohort

run(
    snakemake,
    make_external_cohort,
    str(Path(snakemake.output.sheet).parent),
    snakemake.params.n_patients,
    dict(snakemake.params.demo),
)
