from pathlib import Path

from _step import run
from slidemil.demo.render import make_cohort

# The generator's worker processes are spawned and re-import this script: only the parent runs it.
if __name__ == "__main__":
    d = snakemake.params.demo
    run(
        snakemake,
        make_cohort,
        out_dir=str(Path(snakemake.output.sheet).parent),
        n_patients=d["n_patients"],
        seed=d["seed"],
        slide_px=tuple(d["slide_px"]),
        mpp=d["mpp"],
        objective_power=d["objective_power"],
        tumor_tile_fraction=tuple(d["tumor_tile_fraction"]),
        two_slide_fraction=d["two_slide_fraction"],
        positive_fraction=d["positive_fraction"],
        workers=snakemake.threads,
    )
