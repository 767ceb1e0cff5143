"""The demo's second cohort: new patients scanned elsewhere, to deploy the demo's trained models on.

The same generator and plan as the demo cohort (``slidemil.demo.plan``, ``slidemil.demo.render``: the same task,
tumour and lymphoid shares, silent positives) with its own patients (``EXT-P001``...) and seed, and every
slide's stains shifted the way another scanner's colour response shifts them: each channel's optical density
is scaled (``OD_GAINS``), so white background stays white and tissue changes hue slightly.
Labelled, so the models' external metrics can be measured, for every task.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from slidemil.config import Demo, field_defaults
from slidemil.demo.plan import PATTERN_COLUMNS, SIGNAL_KEYS, plan_cohort

logger = logging.getLogger(__name__)

PREFIX = "EXT"
# Optical density gains per RGB channel: a redder eosin and a lighter haematoxylin blue, about what separates
# two scanner models' colour profiles on one H&E slide (a few gray levels to ~15 on stained tissue).
OD_GAINS = (0.88, 1.08, 0.95)


def plan_external_cohort(n_patients: int, demo: dict, patterns: bool = False) -> pd.DataFrame:
    """The second cohort's sheet: the demo's plan (its task and planted signal, ``demo`` being the config's
    ``demo`` section) for ``n_patients`` new patients drawn from seed ``demo.seed + 1``, under their own ids.
    With ``patterns``, the planted shares too (what :func:`make_external_cohort` renders)."""
    d = {**field_defaults(Demo), **demo}
    table = plan_cohort(n_patients, int(d["seed"]) + 1, d["two_slide_fraction"], d["positive_fraction"], d["task"],
                        {k: d[k] for k in SIGNAL_KEYS}, patterns=patterns)
    for column in ("slide_id", "patient_id", "path"):
        table[column] = table[column].str.replace("DEMO-", f"{PREFIX}-", regex=False)
    return table


def shift_colours(rgb: np.ndarray, gains=OD_GAINS) -> np.ndarray:
    """``rgb`` (uint8) with each channel's optical density scaled by ``gains``."""
    od = -np.log(np.maximum(rgb, 1).astype(np.float32) / 255.0)
    return np.clip(np.rint(255.0 * np.exp(-od * np.asarray(gains, np.float32))), 0, 255).astype(np.uint8)


def make_external_cohort(out_dir: str | os.PathLike, n_patients: int, demo: dict) -> pd.DataFrame:
    """Write the second cohort's slides and ``samples.csv`` under ``out_dir``; ``demo`` is the demo's settings
    (slide size, mpp, task, planted patterns, ...), whose seed + 1 draws this cohort."""
    from slidemil.demo.render import render_slide, slide_job, write_pyramidal_tiff
    from slidemil.files import write_csv

    out = Path(out_dir)
    d = {**field_defaults(Demo), **demo, "seed": int(demo["seed"]) + 1}
    table = plan_external_cohort(n_patients, demo, patterns=True)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    for row in table.to_dict(orient="records"):
        job = slide_job(row, d)
        rgb = render_slide(job.pop("slide_id"), **job)[0]
        write_pyramidal_tiff(out / row["path"], shift_colours(rgb), d["mpp"], d["objective_power"])
    sheet = table.drop(columns=PATTERN_COLUMNS)
    write_csv(out / "samples.csv", sheet)
    logger.info("wrote %d %s slides of %d patients (seed %d, colours shifted by OD gains %s) to %s",
                len(sheet), d["task"], n_patients, d["seed"], OD_GAINS, out)
    return sheet
