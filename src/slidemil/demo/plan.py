"""The demo cohort's slide table, planned from its settings alone (no pixel work, no OpenCV).

The workflow calls this while it builds its DAG, so the demo's jobs are known before any slide exists;
keeping it apart from the renderer keeps ``snakemake -n`` free of OpenCV, tifffile and tqdm.

Each task's target is planted in the slides through the share of tissue tiles showing a pattern, drawn per
patient here and rendered by ``slidemil.demo.render`` (every slide of a patient gets the patient's shares):

* ``binary``: positives have tumour (share drawn from ``tumor_tile_fraction``), negatives none; a
  ``silent_positive_fraction`` of the positives have none either (a label their slides do not show, as for a
  biomarker with imperfect morphological correlates), which caps what any model can reach;
* ``multiclass``: three classes, each with its own pattern: ``normal`` (none), ``tumor``, ``lymphoid``
  (dense aggregates of small round lymphocytes), the pattern's share drawn from ``tumor_tile_fraction``;
* ``regression``: ``label`` = the tumour share in percent plus Gaussian noise (``score_noise`` points);
* ``survival``: ``time`` (months) and ``event``: the hazard grows with the tumour share, by ``hazard_ratio``
  from the range's low end to its high end; a random ``censored_fraction`` of the patients is censored at a
  uniform time before their event.

Every task but multiclass also gets lymphoid aggregates in every slide (``lymphoid_tile_fraction``): dark,
crowded nuclei that a model must tell from tumour, which makes the binary demo less than trivially separable.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd

from slidemil.config import Demo, field_defaults
from slidemil.names import TASKS

SAMPLES_COLUMNS = ["slide_id", "patient_id", "path", "label"]
SURVIVAL_COLUMNS = ["slide_id", "patient_id", "path", "time", "event"]
# The planted shares of each slide's tissue tiles, per pattern (what render_slide draws).
PATTERNS = ("tumor", "lymphoid")
PATTERN_COLUMNS = [f"{p}_tile_fraction" for p in PATTERNS]
CLASS_NAMES = ("normal", "tumor", "lymphoid")
# Median event time (months) of a patient at the low end of the tumour range.
_BASE_MEDIAN_MONTHS = 36.0
# The settings that shape the targets and their patterns; defaults are slidemil.config.Demo's.
SIGNAL_KEYS = ("tumor_tile_fraction", "lymphoid_tile_fraction", "censored_fraction", "hazard_ratio", "score_noise",
               "silent_positive_fraction")


def plan_cohort(
    n_patients: int,
    seed: int,
    two_slide_fraction: float = 0.3,
    positive_fraction: float = 0.5,
    task: str = "binary",
    signal: dict | None = None,
    patterns: bool = False,
) -> pd.DataFrame:
    """Slide table of a synthetic cohort: ``slide_id, patient_id, path`` and ``label`` (``time, event`` for
    survival); with ``patterns``, the planted tile shares of each pattern too (:data:`PATTERN_COLUMNS`).

    Pure and cheap so the workflow can call it while building its DAG. A patient has one or two slides,
    all with the patient's target. Binary and multiclass cohorts have every class (so at least two, or three,
    patients). ``signal``: any of :data:`SIGNAL_KEYS` (the rest take slidemil.config.Demo's defaults).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if n_patients < 2:
        raise ValueError(f"n_patients must be >= 2 so that both classes occur, got {n_patients}")
    if not 0.0 <= two_slide_fraction <= 1.0:
        raise ValueError(f"two_slide_fraction must be in [0, 1], got {two_slide_fraction}")
    if not 0.0 < positive_fraction < 1.0:
        raise ValueError(f"positive_fraction must be in (0, 1), got {positive_fraction}")
    signal = {**{k: v for k, v in field_defaults(Demo).items() if k in SIGNAL_KEYS}, **(signal or {})}

    rng = np.random.default_rng(seed_sequence(seed, "plan"))
    n_pos = int(np.clip(round(n_patients * positive_fraction), 1, n_patients - 1))
    labels = np.zeros(n_patients, dtype=int)
    labels[rng.choice(n_patients, size=n_pos, replace=False)] = 1
    n_two = int(round(n_patients * two_slide_fraction))
    two_slides = np.zeros(n_patients, dtype=bool)
    two_slides[rng.choice(n_patients, size=n_two, replace=False)] = True
    # The targets draw from their own stream, so the binary labels and slide counts stay those of one seed.
    targets = _plan_targets(np.random.default_rng(seed_sequence(seed, "targets", task)), task, labels, signal)

    width = max(3, len(str(n_patients)))
    rows = []
    for i in range(n_patients):
        patient_id = f"DEMO-P{i + 1:0{width}d}"
        for s in range(2 if two_slides[i] else 1):
            slide_id = f"{patient_id}-S{s + 1}"
            rows.append({"slide_id": slide_id, "patient_id": patient_id, "path": f"slides/{slide_id}.tiff",
                         **{k: v[i] for k, v in targets.items()}})
    columns = SURVIVAL_COLUMNS if task == "survival" else SAMPLES_COLUMNS
    return pd.DataFrame(rows, columns=columns + (PATTERN_COLUMNS if patterns else []))


def _plan_targets(rng: np.random.Generator, task: str, labels: np.ndarray, signal: dict) -> dict[str, list]:
    """Per patient: the target column(s) and the planted share of each pattern."""
    n = len(labels)
    low, high = signal["tumor_tile_fraction"]
    share = rng.uniform(low, high, n)
    lymphoid = rng.uniform(*signal["lymphoid_tile_fraction"], n)
    if task == "binary":
        # Drawn after the shares, so they stay those of the seed; the first k of one order, so a larger
        # fraction silences the same patients and more.
        positives = rng.permutation(np.flatnonzero(labels == 1))
        shown = labels == 1
        shown[positives[: int(round(len(positives) * signal["silent_positive_fraction"]))]] = False
        out = {"label": labels.tolist(), "tumor_tile_fraction": np.where(shown, share, 0.0)}
    elif task == "multiclass":
        if n < len(CLASS_NAMES):
            raise ValueError(f"n_patients must be >= {len(CLASS_NAMES)} so that every class occurs, got {n}")
        classes = rng.permutation(np.arange(n) % len(CLASS_NAMES))
        out = {"label": [CLASS_NAMES[c] for c in classes], "tumor_tile_fraction": np.where(classes == 1, share, 0.0)}
        lymphoid = np.where(classes == 2, share, 0.0)
    elif task == "regression":
        score = 100.0 * share + rng.normal(0.0, signal["score_noise"], n)
        out = {"label": np.round(score, 3).tolist(), "tumor_tile_fraction": share}
    else:
        out = {**_survival(rng, share, low, high, signal), "tumor_tile_fraction": share}
    return {**out, "tumor_tile_fraction": list(out["tumor_tile_fraction"]), "lymphoid_tile_fraction": list(lymphoid)}


def _survival(rng: np.random.Generator, share: np.ndarray, low: float, high: float, signal: dict) -> dict:
    # Exponential event times; the log hazard is linear in the tumour share, hazard_ratio from low to high.
    position = (share - low) / (high - low) if high > low else np.zeros_like(share)
    hazard = math.log(2.0) / _BASE_MEDIAN_MONTHS * signal["hazard_ratio"] ** position
    event_months = rng.exponential(1.0 / hazard)
    # An exact share is censored (at a uniform time before the event), so the rate is what the config says.
    censored = np.zeros(len(share), dtype=bool)
    censored[rng.choice(len(share), size=int(round(len(share) * signal["censored_fraction"])), replace=False)] = True
    months = np.where(censored, rng.uniform(0.0, 1.0, len(share)) * event_months, event_months)
    return {"time": np.round(np.maximum(months, 0.01), 2).tolist(), "event": (~censored).astype(int).tolist()}


def seed_sequence(seed: int, *keys: object) -> np.random.SeedSequence:
    # Python's hash() is salted per process; a digest keeps seeds stable across
    # runs, machines and worker processes.
    digest = hashlib.sha256("|".join(map(str, (seed, *keys))).encode()).digest()
    return np.random.SeedSequence(int.from_bytes(digest[:16], "little"))
