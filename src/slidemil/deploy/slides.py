"""``slidemil predict --slides``: slides tiled and extracted the way a training cohort's feature file says.

A model.pt records the model and its standardisation, not how its features were made; a feature file of the
training cohort (``--like``) records that: the extractor, its weights and their digest, input size, precision,
tiling mpp and tile size (``slidemil.files.features``). The new slides get those settings (tiling thresholds
at their defaults) and their features must come out with the same weights digest, else the run stops with one
line. Unusable slides get empty, marked files (the workflow's ``on_error: exclude``) and no prediction.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from slidemil.errors import FeatureFileError
from slidemil.files.features import read_features

logger = logging.getLogger(__name__)


def extraction_settings(like: str | os.PathLike) -> dict:
    """The tiling and extraction settings a feature file was made with."""
    attrs = read_features(like, ())[1]
    missing = [k for k in ("extractor", "weights", "input_px", "target_mpp", "tile_px") if k not in attrs]
    if missing or attrs.get("source") is not None:
        raise FeatureFileError(f"{like}: records no {', '.join(missing) or 'extraction'} settings (imported "
                               "features?); pass --features made with the training extractor instead of --slides")
    return {"tiling": {"mpp": float(attrs["target_mpp"]), "tile_px": int(attrs["tile_px"])},
            "extractor": str(attrs["extractor"]), "weights": str(attrs["weights"]),
            "input_px": int(attrs["input_px"]), "precision": str(attrs.get("precision", "auto")),
            "digest": str(attrs.get("weights_digest", ""))}


def features_from_slides(slides: list[str], like: str | os.PathLike, work_dir: str | os.PathLike,
                         device: str = "auto", seed: int = 0) -> dict[str, str]:
    """slide_id -> a feature file made under ``work_dir`` for each slide, with ``like``'s settings."""
    from slidemil.features.extract import extract_features
    from slidemil.tiling.tile import tile_slide

    settings = extraction_settings(like)
    work = Path(work_dir)
    files = {}
    for slide in slides:
        slide_id = Path(slide).name.split(".")[0]
        tiles, features = work / "tiles" / f"{slide_id}.h5", work / "features" / f"{slide_id}.h5"
        tile_slide(str(slide), str(tiles), None, settings["tiling"], slide_id=slide_id, on_error="exclude")
        extract_features(str(slide), str(tiles), str(features), extractor=settings["extractor"],
                         weights=settings["weights"], input_px=settings["input_px"], seed=seed, device=device,
                         precision=settings["precision"], slide_id=slide_id)
        digest = str(read_features(features, ())[1].get("weights_digest", ""))
        if settings["digest"] and digest and digest != settings["digest"]:
            raise FeatureFileError(f"{slide}: features came out with weights digest {digest}, but {like} was made "
                                   f"with {settings['digest']}; pass the training run's weights (or its --seed for "
                                   "random weights)")
        files[slide_id] = str(features)
    return files
