"""features.h5, one slide's features (CLAM-compatible): datasets ``features`` [N, D] (float32 or float16)
and ``coords`` [N, 2], and attributes (slide_id, extractor, weights, weights_digest, excluded, precision, ...;
imported files: source).

Written by feature extraction and the feature import (``slidemil.features.byof``); read by MIL training,
the heatmaps, the manifests and the cohort facts, all through the readers here.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from slidemil.files import FORMAT_VERSION, check_format, map_planned, map_plan, open_h5, read_h5, write_h5

VERSION = 1
WHAT = "feature file"


def write_features(path: str | os.PathLike, features: np.ndarray, coords: np.ndarray, attrs: Mapping) -> None:
    write_h5(path, {"features": features, "coords": coords}, {**attrs, FORMAT_VERSION: VERSION})


def read_features(path: str | os.PathLike, names: tuple[str, ...] = ("features", "coords")) -> tuple[dict, dict]:
    """(datasets ``names``, attributes) of a feature file."""
    data, attrs = read_h5(path, names, WHAT)
    check_format(attrs.get(FORMAT_VERSION), VERSION, path, WHAT)
    return data, attrs


def map_features(path: str | os.PathLike) -> np.ndarray:
    """The ``features`` dataset, memory-mapped where its layout allows (see ``slidemil.files.map_h5``), else read.

    The file is opened once: this runs for every slide of every training job.
    """
    with open_h5(path, WHAT) as f:
        check_format(f.attrs.get(FORMAT_VERSION), VERSION, path, WHAT)
        where = map_plan(f["features"])
        if where is None:
            return f["features"][()]
    return map_planned(path, "features", where)


def read_features_attrs(path: str | os.PathLike) -> tuple[int, dict]:
    """(number of rows, attributes) of a feature file without reading the features."""
    with open_h5(path, WHAT) as f:
        if "features" not in f:
            raise ValueError(f"{path}: no 'features' dataset; not a slidemil feature file")
        n = int(f["features"].shape[0])
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    check_format(attrs.get(FORMAT_VERSION), VERSION, path, WHAT)
    return n, attrs
