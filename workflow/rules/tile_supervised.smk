# DeepSMILE's tile-supervised baseline: a CNN fine-tuned on tiles labelled with their slide's label.
# Listed in mil.models as tile_supervised; its runs sit beside the MIL runs under train/tiles/.


rule train_tiles:
    input:
        slides=all_slide_files,
        tiles=all_tiles,
        splits=f"{RESULTS}/splits/splits.csv",
        init=tile_model_init,
    output:
        [f"{RESULTS}/train/{TILE_SLOT}/{TILE_MODEL}/fold_{{fold}}/{name}" for name in TRAIN_FILES],
    log:
        f"{LOGS}/train/{TILE_SLOT}/{TILE_MODEL}/fold_{{fold}}.log",
    benchmark:
        f"{LOGS}/train/{TILE_SLOT}/{TILE_MODEL}/fold_{{fold}}.benchmark.tsv"
    conda:
        "../envs/slidemil.yaml"
    threads: config["compute"]["threads"]
    resources:
        device=config["compute"]["device"],
        loader_workers=config["compute"]["loader_workers"],
    params:
        model=tile_model_params,
        seed=config["seed"],
    script:
        "../scripts/train_tiles.py"
