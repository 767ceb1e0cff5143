rule splits:
    input:
        sheet=SHEET,
    output:
        f"{RESULTS}/splits/splits.csv",
    log:
        f"{LOGS}/splits.log",
    conda:
        "../envs/slidemil.yaml"
    params:
        splits=config["splits"],
        seed=config["seed"],
    script:
        "../scripts/splits.py"
