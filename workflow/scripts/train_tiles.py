from pathlib import Path

from _step import run
from slidemil.pretrain.tile_supervised import train_tile_supervised

run(
    snakemake,
    train_tile_supervised,
    slides={Path(t).stem: s for s, t in zip(snakemake.input.slides, snakemake.input.tiles)},
    tiles={Path(t).stem: t for t in snakemake.input.tiles},
    splits_csv=snakemake.input.splits,
    fold=int(snakemake.wildcards.fold),
    # "simclr" is in params only so that a SimCLR change retrains; the weights come as a file (init).
    settings={
        **{k: v for k, v in snakemake.params.model.items() if k != "simclr"},
        **({"init": snakemake.input.init[0]} if snakemake.input.init else {}),
    },
    seed=snakemake.params.seed,
    out_dir=str(Path(snakemake.output[0]).parent),
    device=snakemake.resources.device,
    workers=snakemake.resources.loader_workers,
    num_threads=snakemake.threads,
)
