from pathlib import Path

from _step import run
from slidemil.pretrain.simclr import pretrain_simclr

run(
    snakemake,
    pretrain_simclr,
    slides={Path(t).stem: s for s, t in zip(snakemake.input.slides, snakemake.input.tiles)},
    tiles={Path(t).stem: t for t in snakemake.input.tiles},
    splits_csv=snakemake.input.splits,
    out_dir=str(Path(snakemake.output.backbone).parent),
    arch=snakemake.wildcards.arch,
    settings=dict(snakemake.params.simclr),
    seed=snakemake.params.seed,
    device=snakemake.resources.device,
    workers=snakemake.resources.loader_workers,
    num_threads=snakemake.threads,
)
