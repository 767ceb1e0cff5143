"""The demo's second cohort: new patients scanned elsewhere, to deploy the demo's trained models on.

The same generator as the demo cohort (``slidemil.demo.plan``, ``slidemil.demo.render``) with its own patients
(``EXT-P001``...) and seed, and every slide's stains shifted the way another scanner's colour response shifts
them: each channel's optical density is scaled (``OD_GAINS``), so white background stays white and tissue
changes hue slightly. Labelled, so the models' external AUC can be measured.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from slidemil.demo.plan import plan_cohort

logger = logging.getLogger(__name__)

PREFIX = "EXT"
# Optical density gains per RGB channel: a redder eosin and a lighter haematoxylin blue, about what separates
# two scanner models' colour profiles on one H&E slide (a few gray levels to ~15 on stained tissue).
OD_GAINS = (0.88, 1.08, 0.95)


def plan_external_cohort(n_patients: int, seed: int, two_slide_fraction: float = 0.3,
                         positive_fraction: float = 0.5) -> pd.DataFrame:
    """The second cohort's sheet (slide_id, patient_id, path, label): the demo's plan under its own ids."""
    table = plan_cohort(n_patients, seed, two_slide_fraction, positive_fraction)
    for column in ("slide_id", "patient_id", "path"):
        table[column] = table[column].str.replace("DEMO-", f"{PREFIX}-", regex=False)
    return table


def shift_colours(rgb: np.ndarray, gains=OD_GAINS) -> np.ndarray:
    """``rgb`` (uint8) with each channel's optical density scaled by ``gains``."""
    od = -np.log(np.maximum(rgb, 1).astype(np.float32) / 255.0)
    return np.clip(np.rint(255.0 * np.exp(-od * np.asarray(gains, np.float32))), 0, 255).astype(np.uint8)


def make_external_cohort(out_dir: str | os.PathLike, n_patients: int, demo: dict) -> pd.DataFrame:
    """Write the second cohort's slides and ``samples.csv`` under ``out_dir``; ``demo`` is the demo's settings
    (slide size, mpp, tumour fraction, ...), whose seed + 1 draws this cohort."""
    from slidemil.demo.render import render_slide, write_pyramidal_tiff
    from slidemil.files import write_csv

    out = Path(out_dir)
    seed = int(demo["seed"]) + 1
    table = plan_external_cohort(n_patients, seed, demo["two_slide_fraction"], demo["positive_fraction"])
    (out / "slides").mkdir(parents=True, exist_ok=True)
    for row in table.itertuples(index=False):
        rgb = render_slide(row.slide_id, int(row.label), seed, tuple(demo["slide_px"]),
                           tuple(demo["tumor_tile_fraction"]))[0]
        write_pyramidal_tiff(out / row.path, shift_colours(rgb), demo["mpp"], demo["objective_power"])
    write_csv(out / "samples.csv", table)
    logger.info("wrote %d slides of %d patients (seed %d, colours shifted by OD gains %s) to %s",
                len(table), n_patients, seed, OD_GAINS, out)
    return table
