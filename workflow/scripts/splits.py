from _step import run
from slidemil.cohort.splits import write_splits

# Every setting of the rule's splits params (the config's splits section, and the task when not binary).
run(
    snakemake,
    write_splits,
    snakemake.input.sheet,
    snakemake.output[0],
    manifest=snakemake.input.usable,
    seed=snakemake.params.seed,
    **snakemake.params.splits,
)
