rule tile_slide:
    input:
        slide=slide_path,
    output:
        h5=f"{RESULTS}/tiles/{{slide}}.h5",
        qc=tiles_qc("{slide}"),
    log:
        f"{LOGS}/tiling/{{slide}}.log",
    conda:
        "../envs/slidemil.yaml"
    threads: 1
    params:
        tiling=TILING_PARAMS,
        mpp=slide_mpp_override if SLIDE_MPPS else None,
    script:
        "../scripts/tile_slide.py"


# Every slide's tiles and QC picture in one list, for the report (one input instead of 2N).
rule tile_manifest:
    input:
        tiles=[tiles_h5(s) for s in SLIDES],
        qc=[tiles_qc(s) for s in SLIDES],
    output:
        f"{RESULTS}/tiles/manifest.csv",
    log:
        f"{LOGS}/tiling/manifest.log",
    localrule: True
    conda:
        "../envs/slidemil.yaml"
    script:
        "../scripts/manifest.py"
