# The report and its heatmaps; their input helpers are at the end of common.smk (lint: no functions here).
rule heatmaps:
    input:
        checkpoint=report_first_checkpoint,
        splits=f"{RESULTS}/splits/splits.csv",
        sheet=SHEET,
        features=extractor_features,
        tiles=TILE_MANIFEST,
    output:
        index=f"{REPORT}/heatmaps/{{extractor}}/{{model}}.json",
        pngs=report(
            directory(f"{REPORT}/heatmaps/{{extractor}}/{{model}}"),
            patterns=["{name}.png"],
            category="5. Attention heatmaps",
            caption="../report/heatmap.rst",
        ),
    log:
        f"{LOGS}/report/heatmaps_{{extractor}}_{{model}}.log",
    conda:
        "../envs/slidemil.yaml"
    resources:
        device=config["compute"]["device"],
    params:
        settings=report_heatmap_settings(),
        fold=FOLDS[0],
    script:
        "../scripts/heatmaps.py"


rule report:
    input:
        predictions=report_predictions,
        histories=report_histories,
        splits=f"{RESULTS}/splits/splits.csv",
        sheet=SHEET,
        features=report_features,
        tiles=report_tiles,
        heatmaps=report_heatmaps,
    output:
        # The report(...) flags put the same figures into `snakemake --report`.
        html=report(f"{REPORT}/report.html", category="1. Results report", caption="../report/report_html.rst"),
        tables=[f"{REPORT}/{name}" for name in ("summary.csv", "summary.md", "per_fold.csv", "excluded.csv")],
        page_tables=[f"{REPORT}/{name}" for name in REPORT_TABLES],
        roc=[
            report(
                png,
                category=f"2. {RESULT_FIGURES_TITLE}",
                subcategory=e,
                labels={"extractor": e, "model": m},
                caption="../report/roc.rst",
            )
            for e, m, png in report_result_figures()
        ],
        history=[
            report(
                png,
                category="4. Training curves",
                subcategory=e,
                labels={"extractor": e, "model": m},
                caption="../report/history.rst",
            )
            for e, m, png in report_histories_png()
        ],
        comparison=(
            [
                report(
                    f"{REPORT}/comparison.png",
                    category="3. Model comparison",
                    caption="../report/comparison.rst",
                )
            ]
            if report_has_comparison()
            else []
        ),
        encoder_comparison=(
            [
                report(
                    f"{REPORT}/encoder_comparison.png",
                    category="3. Model comparison",
                    caption="../report/encoder_comparison.rst",
                )
            ]
            if report_has_encoder_comparison()
            else []
        ),
    log:
        f"{LOGS}/report.log",
    conda:
        "../envs/slidemil.yaml"
    params:
        report=report_settings(),
        seed=config["seed"],
        # recorded in report.json and on the page with their digest, so a report says what made it
        run_settings=report_run_settings(),
        # Same order as the inputs: one entry per trained (extractor, model, fold).
        runs=[{"extractor": e, "model": m, "fold": f} for e, m, f in train_runs()],
        # the deploy cohorts whose pages the report links to (deploy_common.smk)
        deploy_cohorts=report_deploy_cohorts,
        # the metric's name in the figures' captions, from slidemil.names (a caption cannot import it)
        captions=report_captions(config["task"]),
    script:
        "../scripts/report.py"
