rule splits:
    input:
        sheet=SHEET,
    output:
        f"{RESULTS}/splits/splits.csv",
    params:
        splits=config["splits"],
        seed=config["seed"],
    conda:
        "../envs/slidemil.yaml"
    log:
        f"{LOGS}/splits.log",
    script:
        "../scripts/splits.py"
