# Deploy cohorts (issue 24): their slides tiled and extracted with the training settings, every fold's model
# scoring them, one report per cohort. Nothing here is an input of training: adding a cohort never retrains.
if DEMO and config["deploy"]["demo_patients"]:

    rule demo_external_cohort:
        output:
            sheet=f"{DEMO_EXTERNAL}/samples.csv",
            slides=list(DEPLOY_PATHS[DEMO_DEPLOY_COHORT].values()),
        log:
            f"{LOGS}/demo_external_cohort.log",
        conda:
            "../envs/slidemil.yaml"
        params:
            demo=config["demo"],
            n_patients=config["deploy"]["demo_patients"],
        script:
            "../scripts/demo_external_cohort.py"


rule deploy_tile_slide:
    input:
        slide=deploy_slide_path,
    output:
        h5=f"{DEPLOY}/{{cohort}}/tiles/{{slide}}.h5",
        qc=f"{DEPLOY}/{{cohort}}/tiles/qc/{{slide}}.png",
    log:
        f"{LOGS}/deploy/{{cohort}}/tiling/{{slide}}.log",
    conda:
        "../envs/slidemil.yaml"
    threads: 1
    params:
        tiling=TILING_PARAMS,
        mpp=deploy_mpp,
    script:
        "../scripts/tile_slide.py"


rule deploy_tile_manifest:
    input:
        tiles=deploy_cohort_tiles,
        qc=deploy_cohort_qc,
    output:
        f"{DEPLOY}/{{cohort}}/tiles/manifest.csv",
    log:
        f"{LOGS}/deploy/{{cohort}}/tiling/manifest.log",
    localrule: True
    conda:
        "../envs/slidemil.yaml"
    script:
        "../scripts/manifest.py"


if PRECOMPUTED:

    rule deploy_import_features:
        input:
            deploy_slide_path,
        output:
            f"{DEPLOY}/{{cohort}}/features/{PRECOMPUTED}/{{slide}}.h5",
        log:
            f"{LOGS}/deploy/{{cohort}}/features/{PRECOMPUTED}/{{slide}}.log",
        conda:
            "../envs/slidemil.yaml"
        params:
            extractor=PRECOMPUTED,
        script:
            "../scripts/import_features.py"

else:

    # The training cohort's extractor settings and weights (the same params, the same weights files).
    rule deploy_extract_features:
        input:
            tiles=f"{DEPLOY}/{{cohort}}/tiles/{{slide}}.h5",
            simclr=extractor_simclr_weights if USES_SIMCLR else [],
            weights=extractor_weights_files if USES_LOCAL_WEIGHTS else [],
        output:
            f"{DEPLOY}/{{cohort}}/features/{{extractor}}/{{slide}}.h5",
        log:
            f"{LOGS}/deploy/{{cohort}}/features/{{extractor}}/{{slide}}.log",
        conda:
            "../envs/slidemil.yaml"
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


rule deploy_feature_manifest:
    input:
        features=deploy_cohort_features,
    output:
        f"{DEPLOY}/{{cohort}}/features/{{extractor}}/manifest.csv",
    log:
        f"{LOGS}/deploy/{{cohort}}/features/{{extractor}}/manifest.log",
    localrule: True
    conda:
        "../envs/slidemil.yaml"
    script:
        "../scripts/manifest.py"


# deploy.refit: one model per extractor x model on all non-test patients, for the median of its folds' selected
# epochs (slidemil.mil.refit). It reads the fold models and never changes them: adding it retrains no fold.
rule refit:
    input:
        features=extractor_features,
        splits=f"{RESULTS}/splits/splits.csv",
        folds=refit_fold_checkpoints,
        init=refit_init_checkpoint,
    output:
        [f"{RESULTS}/train/{{extractor}}/{{model}}/refit/{name}" for name in TRAIN_FILES],
    log:
        f"{LOGS}/train/{{extractor}}/{{model}}/refit.log",
    benchmark:
        f"{LOGS}/train/{{extractor}}/{{model}}/refit.benchmark.tsv"
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
        "../scripts/refit.py"


# One job per cohort x extractor x model: every fold's model and their ensemble (and the refit model).
rule predict:
    input:
        checkpoints=deploy_checkpoints,
        refit=deploy_refit_checkpoint,
        features=f"{DEPLOY}/{{cohort}}/features/{{extractor}}/manifest.csv",
        # the training features' extractor and weights digest, which the cohort's must match
        training=extractor_features,
        sheet=deploy_sheet,
    output:
        slides=deploy_predictions("{cohort}", "{extractor}", "{model}", "slides"),
        patients=deploy_predictions("{cohort}", "{extractor}", "{model}", "patients"),
    log:
        f"{LOGS}/deploy/{{cohort}}/predict_{{extractor}}_{{model}}.log",
    conda:
        "../envs/slidemil.yaml"
    threads: config["compute"]["train_threads"]
    resources:
        device=config["compute"]["device"],
    params:
        positive_class=POSITIVE_CLASS,
        endpoint=DEPLOY_ENDPOINT,
    script:
        "../scripts/predict.py"


rule deploy_report:
    input:
        slides=deploy_report_input("slides"),
        patients=deploy_report_input("patients"),
        checkpoints=deploy_report_checkpoints,
        features=deploy_report_features,
        tiles=deploy_report_tiles,
        training=deploy_report_training,
        sheet=deploy_sheet,
    output:
        html=f"{DEPLOY_REPORT}/{{cohort}}/report.html",
        tables=[f"{DEPLOY_REPORT}/{{cohort}}/{name}" for name in DEPLOY_REPORT_FILES[1:]],
    log:
        f"{LOGS}/deploy/{{cohort}}/report.log",
    conda:
        "../envs/slidemil.yaml"
    resources:
        device=config["compute"]["device"],
    params:
        settings=deploy_report_settings(),
        seed=config["seed"],
        positive_class=POSITIVE_CLASS,
        endpoint=DEPLOY_ENDPOINT,
        runs=[{"extractor": e, "model": m} for e, m in deploy_pairs()],
    script:
        "../scripts/deploy_report.py"
