rule train:
    input:
        features=extractor_features,
        splits=f"{RESULTS}/splits/splits.csv",
        init=init_checkpoint,
    output:
        [f"{RESULTS}/train/{{extractor}}/{{model}}/fold_{{fold}}/{name}" for name in TRAIN_FILES],
    params:
        model=model_params,
        training=config["mil"]["training"],
        seed=config["seed"],
    threads: config["compute"]["train_threads"]
    resources:
        device=config["compute"]["device"],
    conda:
        "../envs/slidemil.yaml"
    log:
        f"{LOGS}/train/{{extractor}}/{{model}}/fold_{{fold}}.log",
    benchmark:
        f"{LOGS}/train/{{extractor}}/{{model}}/fold_{{fold}}.benchmark.tsv"
    script:
        "../scripts/train.py"
