rule tile_slide:
    input:
        slide=slide_path,
    output:
        h5=f"{RESULTS}/tiles/{{slide}}.h5",
        qc=tiles_qc("{slide}"),
    params:
        tiling=TILING_PARAMS,
        mpp=slide_mpp_override if SLIDE_MPPS else None,
    threads: 1
    conda:
        "../envs/slidemil.yaml"
    log:
        f"{LOGS}/tiling/{{slide}}.log",
    script:
        "../scripts/tile_slide.py"


# Every slide's tiles and QC picture in one list, for the report (one input instead of 2N).
rule tile_manifest:
    input:
        tiles=[tiles_h5(s) for s in SLIDES],
        qc=[tiles_qc(s) for s in SLIDES],
    output:
        f"{RESULTS}/tiles/manifest.csv",
    localrule: True
    conda:
        "../envs/slidemil.yaml"
    log:
        f"{LOGS}/tiling/manifest.log",
    script:
        "../scripts/manifest.py"
