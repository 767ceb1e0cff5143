rule tile_slide:
    input:
        slide=slide_path,
    output:
        h5=f"{RESULTS}/tiles/{{slide}}.h5",
        qc=f"{RESULTS}/tiles/qc/{{slide}}.png",
    params:
        tiling=tiling_params,
        mpp=slide_mpp_override,
    threads: 1
    conda:
        "../envs/slidemil.yaml"
    log:
        f"{LOGS}/tiling/{{slide}}.log",
    script:
        "../workflow/scripts/tile_slide.py"
