"""Names the DAG and the config check need before torch is imported.

The registries that build models and extractors import torch; the workflow must not (``snakemake -n``
stays light), so their names and each MIL builder's keyword arguments are declared here.
tests/test_config.py asserts that these declarations equal the real registries, so they cannot drift.

A SimCLR extractor is a registered architecture (``shufflenet_v2``, ``resnet18``,
``resnet50_trunc``) whose weights come from SimCLR pre-training on the cohort's
own training tiles (``results/simclr/{architecture}/backbone.pt``).
"""

from typing import NamedTuple

SIMCLR_EXTRACTORS = {
    "shufflenet_simclr": "shufflenet_v2",    # DeepSMILE, TCGA-BC
    "resnet18_simclr": "resnet18",           # DeepSMILE, TCGA-CRCk
    "resnet50_simclr": "resnet50_trunc",
}
# Weights setting that means "the cohort's own SimCLR backbone" (resolved by the workflow to a file).
SIMCLR_WEIGHTS = "simclr"


class EncoderCard(NamedTuple):
    """What a foundation-model encoder expects, from its model card: tile px and magnification (um/px), the
    feature size, where its weights are published and which file(s) to copy, and their licence."""
    px: int
    mpp: float
    dim: int
    card: str
    files: str
    licence: str


_HF = "https://huggingface.co/"
# Pathology foundation-model encoders (slidemil.features.encoders), loaded with timm from local weights only.
ENCODER_CARDS = {
    "uni": EncoderCard(224, 0.5, 1024, _HF + "MahmoodLab/UNI", "pytorch_model.bin", "CC-BY-NC-ND-4.0"),
    "uni2_h": EncoderCard(224, 0.5, 1536, _HF + "MahmoodLab/UNI2-h", "pytorch_model.bin", "CC-BY-NC-ND-4.0"),
    "virchow2": EncoderCard(224, 0.5, 2560, _HF + "paige-ai/Virchow2", "pytorch_model.bin or model.safetensors",
                            "CC-BY-NC-ND-4.0"),
    "h_optimus_0": EncoderCard(224, 0.5, 1536, _HF + "bioptimus/H-optimus-0", "pytorch_model.bin", "Apache-2.0"),
    "h_optimus_1": EncoderCard(224, 0.5, 1536, _HF + "bioptimus/H-optimus-1", "pytorch_model.bin",
                               "gated; Bioptimus terms on the card"),
    "gigapath": EncoderCard(224, 0.5, 1536, _HF + "prov-gigapath/prov-gigapath", "pytorch_model.bin",
                            "Apache-2.0 (gated, research use)"),
    "phikon_v2": EncoderCard(224, 0.5, 1024, _HF + "owkin/phikon-v2", "model.safetensors",
                             "Owkin non-commercial licence (LICENSE.pdf on the card)"),
    # Natural-image DINOv2 (LVD-142M), small enough for CPUs: a baseline, and the encoder tests run for real.
    "dinov2_vits14": EncoderCard(224, 0.5, 384, _HF + "timm/vit_small_patch14_dinov2.lvd142m", "model.safetensors",
                                 "Apache-2.0"),
}
# Any timm architecture with local weights; its architecture, normalisation and pooling are settings.
TIMM_EXTRACTOR = "timm"
TIMM_OPTIONS = ("arch", "timm_kwargs", "mean", "std", "pool")
ENCODER_POOLS = ("model", "cls", "mean", "cls_mean")
# Every registered feature extractor (slidemil.features.extractors).
EXTRACTORS = ("resnet50_trunc", "shufflenet_v2", "resnet18", *SIMCLR_EXTRACTORS, *ENCODER_CARDS, TIMM_EXTRACTOR)

# MHIM-MIL wraps an attention model: ``mhim_<base>`` trains a student/teacher pair of ``<base>``.
MHIM_PREFIX = "mhim_"
MHIM_BASES = ("abmil", "transmil")
_MHIM_PARAMS = ("base_kwargs", "preset", "mask_ratio_r", "mask_ratio_l", "mask_ratio_h", "mask_ratio_hr", "alpha",
                "momentum_schedule", "mask_ratio_h_decay", "mask_attention", "temp_t", "temp_s", "momentum",
                "init_student", "evaluate")
# MHIM-MIL's published settings per base (METHODS section 5; the authors' README for mask_ratio_hr and the momentum
# schedule), ``preset:``; settings given explicitly win (slidemil.mil.models.mhim).
MHIM_PRESETS = {
    "camelyon16": {
        "abmil": {"mask_ratio_r": 0.5, "mask_ratio_l": 0.0, "mask_ratio_h": 0.01, "mask_ratio_hr": 0.5,
                  "alpha": 0.1, "momentum_schedule": False},
        "transmil": {"mask_ratio_r": 0.0, "mask_ratio_l": 0.8, "mask_ratio_h": 0.03, "mask_ratio_hr": 0.5,
                     "alpha": 0.1, "momentum_schedule": True},
    },
    "tcga": {
        "abmil": {"mask_ratio_r": 0.7, "mask_ratio_l": 0.2, "mask_ratio_h": 0.02, "mask_ratio_hr": 1.0,
                  "alpha": 0.5, "momentum_schedule": True},
        "transmil": {"mask_ratio_r": 0.6, "mask_ratio_l": 0.2, "mask_ratio_h": 0.02, "mask_ratio_hr": 1.0,
                     "alpha": 0.5, "momentum_schedule": False},
    },
}
# The choices of the MIL models' string settings (their value rules: slidemil.config.MILSettings).
MHIM_FUSIONS = ("vote", "mean", "split")          # mhim_transmil's mask_attention: fusing the heads' attention
MHIM_INIT_STUDENT = ("projection", "full", "none")
MHIM_EVALUATE = ("student", "teacher")
VARMIL_VARIANCE_N = ("real", "nonzero")           # varmil's variance_n: divide by the real or the nonzero tiles


def mhim_name(base: str) -> str:
    """The MHIM-MIL model built on ``base``."""
    return MHIM_PREFIX + base


def base_model(model: str) -> str | None:
    """The baseline an MHIM-MIL model is built on (its teacher), or None for any other model."""
    return model[len(MHIM_PREFIX):] if model.startswith(MHIM_PREFIX) else None


# Each registered MIL model's own keyword arguments (its builder's signature without in_dim, n_classes).
MODEL_PARAMS = {
    "abmil": ("embed_dim", "attn_dim", "dropout", "n_layers"),
    "abmil_gated": ("embed_dim", "attn_dim", "dropout", "n_layers"),
    "meanpool": ("embed_dim", "dropout", "n_layers"),
    "maxpool": ("embed_dim", "dropout", "n_layers"),
    "varmil": ("embed_dim", "attn_dim", "dropout", "gated", "variance_n", "n_layers"),
    "transmil": ("embed_dim", "n_heads", "dropout", "attn_dropout"),
    **{mhim_name(base): _MHIM_PARAMS for base in MHIM_BASES},
}
MIL_MODELS = tuple(MODEL_PARAMS)
# DeepSMILE's tile-supervised baseline trains a CNN on tiles, not a MIL model on features; its runs sit
# under this "extractor" slot.
TILE_MODEL = "tile_supervised"
TILE_SLOT = "tiles"
# Backbones the tile-supervised baseline and SimCLR pre-training can train.
TILE_ARCHITECTURES = ("shufflenet_v2", "resnet18")
SIMCLR_ARCHITECTURES = tuple(dict.fromkeys(SIMCLR_EXTRACTORS.values()))
# Endpoints (``task:`` in the config; their losses, heads and metrics live in slidemil.tasks; the demo generates a
# cohort for each, config demo.task). The sheet carries `label` (binary, multiclass, regression) or `time` and
# `event` (survival). The tile-supervised baseline classifies tiles and scores a slide by the fraction of its tiles
# predicted in each class: classification tasks only.
TASKS = ("binary", "multiclass", "survival", "regression")
BINARY = "binary"
TILE_MODEL_TASKS = (BINARY, "multiclass")
# Each task's primary metric (checkpoint selection, ranking, comparisons; slidemil.tasks computes them) and what the
# report and its `snakemake --report` captions call each metric.
PRIMARY_METRICS = {BINARY: "auc", "multiclass": "macro_auc", "survival": "c_index", "regression": "r2"}
METRIC_NAMES = {"auc": "AUC", "macro_auc": "macro AUC (one-vs-rest)", "balanced_accuracy": "balanced accuracy",
                "c_index": "C-index (Harrell)", "r2": "R²", "pearson_r": "Pearson r", "mae": "MAE"}


def report_captions(task: str) -> dict[str, str]:
    """What the report rule's `snakemake --report` captions (workflow/report/*.rst) call the task's primary metric."""
    return {"metric": METRIC_NAMES[PRIMARY_METRICS[task]]}


# The report's figure of each (extractor, model), by task: {kind}_{extractor}_{model}.png, and its section title.
RESULT_FIGURES = {BINARY: ("roc", "ROC curves"), "multiclass": ("confusion", "Confusion matrices and ROC curves"),
                  "survival": ("km", "Kaplan-Meier curves"), "regression": ("scatter", "Predicted against true")}
# Default sheet columns of a survival endpoint (splits.time_column, splits.event_column).
TIME_COLUMN, EVENT_COLUMN = "time", "event"
# Compute precisions: training (MIL, SimCLR, tile-supervised; fp16 would need loss scaling) and extraction.
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")
# Which epoch's checkpoint training keeps (mil.training.selection; slidemil.training.Selection applies them).
SELECTIONS = ("val_auc", "val_loss", "last")
FEATURE_PRECISIONS = ("auto", "fp32", "fp16", "bf16")

# Slide ids become file names and Snakemake wildcards (results/tiles/{slide}.h5): letters, digits and ``._+-``,
# not starting with a dot. Braces would be read as wildcards, "/" and newlines would make other paths.
# The sample sheet's check (slidemil.cohort.sheet) and workflow/schemas/samples.schema.yaml use this one rule
# (tests/test_fault_inputs.py holds them equal).
SLIDE_ID_CHARS = "letters, digits and ._+- (not starting with a dot)"
SLIDE_ID_PATTERN = r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]*$"
