"""The demo cohort's slide table, planned from its settings alone (no pixel work, no OpenCV).

The workflow calls this while it builds its DAG, so the demo's jobs are known before any slide exists;
keeping it apart from the renderer keeps ``snakemake -n`` free of OpenCV, tifffile and tqdm.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

SAMPLES_COLUMNS = ["slide_id", "patient_id", "path", "label"]


def plan_cohort(
    n_patients: int,
    seed: int,
    two_slide_fraction: float = 0.3,
    positive_fraction: float = 0.5,
) -> pd.DataFrame:
    """Slide table of a synthetic cohort: ``slide_id, patient_id, path, label``.

    Pure and cheap so the workflow can call it while building its DAG. Both
    classes are always present (hence at least two patients); a patient has one
    or two slides, all with the patient's label.
    """
    if n_patients < 2:
        raise ValueError(f"n_patients must be >= 2 so that both classes occur, got {n_patients}")
    if not 0.0 <= two_slide_fraction <= 1.0:
        raise ValueError(f"two_slide_fraction must be in [0, 1], got {two_slide_fraction}")
    if not 0.0 < positive_fraction < 1.0:
        raise ValueError(f"positive_fraction must be in (0, 1), got {positive_fraction}")

    rng = np.random.default_rng(seed_sequence(seed, "plan"))
    n_pos = int(np.clip(round(n_patients * positive_fraction), 1, n_patients - 1))
    labels = np.zeros(n_patients, dtype=int)
    labels[rng.choice(n_patients, size=n_pos, replace=False)] = 1
    n_two = int(round(n_patients * two_slide_fraction))
    two_slides = np.zeros(n_patients, dtype=bool)
    two_slides[rng.choice(n_patients, size=n_two, replace=False)] = True

    width = max(3, len(str(n_patients)))
    rows = []
    for i in range(n_patients):
        patient_id = f"DEMO-P{i + 1:0{width}d}"
        for s in range(2 if two_slides[i] else 1):
            slide_id = f"{patient_id}-S{s + 1}"
            rows.append((slide_id, patient_id, f"slides/{slide_id}.tiff", int(labels[i])))
    return pd.DataFrame(rows, columns=SAMPLES_COLUMNS)


def seed_sequence(seed: int, *keys: object) -> np.random.SeedSequence:
    # Python's hash() is salted per process; a digest keeps seeds stable across
    # runs, machines and worker processes.
    digest = hashlib.sha256("|".join(map(str, (seed, *keys))).encode()).digest()
    return np.random.SeedSequence(int.from_bytes(digest[:16], "little"))
