rule train:
    input:
        features=extractor_features,
        splits=f"{RESULTS}/splits/splits.csv",
        init=init_checkpoint,
    output:
        [f"{RESULTS}/train/{{extractor}}/{{model}}/fold_{{fold}}/{name}" for name in TRAIN_FILES],
    log:
        f"{LOGS}/train/{{extractor}}/{{model}}/fold_{{fold}}.log",
    benchmark:
        f"{LOGS}/train/{{extractor}}/{{model}}/fold_{{fold}}.benchmark.tsv"
    conda:
        "../envs/slidemil.yaml"
    threads: config["compute"]["train_threads"]
    resources:
        device=config["compute"]["device"],
    params:
        model=model_params,
        training=config["mil"]["training"],
        seed=config["seed"],
    script:
        "../scripts/train.py"
