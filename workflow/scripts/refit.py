from pathlib import Path

from _step import run
from slidemil.steps import refit_from_manifest

run(
    snakemake,
    refit_from_manifest,
    snakemake.input.features,
    splits_csv=snakemake.input.splits,
    fold_checkpoints=list(snakemake.input.folds),
    model=snakemake.wildcards.model,
    model_kwargs=dict(snakemake.params.model),
    training=dict(snakemake.params.training),
    seed=snakemake.params.seed,
    out_dir=str(Path(snakemake.output[0]).parent),
    device=snakemake.resources.device,
    num_threads=snakemake.threads,
    # MHIM-MIL's refit starts from its baseline's refit; other models take no such argument.
    **({"init_checkpoint": snakemake.input.init[0]} if snakemake.input.init else {}),
)
