from pathlib import Path

import _step

_step.start(snakemake)
from slidemil.pretrain.tile_supervised import train_tile_supervised  # noqa: E402

settings = dict(snakemake.params.model)
settings.pop("simclr", None)  # in params only so a SimCLR change retrains; the weights come as a file
if snakemake.input.init:
    settings["init"] = snakemake.input.init[0]
_step.run(
    train_tile_supervised,
    slides={Path(t).stem: s for s, t in zip(snakemake.input.slides, snakemake.input.tiles)},
    tiles={Path(t).stem: t for t in snakemake.input.tiles},
    splits_csv=snakemake.input.splits,
    fold=int(snakemake.wildcards.fold),
    settings=settings,
    seed=snakemake.params.seed,
    out_dir=str(Path(snakemake.output[0]).parent),
    device=snakemake.resources.device,
    workers=snakemake.resources.loader_workers,
    num_threads=snakemake.threads,
)
