from pathlib import Path

from _step import run
from slidemil.demo.render import make_cohort

# The generator's worker processes are spawned and re-import this script: only the parent runs it.
if __name__ == "__main__":
    run(
        snakemake,
        make_cohort,
        out_dir=str(Path(snakemake.output.sheet).parent),
        workers=snakemake.threads,
        **snakemake.params.demo,
    )
