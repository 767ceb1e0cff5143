# Config and sample-sheet validation, wildcard constraints, and every input/params helper.
import re
import sys
from pathlib import Path

from snakemake.utils import validate

# The package lives in workflow/; rules only use its light modules (no torch at DAG build).
sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))
from slidemil import demo as slidemil_demo  # noqa: E402
from slidemil.sheet import SheetError, check_sheet, load_sheet  # noqa: E402

validate(config, "../config/schemas/config.schema.yaml")

RESULTS = config["results"].rstrip("/")
LOGS = f"{RESULTS}/logs"
DEMO = not config.get("samples")

if DEMO:
    # The demo cohort is planned from its settings alone, so the DAG is known before any slide exists.
    SHEET = f"{RESULTS}/demo/samples.csv"
    SAMPLES = slidemil_demo.plan_cohort(
        n_patients=config["demo"]["n_patients"],
        seed=config["demo"]["seed"],
        two_slide_fraction=config["demo"]["two_slide_fraction"],
        positive_fraction=config["demo"]["positive_fraction"],
    )
    SAMPLES["path"] = [f"{RESULTS}/demo/{p}" for p in SAMPLES["path"]]
    _problems = check_sheet(SAMPLES, check_files=False)
    if _problems:
        raise SheetError("demo cohort", _problems)
else:
    SHEET = config["samples"]
    SAMPLES = load_sheet(SHEET)

validate(SAMPLES, "../config/schemas/samples.schema.yaml")
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
MHIM_PREFIX = "mhim_"


def base_model(model):
    """The baseline an MHIM-MIL model is built on (its teacher), or None."""
    return model[len(MHIM_PREFIX):] if model.startswith(MHIM_PREFIX) else None




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


def features_h5(extractor, slide):
    return f"{RESULTS}/features/{extractor}/{slide}.h5"


def extractor_features(wildcards):
    return [features_h5(wildcards.extractor, s) for s in SLIDES]


TRAIN_FILES = ("model.pt", "history.csv", "predictions_slides.csv", "predictions_patients.csv")


def train_dir(extractor, model, fold):
    return f"{RESULTS}/train/{extractor}/{model}/fold_{fold}"


def trained_models():
    """The configured models plus the baselines MHIM-MIL models need, reported side by side."""
    models = list(MODELS)
    for m in MODELS:
        if base_model(m) and base_model(m) not in models:
            models.insert(models.index(m), base_model(m))
    return models


def train_runs():
    return [(e, m, f) for e in EXTRACTORS for m in trained_models() for f in FOLDS]


def report_predictions(wildcards):
    return [f"{train_dir(e, m, f)}/predictions_patients.csv" for e, m, f in train_runs()]


def report_histories(wildcards):
    return [f"{train_dir(e, m, f)}/history.csv" for e, m, f in train_runs()]


def report_outputs():
    pngs = [f"{RESULTS}/report/roc_{e}_{m}.png" for e in EXTRACTORS for m in trained_models()]
    tables = [f"{RESULTS}/report/{name}" for name in ("summary.csv", "summary.md", "per_fold.csv")]
    return tables + pngs


# ---- params: exactly the config slice that shapes each output ---------------


def slide_mpp_override(wildcards):
    value = SLIDE_MPPS.get(wildcards.slide)
    return None if value is None or value != value else float(value)


def extractor_params(wildcards):
    settings = dict(config["features"]["settings"][wildcards.extractor])
    # The seed shapes features only through random weights; elsewhere it must not trigger reruns.
    if settings.get("weights") == "random":
        settings["seed"] = config["seed"]
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
