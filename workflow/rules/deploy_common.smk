# Deploy cohorts (issue 24): their sheets checked and leakage refused before any job, and deploy.smk's helpers.
from slidemil.cohort.deploy import check_no_leakage, load_deploy_sheet
from slidemil.config import DEMO_DEPLOY_COHORT
from slidemil.demo.external import plan_external_cohort
from slidemil.files.deploy import REPORT_DIR as DEPLOY_REPORT_DIR
from slidemil.tasks import class_order

DEPLOY = f"{RESULTS}/deploy"
DEPLOY_REPORT = f"{REPORT}/{DEPLOY_REPORT_DIR}"
DEMO_EXTERNAL = f"{RESULTS}/demo_external"
POSITIVE_CLASS = config["splits"]["positive_class"]
# The task the deployed models were trained for and, for survival, the sheets' time and event columns.
DEPLOY_ENDPOINT = {"task": config["task"]}
if config["task"] == "survival":
    DEPLOY_ENDPOINT.update({f"{k}_column": config["splits"][f"{k}_column"] for k in ("time", "event")})
# A labelled multiclass cohort's classes must be among the training sheet's.
TRAINING_CLASSES = class_order(SAMPLES["label"]) if config["task"] == "multiclass" else None
# cohort -> its sheet's path, and -> {slide_id: slide file} / {slide_id: mpp override}
DEPLOY_SHEETS, DEPLOY_PATHS, DEPLOY_MPPS = {}, {}, {}


def _add_deploy_cohort(name, sheet_path, sheet):
    DEPLOY_SHEETS[name] = sheet_path
    DEPLOY_PATHS[name] = dict(zip(sheet["slide_id"], sheet["path"]))
    mpps = dict(zip(sheet["slide_id"], sheet["mpp"])) if "mpp" in sheet.columns else {}
    DEPLOY_MPPS[name] = {s: float(v) for s, v in mpps.items() if v == v}


if DEMO and config["deploy"]["demo_patients"]:
    # Planned like the demo cohort, so its jobs are known before its slides exist.
    _external = plan_external_cohort(config["deploy"]["demo_patients"], config["demo"])
    _external["path"] = [f"{DEMO_EXTERNAL}/{p}" for p in _external["path"]]
    _add_deploy_cohort(DEMO_DEPLOY_COHORT, f"{DEMO_EXTERNAL}/samples.csv", _external)
for _name, _entry in config["deploy"]["cohorts"].items():
    try:
        _sheet = load_deploy_sheet(
            _entry["samples"],
            positive_class=POSITIVE_CLASS,
            endpoint=Endpoint(**DEPLOY_ENDPOINT),
            class_names=TRAINING_CLASSES,
        )
        check_no_leakage(SAMPLES, _sheet, _entry["samples"])
    except SheetError as _error:
        sys.exit(f"deploy.cohorts.{_name}: {_error}")
    _add_deploy_cohort(_name, _entry["samples"], _sheet)
COHORTS = list(DEPLOY_SHEETS)


wildcard_constraints:
    cohort=_alternation(COHORTS) if COHORTS else "(?!)",


def deploy_slide_path(wildcards):
    return DEPLOY_PATHS[wildcards.cohort][wildcards.slide]


def deploy_mpp(wildcards):
    return DEPLOY_MPPS[wildcards.cohort].get(wildcards.slide)


def deploy_tiles(cohort, slide):
    return f"{DEPLOY}/{cohort}/tiles/{slide}.h5"


def deploy_qc(cohort, slide):
    return f"{DEPLOY}/{cohort}/tiles/qc/{slide}.png"


def deploy_tile_manifest(cohort):
    return f"{DEPLOY}/{cohort}/tiles/manifest.csv"


def deploy_feature_manifest(cohort, extractor):
    return f"{DEPLOY}/{cohort}/features/{extractor}/manifest.csv"


def deploy_cohort_tiles(wildcards):
    return [deploy_tiles(wildcards.cohort, s) for s in DEPLOY_PATHS[wildcards.cohort]]


def deploy_cohort_qc(wildcards):
    return [deploy_qc(wildcards.cohort, s) for s in DEPLOY_PATHS[wildcards.cohort]]


def deploy_cohort_features(wildcards):
    return [
        f"{DEPLOY}/{wildcards.cohort}/features/{wildcards.extractor}/{s}.h5" for s in DEPLOY_PATHS[wildcards.cohort]
    ]


def deploy_sheet(wildcards):
    return DEPLOY_SHEETS[wildcards.cohort]


def deploy_pairs():
    """The deployed (extractor, model) pairs: every MIL model on slide features (not the tile-supervised CNN)."""
    return [(e, m) for e, m in report_pairs() if e in EXTRACTORS]


def deploy_checkpoints(wildcards):
    """Every fold's model of one (extractor, model): the ensemble is their mean."""
    return [f"{train_dir(wildcards.extractor, wildcards.model, f)}/model.pt" for f in FOLDS]


def refit_dir(extractor, model):
    return f"{RESULTS}/train/{extractor}/{model}/refit"


def refit_fold_checkpoints(wildcards):
    """The refit trains for the median of these checkpoints' selected epochs."""
    return deploy_checkpoints(wildcards)


def refit_init_checkpoint(wildcards):
    """MHIM-MIL's refit starts from its baseline's refit, as its folds from their baselines'."""
    base = base_model(wildcards.model)
    return [f"{refit_dir(wildcards.extractor, base)}/model.pt"] if base else []


def deploy_refit_checkpoint(wildcards):
    """With deploy.refit, the model retrained on all non-test patients, scored beside the folds."""
    return [f"{refit_dir(wildcards.extractor, wildcards.model)}/model.pt"] if config["deploy"]["refit"] else []


def deploy_predictions(cohort, extractor, model, level):
    return f"{DEPLOY}/{cohort}/predictions/{extractor}/{model}/predictions_{level}.csv"


def deploy_report_input(level):
    def inputs(wildcards):
        return [deploy_predictions(wildcards.cohort, e, m, level) for e, m in deploy_pairs()]

    return inputs


def deploy_report_checkpoints(wildcards):
    # The heatmaps of an unlabelled cohort are drawn with each model's first fold, as the main report's.
    return [f"{train_dir(e, m, FOLDS[0])}/model.pt" for e, m in deploy_pairs()]


def deploy_report_features(wildcards):
    return [deploy_feature_manifest(wildcards.cohort, e) for e, _ in deploy_pairs()]


def deploy_report_training(wildcards):
    """Survival: every fold's training predictions of each model (the Kaplan-Meier split at the training median)."""
    if config["task"] != "survival":
        return []
    return [f"{train_dir(e, m, f)}/predictions_patients.csv" for e, m in deploy_pairs() for f in FOLDS]


def deploy_report_tiles(wildcards):
    return [] if PRECOMPUTED else [deploy_tile_manifest(wildcards.cohort)]


def deploy_report_settings():
    return {k: config["report"][k] for k in ("n_bootstrap", "reference_model", "heatmaps_per_model", "heatmap_top_k")}


DEPLOY_REPORT_FILES = ("report.html", "report.json", "predictions_slides.csv", "predictions_patients.csv")


def deploy_outputs():
    return [f"{DEPLOY_REPORT}/{c}/{name}" for c in COHORTS for name in DEPLOY_REPORT_FILES]


def deploy_missing_intermediates():
    """The deploy cohorts' files that are missing (as missing_intermediate_outputs): made again with what follows."""
    if not COHORTS or not os.path.isdir(RESULTS):
        return []
    files = []
    for c in COHORTS:
        if not PRECOMPUTED:
            files += [deploy_tile_manifest(c)] + [f(c, s) for s in DEPLOY_PATHS[c] for f in (deploy_tiles, deploy_qc)]
        for e in EXTRACTORS:
            files += [deploy_feature_manifest(c, e)] + [f"{DEPLOY}/{c}/features/{e}/{s}.h5" for s in DEPLOY_PATHS[c]]
        files += [deploy_predictions(c, e, m, level) for e, m in deploy_pairs() for level in ("slides", "patients")]
    return [f for f in files if not os.path.exists(f)]
