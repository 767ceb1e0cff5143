# Config and sample-sheet validation, wildcard constraints, and every input/params helper.
import os
import re
import sys

from snakemake.utils import validate

# The installed package; rules use only its light modules (no torch, OpenCV or tqdm at DAG build).
from slidemil.cohort.sheet import Endpoint, SheetError, check_sheet, load_sheet
from slidemil.config import ConfigError, TileSupervised, check_config
from slidemil.demo.plan import SIGNAL_KEYS as DEMO_SIGNAL_KEYS, plan_cohort
from slidemil.names import (
    RESULT_FIGURES,
    SIMCLR_EXTRACTORS,
    SIMCLR_WEIGHTS,
    TILE_MODEL,
    TILE_SLOT,
    base_model,
    report_captions,
)
from slidemil.weights import is_local, missing_weights, weights_files

# The one check of the config, before anything reads it: defaults filled in (a partial --configfile, a
# module's config: or a run without config/config.yaml gets them too), the first problem as one line.
try:
    _checked = check_config(config)
except ConfigError as _error:
    sys.exit(str(_error))
config.clear()
config.update(_checked)

RESULTS = config["results"].rstrip("/")
LOGS = f"{RESULTS}/logs"
DEMO = not config.get("samples")
# The label column must fit the split settings, with both classes; checked with the rest of the sheet before any
# job runs.
LABEL_SETTINGS = {
    "binarize": config["splits"]["binarize"],
    "positive_class": config["splits"]["positive_class"],
    "both_classes": True,
    # The task (config `task`) the outcome columns must fit; each class needs a patient per drawn fold.
    "endpoint": Endpoint(
        config["task"],
        None if config["splits"]["fold_column"] else config["splits"]["folds"],
        config["splits"]["time_column"],
        config["splits"]["event_column"],
    ),
}

if DEMO:
    # The demo cohort is planned from its settings alone, so the DAG is known before any slide exists.
    SHEET = f"{RESULTS}/demo/samples.csv"
    SAMPLES = plan_cohort(
        n_patients=config["demo"]["n_patients"],
        seed=config["demo"]["seed"],
        two_slide_fraction=config["demo"]["two_slide_fraction"],
        positive_fraction=config["demo"]["positive_fraction"],
        task=config["demo"]["task"],
        signal={k: config["demo"][k] for k in DEMO_SIGNAL_KEYS},
    )
    SAMPLES["path"] = [f"{RESULTS}/demo/{p}" for p in SAMPLES["path"]]
    _problems = check_sheet(SAMPLES, check_files=False, **LABEL_SETTINGS)
    if _problems:
        sys.exit(str(SheetError("demo cohort", _problems)))  # one line per problem, no traceback around them
else:
    SHEET = config["samples"]
    try:
        SAMPLES = load_sheet(SHEET, **LABEL_SETTINGS)
    except SheetError as _error:
        sys.exit(str(_error))  # every problem of the sheet, without Snakemake's traceback around them

validate(SAMPLES, "../schemas/samples.schema.yaml")
SAMPLES = SAMPLES.set_index("slide_id", drop=False)
SLIDES = SAMPLES["slide_id"].tolist()
# A cohort with its own per-slide feature files enters at training: the sheet's paths are those files.
PRECOMPUTED = config["features"]["precomputed"]
EXTRACTORS = [PRECOMPUTED] if PRECOMPUTED else config["features"]["extractors"]
MODELS = config["mil"]["models"]
FOLD_COLUMN = config["splits"]["fold_column"]
if FOLD_COLUMN:
    if FOLD_COLUMN not in SAMPLES.columns:
        raise SheetError(SHEET, [f"splits.fold_column {FOLD_COLUMN!r} is not a column of the sheet"])
    FOLDS = list(range(SAMPLES[FOLD_COLUMN].nunique()))
else:
    FOLDS = list(range(config["splits"]["folds"]))


def _alternation(names):
    return "|".join(re.escape(str(n)) for n in names)


# ---- inputs ----------------------------------------------------------------


# Plain dicts: Snakemake calls these once per job, and a pandas .loc lookup costs ~100 us.
SLIDE_PATHS = dict(zip(SAMPLES["slide_id"], SAMPLES["path"]))
SLIDE_MPPS = dict(zip(SAMPLES["slide_id"], SAMPLES["mpp"])) if "mpp" in SAMPLES.columns else {}


def slide_path(wildcards):
    return SLIDE_PATHS[wildcards.slide]


def tiles_h5(slide):
    return f"{RESULTS}/tiles/{slide}.h5"


def tiles_qc(slide):
    return f"{RESULTS}/tiles/qc/{slide}.png"


TILE_MANIFEST = f"{RESULTS}/tiles/manifest.csv"


def features_h5(extractor, slide):
    return f"{RESULTS}/features/{extractor}/{slide}.h5"


def feature_manifest(extractor):
    return f"{RESULTS}/features/{extractor}/manifest.csv"


def usable_manifest():
    """The manifest that says which slides are usable: the tile manifest, or the precomputed features' one."""
    return feature_manifest(PRECOMPUTED) if PRECOMPUTED else TILE_MANIFEST


def extractor_slide_features(wildcards):
    return [features_h5(wildcards.extractor, s) for s in SLIDES]


def extractor_features(wildcards):
    return feature_manifest(wildcards.extractor)


TRAIN_FILES = ("model.pt", "history.csv", "predictions_slides.csv", "predictions_patients.csv")


def train_dir(extractor, model, fold):
    return f"{RESULTS}/train/{extractor}/{model}/fold_{fold}"


def trained_models():
    """The configured models plus the baselines MHIM-MIL models need, reported side by side."""
    models = [m for m in MODELS if m != TILE_MODEL]
    for m in models:
        if base_model(m) and base_model(m) not in models:
            models.insert(models.index(m), base_model(m))
    return models


def train_runs():
    runs = [(e, m, f) for e in EXTRACTORS for m in trained_models() for f in FOLDS]
    if TILE_MODEL in MODELS:
        runs += [(TILE_SLOT, TILE_MODEL, f) for f in FOLDS]
    return runs


# ---- params: exactly the config slice that shapes each output ---------------


# The survival columns shape only a survival task's splits, and the task only when it is not binary (a binary run keeps
# its params, so nothing reruns).
SURVIVAL_SETTINGS = ("time_column", "event_column")


def splits_params():
    settings = {k: v for k, v in config["splits"].items() if k not in SURVIVAL_SETTINGS}
    if config["task"] != "binary":
        settings["task"] = config["task"]
    if config["task"] == "survival":
        settings |= {k: config["splits"][k] for k in SURVIVAL_SETTINGS}
    return settings


# on_error only decides what happens to unusable slides: changing it must not retile good ones.
TILING_PARAMS = {k: v for k, v in config["tiling"].items() if k != "on_error"}


def slide_mpp_override(wildcards):
    value = SLIDE_MPPS.get(wildcards.slide)
    return None if value is None or value != value else float(value)


def extractor_params(wildcards):
    settings = dict(config["features"]["settings"][wildcards.extractor])
    # The seed shapes features only through random weights; elsewhere it must not trigger reruns.
    if settings.get("weights") == "random":
        settings["seed"] = config["seed"]
    if settings.get("weights") == SIMCLR_WEIGHTS:
        settings["seed"], settings["simclr"] = config["seed"], dict(config["simclr"])
    return settings


def model_params(wildcards):
    settings = dict(config["mil"]["settings"].get(wildcards.model) or {})
    base = base_model(wildcards.model)
    if base:
        # The student and teacher must have the architecture of the checkpoint they start from.
        settings["base_kwargs"] = dict(config["mil"]["settings"].get(base) or {})
    return settings


def init_checkpoint(wildcards):
    """MHIM-MIL starts from its baseline trained on the same fold."""
    base = base_model(wildcards.model)
    return [f"{train_dir(wildcards.extractor, base, wildcards.fold)}/model.pt"] if base else []


wildcard_constraints:
    # Slide ids never contain "/" (sheet schema); matching 1,000 ids as an alternation slows the DAG.
    slide=r"[^/]+",
    extractor=_alternation(EXTRACTORS),
    model=_alternation(trained_models()),
    fold=r"\d+",


# ---- SimCLR pre-training and the tile-supervised baseline -------------------


def simclr_backbone(arch):
    return f"{RESULTS}/simclr/{arch}/backbone.pt"


def _simclr_backbones(extractor):
    settings = config["features"]["settings"].get(extractor) or {}
    if settings.get("weights") != SIMCLR_WEIGHTS:
        return []
    return [simclr_backbone(SIMCLR_EXTRACTORS[extractor])]


def extractor_simclr_weights(wildcards):
    """The SimCLR backbone an extractor with weights "simclr" is loaded from (nothing for other weights)."""
    return _simclr_backbones(wildcards.extractor)


USES_SIMCLR = any(_simclr_backbones(e) for e in EXTRACTORS)


# ---- local weights files: inputs, so that replacing one at the same path reruns its extraction ----


def _local_weights(extractor):
    weights = (config["features"]["settings"].get(extractor) or {}).get("weights")
    return weights_files(weights) if is_local(weights) else []


def extractor_weights_files(wildcards):
    """The local weights file(s) of an extractor (a snapshot folder's weight files); nothing for named weights."""
    return _local_weights(wildcards.extractor)


# Missing weights end the run before any job, with one line saying where the model card is.
for _extractor in [] if PRECOMPUTED else EXTRACTORS:
    _weights = config["features"]["settings"][_extractor]["weights"]
    if is_local(_weights) and missing_weights(_extractor, _weights):
        sys.exit(f"config: {missing_weights(_extractor, _weights)}")
USES_LOCAL_WEIGHTS = not PRECOMPUTED and any(_local_weights(e) for e in EXTRACTORS)


def tile_model_settings():
    settings = dict(config["mil"]["settings"].get(TILE_MODEL) or {})
    settings.setdefault("arch", TileSupervised.arch)
    return settings


def tile_model_params(wildcards):
    settings = tile_model_settings()
    if settings.get("init") == SIMCLR_WEIGHTS:
        settings["simclr"] = dict(config["simclr"])
    return settings


def tile_model_init(wildcards):
    settings = tile_model_settings()
    return [simclr_backbone(settings["arch"])] if settings.get("init") == SIMCLR_WEIGHTS else []


def all_slide_files(wildcards=None):
    return [SAMPLES.loc[s, "path"] for s in SLIDES]


def all_tiles(wildcards=None):
    return [tiles_h5(s) for s in SLIDES]


# ---- the report and its heatmaps (rules in report.smk) ----
# The report (issue 7): one heatmaps job per (extractor, model), then one report job.
# The report reads the manifests and the heatmap indexes, never the per-slide files or a checkpoint, and needs
# no torch; its params leave out the heatmap settings, so editing report.n_bootstrap redraws no heatmap.

REPORT = f"{RESULTS}/report"
REPORT_TABLES = ("comparison.csv", "encoder_comparison.csv", "cohort.csv", "splits_summary.csv", "report.json")
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


def report_has_encoder_comparison():
    # Every MIL model trains on every extractor's features: two extractors give each model a comparison, on the
    # task's first metric (slidemil.report.page, slidemil.report.endpoints).
    return len(EXTRACTORS) > 1 and bool(trained_models())


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


def report_run_settings():
    """The settings the results are made with (no compute resources): the report records them and their digest."""
    # splits_params(): a binary run records what it did before tasks existed (its digest stays), others their task.
    settings = {"seed": config["seed"], "splits": splits_params(), "mil": config["mil"], "report": config["report"]}
    features = {k: v for k, v in config["features"].items() if k != "settings"}
    settings["features"] = {**features, "settings": {e: config["features"]["settings"].get(e) for e in EXTRACTORS}}
    if not PRECOMPUTED:
        settings["tiling"] = TILING_PARAMS
    if USES_SIMCLR or (TILE_MODEL in MODELS and tile_model_init(None)):
        settings["simclr"] = config["simclr"]
    if DEMO:
        settings["demo"] = config["demo"]
    return settings


def report_deploy_cohorts(wildcards):
    """The deploy cohorts whose pages the main report links to (COHORTS: deploy_common.smk, parsed later)."""
    return COHORTS


def report_first_checkpoint(wildcards):
    """The heatmaps are drawn with the model of the first fold."""
    return f"{train_dir(wildcards.extractor, wildcards.model, FOLDS[0])}/model.pt"


def report_page_outputs():
    files = [f"{REPORT}/report.html"] + [f"{REPORT}/{n}" for n in REPORT_TABLES]
    files += [png for _, _, png in report_histories_png()]
    files += [f"{REPORT}/encoder_comparison.png"] if report_has_encoder_comparison() else []
    return files + ([f"{REPORT}/comparison.png"] if report_has_comparison() else [])


def report_result_figures():
    """(extractor, model, png) of each model's results figure: ROC curves, or the task's (slidemil.names)."""
    kind = RESULT_FIGURES[config["task"]][0]
    return [(e, m, f"{REPORT}/{kind}_{e}_{m}.png") for e, m in report_pairs()]


RESULT_FIGURES_TITLE = RESULT_FIGURES[config["task"]][1]


def report_outputs():
    pngs = [png for _, _, png in report_result_figures()]
    tables = [f"{REPORT}/{name}" for name in ("summary.csv", "summary.md", "per_fold.csv", "excluded.csv")]
    return tables + pngs + report_page_outputs()


def missing_intermediate_outputs():
    """The files the report is built from, down to the per-slide ones, that are missing: targets of rule all.

    Snakemake does not rebuild a missing intermediate file while the files made from it exist: a training job
    that failed (its outputs deleted) or a deleted feature file would leave the old report standing, and the
    next run would have "Nothing to be done". As targets they are made again, and all that follows. Only the
    missing ones are listed (a stat each, ~20 ms at 1,000 slides; listing all ~4,000 cost 0.5 s of DAG time).
    """
    if not os.path.isdir(RESULTS):
        return []  # a first run: every job runs anyway
    files = [] if PRECOMPUTED else [TILE_MANIFEST] + [tiles_h5(s) for s in SLIDES] + [tiles_qc(s) for s in SLIDES]
    for e in EXTRACTORS:
        files += [feature_manifest(e)] + [features_h5(e, s) for s in SLIDES] + _simclr_backbones(e)
    files += tile_model_init(None) if TILE_MODEL in MODELS else []
    files.append(f"{RESULTS}/splits/splits.csv")
    files += [f"{train_dir(e, m, f)}/{name}" for e, m, f in train_runs() for name in TRAIN_FILES]
    return [f for f in files + report_heatmaps(None) if not os.path.exists(f)]
