from _step import run
from slidemil.features.extract import extract_features
from slidemil.names import TIMM_OPTIONS

settings = dict(snakemake.params.extractor)
run(
    snakemake,
    extract_features,
    None,  # the slide the tiles file was cut from
    snakemake.input.tiles,
    snakemake.output[0],
    extractor=snakemake.wildcards.extractor,
    # "simclr" weights are the cohort's own backbone, made by pretrain_simclr.
    weights=snakemake.input.simclr[0] if snakemake.input.simclr else settings["weights"],
    input_px=settings["input_px"],
    dtype=settings["dtype"],
    precision=settings.get("precision", "auto"),
    scaled_decode=settings.get("scaled_decode", True),
    seed=settings.get("seed", 0),
    device=snakemake.resources.device,
    batch_size=snakemake.resources.batch_size,
    workers=snakemake.resources.loader_workers,
    threads=snakemake.threads,
    slide_id=snakemake.wildcards.slide,
    torch_compile=bool(snakemake.resources.get("torch_compile", 0)),
    # The generic timm extractor's architecture, normalisation and pooling (None for the others).
    options={k: settings[k] for k in TIMM_OPTIONS if k in settings} or None,
)
