# Splits are drawn over the patients with a usable slide: they wait for the tile manifest (the feature manifest of
# precomputed features), whose unusable slides are listed in splits.csv as excluded, with their reason.
rule splits:
    input:
        sheet=SHEET,
        usable=usable_manifest(),
    output:
        f"{RESULTS}/splits/splits.csv",
    log:
        f"{LOGS}/splits.log",
    conda:
        "../envs/slidemil.yaml"
    params:
        splits=splits_params(),
        seed=config["seed"],
    script:
        "../scripts/splits.py"
