"""The slidemil configuration: every setting's default and its check, in one place.

One dataclass per section holds the defaults; ``check_config(raw)`` completes a raw config (a partial
--configfile, a module's ``config:``, --config overrides) with them and checks it once, reporting the
first problem as one line that names the key and what is allowed::

    config: mil.models: unknown model 'abmill'; allowed: abmil, abmil_gated, ...

The stages take their defaults from the same dataclasses (``resolve``). What each setting means is
in the JSON schema's descriptions (workflow/schemas/config.schema.yaml), rendered to config/README.md by
``python -m slidemil.config --readme``. This module imports neither torch nor snakemake: the DAG uses it.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path

from slidemil.names import (ENCODER_CARDS, ENCODER_POOLS, EXTRACTORS, FEATURE_PRECISIONS, MHIM_EVALUATE, MHIM_FUSIONS,
                            MHIM_INIT_STUDENT, MHIM_PRESETS, MIL_MODELS, MODEL_PARAMS, SELECTIONS, SIMCLR_ARCHITECTURES,
                            SIMCLR_EXTRACTORS, SIMCLR_WEIGHTS, TASKS, TILE_ARCHITECTURES, TILE_MODEL, TILE_MODEL_TASKS,
                            TIMM_EXTRACTOR, TIMM_OPTIONS, TRAIN_PRECISIONS, VARMIL_VARIANCE_N, BINARY, EVENT_COLUMN,
                            TIME_COLUMN, base_model)

MODELS = (*MIL_MODELS, TILE_MODEL)
# The demo's second cohort (deploy.demo_patients), deployed like any cohort of deploy.cohorts.
DEMO_DEPLOY_COHORT = "demo_external"
# Builder arguments the workflow sets itself (from the base model's settings), never the config.
WORKFLOW_MODEL_PARAMS = ("base_kwargs",)
SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config problem as one line: ``config: <key>: <problem>; allowed: <names>`` or
    ``config: <key> must be <what is allowed>, got <value>``."""

    def __init__(self, key: str, problem: str, allowed: str | None = None):
        self.key = key
        text = f"config: {key} {problem}" if problem.startswith("must be") else f"config: {key}: {problem}"
        super().__init__(text + (f"; allowed: {allowed}" if allowed else ""))


def setting(default=dataclasses.MISSING, *, choices=None, minimum=None, maximum=None, above=None, below=None,
            length=None, min_items=None, item_choices=None, item_kind="name", pattern=None, unset=False, check=None):
    """A dataclass field with its rules. ``unset``: left out of the config unless given, because adding
    it to a job's params would rerun every existing run (the stage then uses ``default``)."""
    rules = dict(choices=choices, minimum=minimum, maximum=maximum, above=above, below=below, length=length,
                 min_items=min_items, item_choices=item_choices, item_kind=item_kind, pattern=pattern, check=check)
    meta = {k: v for k, v in rules.items() if v is not None and (k != "item_kind" or item_choices)}
    meta |= {"unset": True} if unset else {}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---- sections, in the order of config/config.yaml ----------------------------------------------------


@dataclass(frozen=True)
class Demo:
    n_patients: int = setting(32, minimum=8)
    seed: int = setting(7)
    slide_px: list[int] = setting([2560, 2560], length=2, minimum=512)
    mpp: float = setting(0.5, above=0)
    objective_power: float = setting(20, above=0)
    tumor_tile_fraction: list[float] = setting([0.02, 0.15], length=2, minimum=0, maximum=1)
    two_slide_fraction: float = setting(0.3, minimum=0, maximum=1)
    positive_fraction: float = setting(0.5, above=0, below=1)
    task: str = setting("binary", choices=TASKS)
    lymphoid_tile_fraction: list[float] = setting([0.0, 0.12], length=2, minimum=0, maximum=1)
    censored_fraction: float = setting(0.3, minimum=0, below=1)
    hazard_ratio: float = setting(8.0, above=0)
    score_noise: float = setting(2.0, minimum=0)
    # binary: positives whose slides show no tumour, as for a biomarker that the morphology only partly shows
    silent_positive_fraction: float = setting(0.25, minimum=0, below=1)


@dataclass(frozen=True)
class Tiling:
    mpp: float = setting(0.5, above=0)
    tile_px: int = setting(256, minimum=16)
    bright_threshold: int = setting(240, minimum=0, maximum=255)
    max_bright_fraction: float = setting(0.5, minimum=0, maximum=1)
    sobel_threshold: float = setting(20, minimum=0)
    max_flat_fraction: float = setting(0.6, minimum=0, maximum=1)
    mask_min_saturation: int = setting(15, minimum=0, maximum=255)
    mask_min_fraction: float = setting(0.05, minimum=0, maximum=1)
    precheck_brightness: bool = setting(True)
    on_error: str = setting("exclude", choices=("exclude", "fail"))


@dataclass(frozen=True)
class ExtractorSettings:
    weights: str = setting()
    input_px: int = setting(minimum=32)
    dtype: str = setting(choices=("float32", "float16"))
    precision: str = setting("auto", choices=FEATURE_PRECISIONS)
    scaled_decode: bool = setting(True)
    # The generic timm extractor only; unset elsewhere, so existing runs keep their params.
    arch: str | None = setting(None, unset=True)
    timm_kwargs: dict | None = setting(None, unset=True)
    mean: list[float] | None = setting(None, length=3, unset=True)
    std: list[float] | None = setting(None, length=3, above=0, unset=True)
    pool: str | None = setting(None, choices=(None, *ENCODER_POOLS), unset=True)


@dataclass(frozen=True)
class Splits:
    folds: int = setting(5, minimum=2)
    test_fraction: float = setting(0.25, minimum=0, below=1)
    test_column: str | None = setting(None)
    binarize: str | None = setting(None, choices=(None, "median", "tertiles"))
    positive_class: str | int | None = setting(None)
    fold_column: str | None = setting(None)
    # Survival endpoints only (task: survival): the sheet's follow-up time and event (1 = event, 0 = censored).
    time_column: str = setting(TIME_COLUMN)
    event_column: str = setting(EVENT_COLUMN)


@dataclass(frozen=True)
class Training:
    epochs: int = setting(20, minimum=1)
    patience: int = setting(5, minimum=1)
    lr: float = setting(0.0002, minimum=0)   # 0 trains nothing, a valid control
    weight_decay: float = setting(0.00001, minimum=0)
    betas: list[float] = setting([0.9, 0.999], length=2)
    batch_size: int = setting(1, minimum=1)
    max_tiles: int | None = setting(None, minimum=1)
    class_weighted: bool = setting(True)
    # z-score each feature dimension with training-slide statistics: extractors differ in scale by
    # orders of magnitude (random-weight CNNs especially), and the MIL models should not care.
    standardize: bool = setting(True)
    # auto (slidemil.runtime): bf16 autocast on GPUs with bf16, fp16 with loss scaling on older ones, exact float32
    # elsewhere; bf16 also on CPUs with bf16 units (1.1-1.8x faster
    # epochs there, slightly different numbers); fp32 everywhere, e.g. to compare a GPU run with a CPU run.
    precision: str = setting("auto", choices=TRAIN_PRECISIONS, unset=True)
    # Which epoch's model is kept (slidemil.training.Selection). Optional, default val_auc, so existing runs keep
    # their params: on the MIL benchmarks last (a fixed number of epochs) beat it by 0.03-0.04 accuracy on FOX or
    # TIGER for abmil, abmil_gated and maxpool, not for meanpool; val_loss did no better (docs/benchmarks.md).
    selection: str = setting("val_auc", choices=SELECTIONS, unset=True)


@dataclass(frozen=True)
class TileSupervised:
    """DeepSMILE's tile-supervised baseline (``mil.settings.tile_supervised``)."""
    arch: str = setting("shufflenet_v2", choices=TILE_ARCHITECTURES)
    init: str = setting("random")   # imagenet, random, or a path to a state dict (the workflow's "simclr" is one)
    input_px: int = setting(128, minimum=1)
    tiles_per_slide: int | None = setting(32, minimum=1)        # training tiles per slide, fixed once by the seed
    eval_tiles_per_slide: int | None = setting(64, minimum=1)   # validation/test tiles per slide (null: all)
    # DeepSMILE (TCGA-BC, after Kather et al. 2020): 4 epochs, lr 5e-5, batch 512
    epochs: int = setting(4, minimum=1)
    patience: int = setting(4, minimum=1)
    lr: float = setting(0.00005, above=0)
    betas: list[float] = setting([0.9, 0.99], length=2)
    weight_decay: float = setting(0.0, minimum=0)
    batch_size: int = setting(64, minimum=1)
    class_weighted: bool = setting(True)
    precision: str = setting("auto", choices=TRAIN_PRECISIONS)   # as simclr.precision (slidemil.runtime)


def _check_extractor_settings(value, key: str) -> dict:
    out = {}
    for name, entry in _mapping(value, key, "extractor names").items():
        if name not in EXTRACTORS:
            raise ConfigError(f"{key}.{name}", "unknown extractor", ", ".join(EXTRACTORS))
        out[name] = check_section(ExtractorSettings, entry, f"{key}.{name}")
    return out


@dataclass(frozen=True)
class MILSettings:
    """The value rules of every MIL model's settings: which model takes which is slidemil.names.MODEL_PARAMS, their
    defaults are the builders' signatures (slidemil.mil.models), and ``check_model_settings`` adds the rules
    between settings. Checked at the dry run and again when a model is built, so both say the same line."""
    embed_dim: int = setting(minimum=1)   # or null for varmil only: no projection (DeepSMILE's default)
    attn_dim: int = setting(minimum=1)
    dropout: float = setting(minimum=0, below=1)
    n_layers: int = setting(minimum=1)
    gated: bool = setting()
    variance_n: str = setting(choices=VARMIL_VARIANCE_N)
    n_heads: int = setting(minimum=1)
    attn_dropout: float = setting(minimum=0, below=1)
    # MHIM-MIL; null ratios, alpha and schedule come from the preset
    preset: str | None = setting(choices=(*MHIM_PRESETS, None))
    mask_ratio_r: float | None = setting(minimum=0, below=1)
    mask_ratio_l: float | None = setting(minimum=0, below=1)
    mask_ratio_h: float | None = setting(minimum=0, below=1)
    mask_ratio_hr: float | None = setting(above=0, maximum=1)
    alpha: float | None = setting(minimum=0)
    momentum_schedule: bool | None = setting()
    mask_ratio_h_decay: bool = setting()
    mask_attention: str = setting(choices=MHIM_FUSIONS)
    temp_t: float = setting(above=0)
    temp_s: float = setting(above=0)
    momentum: float = setting(minimum=0, maximum=1)
    init_student: str = setting(choices=MHIM_INIT_STUDENT)
    evaluate: str = setting(choices=MHIM_EVALUATE)


def check_model_settings(model: str, settings: dict | None, key: str, workflow: bool = False) -> dict:
    """MIL model ``model``'s ``settings`` checked (names, types, ranges and the rules between them) and returned,
    coerced as the config is; ``workflow``: the config's view, which leaves out the settings the workflow sets itself
    (an MHIM model's ``base_kwargs``, checked here as the base model's settings otherwise)."""
    allowed = [p for p in MODEL_PARAMS[model] if not (workflow and p in WORKFLOW_MODEL_PARAMS)]
    given = _mapping(settings, key, ", ".join(allowed))
    for param in given:
        if param not in allowed:
            raise ConfigError(f"{key}.{param}", "unknown setting", ", ".join(sorted(allowed)))
    # Null (the config's spellings of it, as _coerce reads them) is varmil's no-projection embed_dim alone.
    no_projection = model == "varmil" and "embed_dim" in given and _coerce(given["embed_dim"], int | None) is None
    skipped = ("base_kwargs", "embed_dim") if no_projection else ("base_kwargs",)
    checked = check_section(MILSettings, {k: v for k, v in given.items() if k not in skipped}, key, fill=False)
    checked |= {"embed_dim": None} if no_projection else {}
    if "base_kwargs" in given:
        checked["base_kwargs"] = check_model_settings(base_model(model), given["base_kwargs"], f"{key}.base_kwargs")
    _check_model_shapes(checked, key)
    return {k: checked[k] for k in given}


def _check_model_shapes(settings: dict, key: str) -> None:
    # A setting left out takes its builder default, which fits; so each rule is checked where its settings are given.
    embed_dim, n_layers = settings.get("embed_dim"), settings.get("n_layers", 1)
    if "embed_dim" in settings and embed_dim is None and n_layers != 1:
        raise ConfigError(f"{key}.n_layers", f"must be 1 without a projection (embed_dim: null), got {n_layers}")
    if embed_dim is not None and n_layers > embed_dim.bit_length():
        # Each layer halves the width: embed_dim / 2^(n_layers-1) must stay >= 1.
        raise ConfigError(f"{key}.n_layers", f"must be at most {embed_dim.bit_length()} with embed_dim {embed_dim} "
                          f"(each layer halves the width), got {n_layers}")
    if embed_dim is not None and "n_heads" in settings and embed_dim % settings["n_heads"]:
        raise ConfigError(f"{key}.embed_dim", f"must be divisible by n_heads {settings['n_heads']}, got {embed_dim}")


def _check_model_settings(value, key: str) -> dict:
    out = {}
    for name, entry in _mapping(value, key, "model names").items():
        if name not in MODELS:
            raise ConfigError(f"{key}.{name}", f"unknown model {name!r}", ", ".join(MODELS))
        if entry is None:
            out[name] = entry
        elif name == TILE_MODEL:
            # Checked, not completed: the job's params stay the settings given (the stage fills the rest).
            out[name] = check_section(TileSupervised, entry, f"{key}.{name}", fill=False)
        else:
            out[name] = check_model_settings(name, entry, f"{key}.{name}", workflow=True)
    return out


# The settings config/config.yaml lists: extractors and models a user adds get checked the same way.
DEFAULT_EXTRACTOR_SETTINGS = {
    "resnet50_trunc": {"weights": "random", "input_px": 224, "dtype": "float32"},
    "shufflenet_v2": {"weights": "random", "input_px": 224, "dtype": "float32"},
    "shufflenet_simclr": {"weights": "simclr", "input_px": 128, "dtype": "float32"},
    "resnet18_simclr": {"weights": "simclr", "input_px": 128, "dtype": "float32"},
    "resnet50_simclr": {"weights": "simclr", "input_px": 128, "dtype": "float32"},
    "resnet18": {"weights": "random", "input_px": 224, "dtype": "float32"},
}
_MHIM_DEFAULTS = {"mask_ratio_h_decay": True, "temp_t": 0.1, "temp_s": 1.0, "momentum": 0.9999,
                  "init_student": "projection", "evaluate": "student"}
DEFAULT_MODEL_SETTINGS = {
    "abmil": {"embed_dim": 512, "attn_dim": 128, "dropout": 0.25},
    "abmil_gated": {"embed_dim": 512, "attn_dim": 128, "dropout": 0.25},
    "meanpool": {"embed_dim": 512, "dropout": 0.25},
    "maxpool": {"embed_dim": 512, "dropout": 0.25},
    "varmil": {"embed_dim": None, "attn_dim": 128, "dropout": 0.0, "gated": False, "variance_n": "real"},
    "transmil": {"embed_dim": 512, "n_heads": 8, "dropout": 0.25, "attn_dropout": 0.1},
    "mhim_abmil": {"preset": "camelyon16", **_MHIM_DEFAULTS},
    "mhim_transmil": {"preset": "camelyon16", "mask_attention": "vote", **_MHIM_DEFAULTS},
    TILE_MODEL: {"arch": "shufflenet_v2", "init": "simclr", "input_px": 128, "tiles_per_slide": 32,
                 "eval_tiles_per_slide": 64, "epochs": 4, "patience": 4, "lr": 0.00005, "batch_size": 64},
}


@dataclass(frozen=True)
class Features:
    extractors: list[str] = setting(["resnet50_trunc"], min_items=1, item_choices=EXTRACTORS,
                                      item_kind="extractor")
    precomputed: str | None = setting(None, pattern=r"[A-Za-z0-9_.-]+")
    settings: dict = setting(DEFAULT_EXTRACTOR_SETTINGS, check=_check_extractor_settings)


@dataclass(frozen=True)
class Mil:
    models: list[str] = setting(["abmil", "abmil_gated", "mhim_abmil"], min_items=1,
                                  item_choices=MODELS, item_kind="model")
    training: Training = field(default_factory=Training)
    settings: dict = setting(DEFAULT_MODEL_SETTINGS, check=_check_model_settings)


@dataclass(frozen=True)
class Report:
    n_bootstrap: int = setting(1000, minimum=0)
    reference_model: str = setting("abmil", choices=MODELS)
    heatmaps_per_model: int = setting(2, minimum=0)
    heatmap_top_k: int = setting(8, minimum=0)
    qc_examples: int = setting(4, minimum=0)


DEPLOY_COHORT_KEYS = ("samples",)


def _check_deploy_cohorts(value, key: str) -> dict:
    out = {}
    for name, entry in _mapping(value, key, "cohort names").items():
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", str(name)) or str(name).startswith("."):
            raise ConfigError(f"{key}.{name}", "is not a usable cohort name (it names a folder)",
                              "letters, digits and ._+- not starting with a dot")
        entry = {"samples": entry} if isinstance(entry, str) else _mapping(entry, f"{key}.{name}", "samples")
        for k in entry:
            if k not in DEPLOY_COHORT_KEYS:
                raise ConfigError(f"{key}.{name}.{k}", "unknown setting", ", ".join(DEPLOY_COHORT_KEYS))
        if not isinstance(entry.get("samples"), str) or not entry["samples"].strip():
            raise ConfigError(f"{key}.{name}.samples", "must be a sample sheet path (slide_id, patient_id, path; "
                              f"label optional), got {entry.get('samples')!r}")
        out[str(name)] = {"samples": entry["samples"]}
    return out


@dataclass(frozen=True)
class Deploy:
    cohorts: dict = setting({}, check=_check_deploy_cohorts)
    demo_patients: int = setting(0, minimum=0)
    # One model per (extractor, model) retrained on all non-test patients for the median of its folds' selected
    # epochs (slidemil.mil.refit), deployed beside the folds and their ensemble; off: nothing more is trained.
    refit: bool = setting(False)


@dataclass(frozen=True)
class Simclr:
    epochs: int = setting(3, minimum=1)
    batch_size: int = setting(64, minimum=2)   # the other tiles of a batch are each view's negatives
    tiles_per_slide: int | None = setting(16, minimum=1)
    input_px: int = setting(128, minimum=32)
    temperature: float = setting(0.5, above=0)
    lr: float = setting(0.0003, above=0)
    betas: list[float] = setting([0.9, 0.99], length=2)
    weight_decay: float = setting(0.0, minimum=0)
    proj_dim: int = setting(128, minimum=1)
    color_strength: float = setting(1.0, minimum=0)
    min_crop_scale: float = setting(0.08, above=0, maximum=1)
    # auto (slidemil.runtime): bf16 autocast on GPUs with bf16, fp16 with loss scaling on older ones, float32 on
    # CPU. bf16 on a CPU with bf16 units: 2-3x faster ResNet steps but 20 % slower ShuffleNetV2 ones
    # (docs/performance.md).
    precision: str = setting("auto", choices=TRAIN_PRECISIONS, unset=True)


@dataclass(frozen=True)
class Compute:
    # A typo ("gpu") is refused here; a CUDA device the machine lacks only at job start (slidemil.runtime).
    device: str = setting("auto", pattern=r"auto|cpu|cuda(:\d+)?|mps")
    threads: int = setting(2, minimum=1)
    train_threads: int = setting(1, minimum=1)
    batch_size: int = setting(64, minimum=1)
    loader_workers: int = setting(1, minimum=0)
    torch_compile: bool = setting(False)


@dataclass(frozen=True)
class Config:
    samples: str = setting("")
    results: str = setting("results")
    seed: int = setting(0, minimum=0)
    task: str = setting(BINARY, choices=TASKS)
    demo: Demo = field(default_factory=Demo)
    tiling: Tiling = field(default_factory=Tiling)
    features: Features = field(default_factory=Features)
    splits: Splits = field(default_factory=Splits)
    mil: Mil = field(default_factory=Mil)
    report: Report = field(default_factory=Report)
    simclr: Simclr = field(default_factory=Simclr)
    deploy: Deploy = field(default_factory=Deploy)
    compute: Compute = field(default_factory=Compute)


# ---- checking --------------------------------------------------------------------------------------


def check_config(raw: dict | None) -> dict:
    """``raw`` completed with the defaults and checked: the config every rule reads.

    Keys keep the order a merge of config/config.yaml under ``raw`` gives (Snakemake's), then missing
    settings follow in declaration order, so that each job's params look exactly as before a new
    setting existed. Raises ConfigError (one line) at the first problem.
    """
    merged = fill_defaults(copy.deepcopy(dict(raw or {})), defaults())
    cfg = check_section(Config, merged, "")
    _check_rules(cfg)
    return cfg


def defaults() -> dict:
    """The complete default config, as config/config.yaml writes it."""
    return _section_defaults(Config)


def _section_defaults(cls) -> dict:
    hints = _hints(cls)
    return {f.name: _section_defaults(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else _default(f)
            for f in fields(cls) if not f.metadata.get("unset")}


def fill_defaults(config: dict, default: dict) -> dict:
    """Add to ``config`` what it lacks of ``default``, recursively into mappings (lists are replaced whole)."""
    for key, value in default.items():
        if key not in config:
            config[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(config[key], dict):
            fill_defaults(config[key], value)
    return config


def check_section(cls, given, key: str, fill: bool = True, unset: bool = False, ranges: bool = True) -> dict:
    """``given`` checked against dataclass ``cls``; ``fill`` appends missing settings' defaults (``unset``:
    those left out of the config too); ``ranges=False`` checks names and types only."""
    known = {f.name: f for f in fields(cls)}
    hints = _hints(cls)
    out = {}
    for name, value in _mapping(given, key, ", ".join(known)).items():
        if name not in known:
            section = key.rsplit(".", 1)[-1]
            raise ConfigError(_join(key, name), f"unknown {section} setting" if key else "unknown setting",
                              ", ".join(known))
        out[name] = _check_field(known[name], hints[name], value, _join(key, name), ranges)
    for f in fields(cls) if fill else ():
        if f.name not in out and (unset or not f.metadata.get("unset")):
            if dataclasses.is_dataclass(hints[f.name]):
                out[f.name] = check_section(hints[f.name], {}, _join(key, f.name), fill, unset)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(_join(key, f.name), "missing", _describe(hints[f.name], f.metadata))
            else:
                out[f.name] = _default(f)
    return out


def _check_field(f, hint, value, key: str, ranges: bool = True):
    if "check" in f.metadata:
        return f.metadata["check"](value, key)
    if dataclasses.is_dataclass(hint):
        return check_section(hint, value, key)
    value = _coerce(value, hint)
    if not _is_type(value, hint) or value not in f.metadata.get("choices", (value,)):
        raise _bad_value(key, value, hint, f.metadata)
    for item in (value if isinstance(value, list) else [value]) if ranges else ():
        if not _in_range(item, f.metadata):
            raise _bad_value(key, value, hint, f.metadata)
    meta = f.metadata
    if isinstance(value, list) and ("length" in meta and len(value) != meta["length"]
                                    or len(value) < meta.get("min_items", 0)):
        raise _bad_value(key, value, hint, meta)
    for item in value if "item_choices" in meta else ():
        if item not in meta["item_choices"]:
            raise ConfigError(key, f"unknown {meta['item_kind']} {item!r}", ", ".join(meta["item_choices"]))
    if "pattern" in meta and value is not None and not re.fullmatch(meta["pattern"], value):
        raise _bad_value(key, value, hint, meta)
    return value


def _in_range(value, meta) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return True
    return not (("minimum" in meta and value < meta["minimum"]) or ("maximum" in meta and value > meta["maximum"])
                or ("above" in meta and value <= meta["above"]) or ("below" in meta and value >= meta["below"]))


def _coerce(value, hint):
    """Strings where the setting takes numbers, booleans or null, as nested --config values arrive
    (Snakemake reads ``--config splits='{folds: 2}'`` with YAML's BaseLoader: every scalar a string)."""
    if isinstance(value, list) and typing.get_origin(hint) is list:
        return [_coerce(v, typing.get_args(hint)[0]) for v in value]
    if not isinstance(value, str):
        return value
    parsed = _parse_scalar(value)
    if parsed is None and type(None) in _args(hint) and value in ("null", "~"):
        return None
    # A word that parses as nothing stays a word (and fails the type check), not null.
    return parsed if parsed is not None and not _is_type(value, hint) and _is_type(parsed, hint) else value


def _parse_scalar(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None


def _is_type(value, hint) -> bool:
    if hint is type(None) or hint is None:
        return value is None
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_is_type(v, typing.get_args(hint)[0]) for v in value)
    if len(_args(hint)) > 1:
        return any(_is_type(value, a) for a in _args(hint))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint, meta) -> str:
    """What a setting allows, in words (the end of an error line)."""
    if "choices" in meta:
        return "one of " + ", ".join("null" if c is None else str(c) for c in meta["choices"])
    if typing.get_origin(hint) is list:
        count = (f"{meta['length']} " if "length" in meta
                 else f"at least {meta['min_items']} " if "min_items" in meta else "")
        if "item_choices" in meta:
            return f"a list of {count}names from " + ", ".join(meta["item_choices"])
        plural = {int: "integers", float: "numbers", str: "strings"}[typing.get_args(hint)[0]]
        return " ".join([f"a list of {count}{plural}", *_bounds(meta)])
    if len(_args(hint)) > 1:
        return " or ".join("null" if a is type(None) else _describe(a, meta) for a in _args(hint))
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}[hint]
    return " ".join([words, *_bounds(meta)])


def _bounds(meta) -> list[str]:
    bounds = [f"{op} {meta[k]}" for k, op in (("minimum", "at least"), ("above", "above"), ("maximum", "at most"),
                                              ("below", "below")) if k in meta]
    bounds += [f"matching {meta['pattern']}"] if "pattern" in meta else []
    return [" and ".join(bounds)] if bounds else []


def _bad_value(key: str, value, hint, meta) -> ConfigError:
    return ConfigError(key, f"must be {_describe(hint, meta)}, got {value!r}")


def _mapping(value, key: str, allowed: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(key or "config", f"got {value!r}, not a mapping", allowed)
    return value


def _join(key: str, name) -> str:
    return f"{key}.{name}" if key else str(name)


def _args(hint) -> tuple:
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def _default(f):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else copy.deepcopy(f.default)


@cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


# ---- rules across sections -------------------------------------------------------------------------


def _check_rules(cfg: dict) -> None:
    if not cfg["results"].rstrip("/"):
        raise ConfigError("results", f"{cfg['results']!r} would plan every output at the filesystem root",
                          "a folder path other than '' and '/'")
    for name in ("tumor_tile_fraction", "lymphoid_tile_fraction"):
        low, high = cfg["demo"][name]
        if not low <= high < 1:
            raise ConfigError(f"demo.{name}", f"[{low}, {high}] is not a range", "[low, high] with low <= high < 1")
    features, models = cfg["features"], cfg["mil"]["models"]
    extractors = [] if features["precomputed"] else features["extractors"]
    for name in extractors:
        _check_extractor_rules(name, features["settings"].get(name), cfg["simclr"]["input_px"])
        _check_encoder_rules(name, features["settings"][name], cfg["tiling"])
    tile = cfg["mil"]["settings"].get(TILE_MODEL) or {}
    if TILE_MODEL in models and cfg["task"] not in TILE_MODEL_TASKS:
        raise ConfigError("mil.models", f"{TILE_MODEL} scores slides by their tiles' predicted classes, so it "
                          f"learns {' or '.join(TILE_MODEL_TASKS)} tasks only: task {cfg['task']} needs a MIL model",
                          ", ".join(MIL_MODELS))
    if cfg["task"] != BINARY and (cfg["splits"]["binarize"] or cfg["splits"]["positive_class"] is not None):
        key = "splits.binarize" if cfg["splits"]["binarize"] else "splits.positive_class"
        raise ConfigError(key, f"makes two classes, but task is {cfg['task']}", "null, or task: binary")
    if not cfg["samples"] and cfg["demo"]["task"] != cfg["task"]:
        raise ConfigError("demo.task", f"makes a {cfg['demo']['task']} demo cohort, but task is {cfg['task']}",
                          f"{cfg['task']}, or task: {cfg['demo']['task']}")
    if TILE_MODEL in models and features["precomputed"]:
        raise ConfigError("mil.models", f"{TILE_MODEL} trains on tiles, and precomputed features have none",
                          ", ".join(MIL_MODELS))
    tile_simclr = TILE_MODEL in models and tile.get("init") == SIMCLR_WEIGHTS
    if tile_simclr and tile.get("arch", TileSupervised.arch) not in SIMCLR_ARCHITECTURES:
        raise ConfigError(f"mil.settings.{TILE_MODEL}.arch", "has no SimCLR pre-training while init is simclr",
                          ", ".join(SIMCLR_ARCHITECTURES))
    _check_deploy_rules(cfg)
    uses_simclr = tile_simclr or any(features["settings"][e]["weights"] == SIMCLR_WEIGHTS for e in extractors)
    if cfg["splits"]["fold_column"] and uses_simclr:
        raise ConfigError("splits.fold_column", "makes every slide a test slide in some fold, so SimCLR "
                          "pre-training would see test tiles", "null, or extractor weights made elsewhere")


def _check_deploy_rules(cfg: dict) -> None:
    if cfg["deploy"]["refit"] and cfg["splits"]["fold_column"]:
        raise ConfigError("deploy.refit", "retrains on the non-test patients, but splits.fold_column makes every "
                          "patient a test patient in some fold", "false with splits.fold_column")
    if cfg["deploy"]["demo_patients"] and cfg["samples"]:
        raise ConfigError("deploy.demo_patients", "makes a second demo cohort, but samples names your own cohort",
                          "0 with samples, or no samples (the demo)")
    if cfg["deploy"]["demo_patients"] and DEMO_DEPLOY_COHORT in cfg["deploy"]["cohorts"]:
        raise ConfigError(f"deploy.cohorts.{DEMO_DEPLOY_COHORT}", "is the name of the demo's second cohort "
                          "(deploy.demo_patients)", "another name")


def _check_extractor_rules(name: str, settings: dict | None, simclr_px: int) -> None:
    key = f"features.settings.{name}"
    if settings is None:
        raise ConfigError(key, "missing for a listed extractor", "a mapping of weights, input_px, dtype")
    if settings["weights"] != SIMCLR_WEIGHTS:
        return
    if name not in SIMCLR_EXTRACTORS:
        raise ConfigError(f"{key}.weights", f"{SIMCLR_WEIGHTS!r} is for the SimCLR extractors only "
                          f"({', '.join(SIMCLR_EXTRACTORS)})", "imagenet, random or a path to a state dict")
    if settings["input_px"] != simclr_px:
        raise ConfigError(f"{key}.input_px", f"{settings['input_px']} differs from simclr.input_px: the encoder "
                          "would see tiles at another scale", str(simclr_px))


def _check_encoder_rules(name: str, settings: dict, tiling: dict) -> None:
    key = f"features.settings.{name}"
    given = [o for o in TIMM_OPTIONS if settings.get(o) is not None]
    if name == TIMM_EXTRACTOR and not settings.get("arch"):
        raise ConfigError(f"{key}.arch", "missing: the timm extractor needs a timm architecture name",
                          "e.g. vit_small_patch14_dinov2")
    if name != TIMM_EXTRACTOR and given:
        raise ConfigError(f"{key}.{given[0]}", f"is a setting of the {TIMM_EXTRACTOR} extractor only")
    card = ENCODER_CARDS.get(name)
    if card is None:
        return
    if settings["input_px"] != card.px:
        raise ConfigError(f"{key}.input_px", f"{settings['input_px']} differs from the {card.px} px of {name}'s "
                          "model card", str(card.px))
    # Tiles of tile_px at tiling.mpp are resized to input_px: the encoder sees them at this magnification.
    seen_mpp = tiling["mpp"] * tiling["tile_px"] / settings["input_px"]
    if abs(seen_mpp / card.mpp - 1) > 0.25:
        raise ConfigError("tiling.mpp", f"{name} would see tiles at {seen_mpp:.2f} um/px (tiling.mpp x tile_px / "
                          f"input_px), its model card's is {card.mpp}", f"tiling.mpp near {card.mpp}")


# ---- the stages' view --------------------------------------------------------------------------------


def resolve(cls, settings: dict | None, key: str) -> dict:
    """A stage's settings: ``settings`` checked and completed with every default of ``cls`` (those the
    config leaves unset included), numbers of float settings as floats (YAML's ``0`` is an int)."""
    cfg = check_section(cls, dict(settings or {}), key, unset=True)
    for name, hint in _hints(cls).items():
        if hint is float or (typing.get_origin(hint) is list and typing.get_args(hint)[0] is float):
            cfg[name] = [float(v) for v in cfg[name]] if isinstance(cfg[name], list) else float(cfg[name])
    return cfg


def field_defaults(cls) -> dict:
    """Every setting of ``cls`` with its default (for the stages' command lines)."""
    return {f.name: _default(f) for f in fields(cls)}


def extractor_defaults(name: str) -> dict:
    """The settings an extractor gets when config/config.yaml lists it without any: its entry of
    ``DEFAULT_EXTRACTOR_SETTINGS`` over the defaults of ``ExtractorSettings``. weights, input_px and dtype
    have no default for an extractor config.yaml does not list (the config refuses it without settings)."""
    given = {f.name: _default(f) for f in fields(ExtractorSettings)
             if f.default is not dataclasses.MISSING and not f.metadata.get("unset")}
    return {**given, **DEFAULT_EXTRACTOR_SETTINGS.get(name, {})}


# ---- config/README.md from the schema's descriptions -------------------------------------------------

# Where each dataclass sits in the schema ("*": each entry of a mapping).
SCHEMA_SECTIONS = {"": Config, "demo": Demo, "tiling": Tiling, "features": Features, "features.settings.*":
                   ExtractorSettings, "splits": Splits, "mil": Mil, "mil.training": Training,
                   "mil.settings.tile_supervised": TileSupervised, "report": Report, "simclr": Simclr,
                   "deploy": Deploy, "compute": Compute}


def schema_objects(schema: dict, path: str = ""):
    """(path, object schema) of every object in ``schema`` with properties, depth first."""
    yield path, schema
    for name, prop in schema.get("properties", {}).items():
        if "properties" in prop or isinstance(prop.get("additionalProperties"), dict):
            yield from schema_objects(prop, _join(path, name))
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict) and "properties" in extra:
        yield from schema_objects(extra, _join(path, "*"))


def readme(schema_path: str | Path = SCHEMA) -> str:
    """config/README.md: every setting with its default (slidemil.config) and meaning (the schema)."""
    import yaml

    schema = yaml.safe_load(Path(schema_path).read_text())
    lines = ["# Configuration", "", "<!-- Generated by `python -m slidemil.config --readme > config/README.md` from "
             "workflow/schemas/config.schema.yaml (meanings) and src/slidemil/config.py (defaults); edit those. -->",
             "", "config/config.yaml holds every default; a --configfile (or a module's `config:`) needs only the "
             "settings it changes. Nested `--config` values such as `--config splits='{folds: 3}'` are read as "
             "numbers, true/false and null where the setting takes those.", ""]
    for path, obj in schema_objects(schema):
        cls = SCHEMA_SECTIONS.get(path)
        title = path.replace("*", "<cohort>" if path.startswith("deploy") else "<extractor>") or "top level"
        lines += [f"## {title}", "", obj.get("description", schema["description"]), ""]
        rows = [f"| `{name}` | {_default_text(cls, name) if cls else ''} | {prop.get('description', '')} |"
                for name, prop in obj.get("properties", {}).items()
                if "properties" not in prop and not isinstance(prop.get("additionalProperties"), dict)]
        if rows:
            lines += ["| setting | default | meaning |", "|---|---|---|", *rows, ""]
        if path == "mil.settings":
            lines += _model_settings_table()
    return "\n".join(lines)


def _model_settings_table() -> list[str]:
    rows = [f"| `{model}` | {', '.join(p for p in params if p not in WORKFLOW_MODEL_PARAMS)} | "
            f"{_show(DEFAULT_MODEL_SETTINGS.get(model, {})).strip('`')} |" for model, params in MODEL_PARAMS.items()]
    return ["| model | settings it takes | config/config.yaml |", "|---|---|---|", *rows, ""]


def _default_text(cls, name: str) -> str:
    f = next((f for f in fields(cls) if f.name == name), None)
    if f is None:
        return ""
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    value = _default(f)
    if isinstance(value, dict):
        return "see config/config.yaml"
    if f.metadata.get("unset"):
        return f"absent ({_show(value)})"
    return _show(value)


def _show(value) -> str:
    if isinstance(value, dict):
        return "`{" + ", ".join(f"{k}: {_show(v).strip('`')}" for k, v in value.items()) + "}`"
    if isinstance(value, list):
        return "`[" + ", ".join(_show(v).strip("`") for v in value) + "]`"
    text = {None: "null", True: "true", False: "false"}.get(value, value) if not isinstance(value, (int, float)) \
        or isinstance(value, bool) else value
    return f"`{text}`" if text != "" else '`""`'


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m slidemil.config", description=__doc__.split("\n")[0])
    ap.add_argument("--readme", action="store_true", help="print config/README.md")
    ap.add_argument("--check", metavar="CONFIG_YAML", help="check a config file (completed with the defaults)")
    args = ap.parse_args(argv)
    if args.readme:
        sys.stdout.write(readme())
    if args.check:
        import yaml

        try:
            check_config(yaml.safe_load(Path(args.check).read_text()))
        except ConfigError as error:
            raise SystemExit(str(error))
        print(f"{args.check}: ok")


if __name__ == "__main__":
    main()
