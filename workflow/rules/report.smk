# The report (issue 7): one heatmaps job per (extractor, model), then one report job.
# The report reads the manifests and the heatmap indexes, never the per-slide files or a checkpoint, and needs
# no torch; its params leave out the heatmap settings, so editing report.n_bootstrap redraws no heatmap.

REPORT = f"{RESULTS}/report"
REPORT_TABLES = ("comparison.csv", "cohort.csv", "splits_summary.csv", "report.json")
# The report settings that shape only the heatmaps: params of the heatmaps rule, not of the report rule.
HEATMAP_SETTINGS = ("heatmaps_per_model", "heatmap_top_k")


def report_predictions(wildcards):
    return [f"{train_dir(e, m, f)}/predictions_patients.csv" for e, m, f in train_runs()]


def report_histories(wildcards):
    return [f"{train_dir(e, m, f)}/history.csv" for e, m, f in train_runs()]


def report_pairs():
    """Each reported (extractor, model) once, in the order of train_runs()."""
    return list(dict.fromkeys((e, m) for e, m, _ in train_runs()))


def report_features(wildcards):
    return [feature_manifest(e) for e in EXTRACTORS]


def report_tiles(wildcards):
    # Precomputed features come without tiling: no tiles, QC pictures or heatmaps.
    return [] if PRECOMPUTED else [TILE_MANIFEST]


def report_histories_png():
    return [(e, m, f"{REPORT}/history_{e}_{m}.png") for e, m in report_pairs()]


def report_has_comparison():
    models = trained_models()
    return config["report"]["reference_model"] in models and len(models) > 1


def report_has_heatmaps():
    return not PRECOMPUTED and config["report"]["heatmaps_per_model"] > 0


def report_heatmap_pairs():
    """The (extractor, model) pairs with heatmaps: MIL models on tile features (not the tile-supervised CNN)."""
    return [(e, m) for e, m in report_pairs() if e in EXTRACTORS] if report_has_heatmaps() else []


def report_heatmap_dir(extractor, model):
    return f"{REPORT}/heatmaps/{extractor}/{model}"


def report_heatmaps(wildcards):
    return [f"{report_heatmap_dir(e, m)}.json" for e, m in report_heatmap_pairs()]


def report_settings():
    return {k: v for k, v in config["report"].items() if k not in HEATMAP_SETTINGS}


def report_heatmap_settings():
    # The seed draws the slides shown, so it shapes the heatmaps as well.
    return {**{k: config["report"][k] for k in HEATMAP_SETTINGS}, "seed": config["seed"]}


def report_first_checkpoint(wildcards):
    """The heatmaps are drawn with the model of the first fold."""
    return f"{train_dir(wildcards.extractor, wildcards.model, FOLDS[0])}/model.pt"


def report_page_outputs():
    files = [f"{REPORT}/report.html"] + [f"{REPORT}/{n}" for n in REPORT_TABLES]
    files += [png for _, _, png in report_histories_png()]
    return files + ([f"{REPORT}/comparison.png"] if report_has_comparison() else [])


def report_outputs():
    pngs = [f"{REPORT}/roc_{e}_{m}.png" for e, m in report_pairs()]
    tables = [f"{REPORT}/{name}" for name in ("summary.csv", "summary.md", "per_fold.csv", "excluded.csv")]
    return tables + pngs + report_page_outputs()


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
    params:
        settings=report_heatmap_settings(),
        fold=FOLDS[0],
    resources:
        device=config["compute"]["device"],
    conda:
        "../envs/slidemil.yaml"
    log:
        f"{LOGS}/report/heatmaps_{{extractor}}_{{model}}.log",
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
        html=report(
            f"{REPORT}/report.html", category="1. Results report", caption="../report/report_html.rst"
        ),
        tables=[f"{REPORT}/{name}" for name in ("summary.csv", "summary.md", "per_fold.csv", "excluded.csv")],
        page_tables=[f"{REPORT}/{name}" for name in REPORT_TABLES],
        roc=[
            report(
                f"{REPORT}/roc_{e}_{m}.png",
                category="2. ROC curves",
                subcategory=e,
                labels={"extractor": e, "model": m},
                caption="../report/roc.rst",
            )
            for e, m in report_pairs()
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
    params:
        report=report_settings(),
        seed=config["seed"],
        # Same order as the inputs: one entry per trained (extractor, model, fold).
        runs=[{"extractor": e, "model": m, "fold": f} for e, m, f in train_runs()],
    conda:
        "../envs/slidemil.yaml"
    log:
        f"{LOGS}/report.log",
    script:
        "../scripts/report.py"
