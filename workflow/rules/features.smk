# Every slide's features in one list: the fold jobs and the report depend on this file, not on N files.
rule feature_manifest:
    input:
        features=extractor_slide_features,
    output:
        f"{RESULTS}/features/{{extractor}}/manifest.csv",
    log:
        f"{LOGS}/features/{{extractor}}/manifest.log",
    localrule: True
    conda:
        "../envs/slidemil.yaml"
    script:
        "../scripts/manifest.py"


if PRECOMPUTED:

    # Features made elsewhere (CLAM/TRIDENT .h5 or .pt): normalised to our HDF5, no tiling.
    rule import_features:
        input:
            slide_path,
        output:
            f"{RESULTS}/features/{PRECOMPUTED}/{{slide}}.h5",
        log:
            f"{LOGS}/features/{PRECOMPUTED}/{{slide}}.log",
        conda:
            "../envs/slidemil.yaml"
        params:
            extractor=PRECOMPUTED,
        script:
            "../scripts/import_features.py"

else:

    rule extract_features:
        input:
            # No slide here: the tiles file names it, and an input function per job slows the DAG.
            tiles=f"{RESULTS}/tiles/{{slide}}.h5",
            # An input function per job costs DAG time at 1,000s of slides: only when SimCLR is in use.
            simclr=extractor_simclr_weights if USES_SIMCLR else [],
            # Local weights files: replacing one at the same path reruns extraction (and what uses the features).
            weights=extractor_weights_files if USES_LOCAL_WEIGHTS else [],
        output:
            f"{RESULTS}/features/{{extractor}}/{{slide}}.h5",
        log:
            f"{LOGS}/features/{{extractor}}/{{slide}}.log",
        benchmark:
            f"{LOGS}/features/{{extractor}}/{{slide}}.benchmark.tsv"
        conda:
            "../envs/slidemil.yaml"
        # How features are computed (device, batch, workers) is not what they are: resources, not params.
        threads: config["compute"]["threads"]
        resources:
            device=config["compute"]["device"],
            batch_size=config["compute"]["batch_size"],
            loader_workers=config["compute"]["loader_workers"],
            torch_compile=int(config["compute"].get("torch_compile", False)),
        params:
            extractor=extractor_params,
        script:
            "../scripts/extract_features.py"
