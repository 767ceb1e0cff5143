# SimCLR pre-training of a tile encoder on the tiles of the training and validation patients.
# The test patients' slides are inputs only so the DAG is known before the splits exist; their
# tiles are never read (the job picks the slides that are never "test" in splits.csv).


rule pretrain_simclr:
    input:
        splits=f"{RESULTS}/splits/splits.csv",
        slides=all_slide_files,
        tiles=all_tiles,
    output:
        backbone=f"{RESULTS}/simclr/{{arch}}/backbone.pt",
        loss_csv=f"{RESULTS}/simclr/{{arch}}/loss.csv",
        loss_png=f"{RESULTS}/simclr/{{arch}}/loss.png",
    log:
        f"{LOGS}/simclr/{{arch}}.log",
    benchmark:
        f"{LOGS}/simclr/{{arch}}.benchmark.tsv"
    wildcard_constraints:
        arch=_alternation(sorted(set(SIMCLR_EXTRACTORS.values()))),
    conda:
        "../envs/slidemil.yaml"
    threads: config["compute"]["threads"]
    resources:
        device=config["compute"]["device"],
        loader_workers=config["compute"]["loader_workers"],
    # Not an output (Snakemake would delete it before a rerun): an interrupted job resumes from
    # {RESULTS}/simclr/{arch}/checkpoint.pt, written after every epoch.
    params:
        simclr=config["simclr"],
        seed=config["seed"],
    script:
        "../scripts/pretrain_simclr.py"
