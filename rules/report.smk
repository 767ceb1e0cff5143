rule report:
    input:
        predictions=report_predictions,
        histories=report_histories,
        features=report_features,
    output:
        report_outputs(),
    params:
        report=config["report"],
        seed=config["seed"],
        # Same order as the inputs: one entry per trained (extractor, model, fold).
        runs=[{"extractor": e, "model": m, "fold": f} for e, m, f in train_runs()],
    conda:
        "../envs/slidemil.yaml"
    log:
        f"{LOGS}/report.log",
    script:
        "../workflow/scripts/report.py"
