"""Bring your own features: per-slide feature files made elsewhere, and MIL benchmark bags.

``import_features`` normalises one slide's feature file to the layout the
feature stage writes (HDF5: ``features`` N x D float32/float16, ``coords``
N x 2 int; attributes ``extractor``, ``source``, ``weights_digest``,
``excluded``), so training and the report treat it like our own. Accepted:

- CLAM / TRIDENT ``.h5``: ``features`` [N, D] or [1, N, D] at the root (also
  ``feats`` or ``embeddings``), or one such dataset inside a ``features``
  group; ``coords`` (or ``coordinates``) N x 2; missing coords become -1 with
  a warning;
- CLAM ``.pt``: a torch tensor [N, D] (or [1, N, D]), loaded with weights_only;
- our own HDF5 (its ``extractor`` and ``excluded`` attributes are kept).

``weights_digest`` here is the first 16 hex digits of the source file's
sha256: we cannot know the extractor's weights, but we can tell whether the
features changed.

``npz_to_cohort`` turns a classic MIL benchmark (``.npz`` with features,
bag_index, bag_labels, cv_train_masks_5x10) into one ``.h5`` per bag and a
sample sheet whose ``fold`` column is each bag's test fold in one repetition
of the published cross-validation. Labels are written as they are: 0/1 (binary), integer class indices
0..K-1 (``task: multiclass``) or numbers (``task: regression``).

Command line::

    python -m slidemil.features.byof import SRC --out OUT.h5 [--extractor NAME]
    python -m slidemil.features.byof from-npz DATASET.npz --out DIR [--repetition R]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from slidemil.errors import FeatureFileError
from slidemil.files import write_csv
from slidemil.files.features import write_features
from slidemil.logs import setup_logging

logger = logging.getLogger(__name__)

FEATURE_NAMES = ("features", "feats", "embeddings")
COORD_NAMES = ("coords", "coordinates")
# Attributes other tools use for the model that made the features.
EXTRACTOR_ATTRS = ("extractor", "encoder", "patch_encoder", "model_name", "name")
# The published folds of a MIL benchmark file (R repetitions x K folds x bags, True = train), as MIDatasets.jl.
CV_MASKS = "cv_train_masks_5x10"


def file_digest(path: str | os.PathLike) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()[:16]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _find_features(f: h5py.File, src: Path) -> h5py.Dataset:
    for name in FEATURE_NAMES:
        if name not in f:
            continue
        node = f[name]
        if isinstance(node, h5py.Dataset):
            return node
        # A group (some TRIDENT versions and ad-hoc exports): its one feature-shaped dataset.
        inner = [d for d in node.values() if isinstance(d, h5py.Dataset) and d.ndim in (2, 3)]
        if len(inner) == 1:
            return inner[0]
        names = ", ".join(node.keys()) or "nothing"
        raise FeatureFileError(f"{src}: group {name!r} holds {names}; expected exactly one N x D dataset in it")
    found = ", ".join(f"{k} ({'group' if isinstance(v, h5py.Group) else v.shape})" for k, v in f.items()) or "nothing"
    raise FeatureFileError(f"{src}: no features dataset (looked for {', '.join(FEATURE_NAMES)}); the file holds {found}")


def _read_h5(src: Path) -> tuple[np.ndarray, np.ndarray | None, dict]:
    try:
        f = h5py.File(src, "r")
    except OSError as err:
        raise FeatureFileError(f"{src}: not a readable HDF5 file ({err})") from err
    with f:
        node = _find_features(f, src)
        feats, feats_attrs = node[()], dict(node.attrs)
        coords = None
        for name in COORD_NAMES:
            if name in f and isinstance(f[name], h5py.Dataset):
                coords = f[name][()]
                break
        attrs = {k: _text(v) for k, v in f.attrs.items() if isinstance(v, (str, bytes))}
        # Some exporters put the encoder's name on the features dataset instead of the file.
        attrs.update({k: _text(v) for k, v in feats_attrs.items() if isinstance(v, (str, bytes)) and k not in attrs})
    return feats, coords, attrs


def _read_pt(src: Path) -> np.ndarray:
    import torch  # only .pt files need it

    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for non-tensor or corrupt files
        raise FeatureFileError(f"{src}: cannot be loaded as a torch tensor ({err})") from err
    if isinstance(obj, dict):
        tensors = [obj[k] for k in FEATURE_NAMES if k in obj]
        if not tensors:
            raise FeatureFileError(f"{src}: a dict without a features tensor (keys: {', '.join(map(str, obj))})")
        obj = tensors[0]
    if not isinstance(obj, torch.Tensor):
        raise FeatureFileError(f"{src}: holds a {type(obj).__name__}, expected a tensor [N, D]")
    return obj.float().numpy() if obj.dtype == torch.bfloat16 else obj.numpy()


def read_feature_file(src: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(features [N, D], coords [N, 2] or None, string attributes) of a .h5 or .pt feature file."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: feature file not found; fix the path in the sample sheet")
    suffix = src.suffix.lower()
    if suffix in (".h5", ".hdf5", ".hdf"):
        feats, coords, attrs = _read_h5(src)
    elif suffix in (".pt", ".pth"):
        feats, coords, attrs = _read_pt(src), None, {}
    else:
        raise FeatureFileError(f"{src}: unknown feature file type {suffix!r}; expected .h5 (CLAM/TRIDENT) or .pt (CLAM)")
    feats = np.asarray(feats)
    if feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if feats.ndim != 2:
        raise FeatureFileError(f"{src}: features must be N x D (or 1 x N x D), got shape {feats.shape}")
    if not np.issubdtype(feats.dtype, np.floating) and not np.issubdtype(feats.dtype, np.integer):
        raise FeatureFileError(f"{src}: features have non-numeric dtype {feats.dtype}")
    if coords is not None:
        coords = np.asarray(coords)
        if coords.ndim == 3 and coords.shape[0] == 1:
            coords = coords[0]
        if coords.shape != (len(feats), 2):
            raise FeatureFileError(f"{src}: coords have shape {coords.shape}, expected ({len(feats)}, 2) to match features")
    return feats, coords, attrs


def import_features(src: str | os.PathLike, out_h5: str | os.PathLike, extractor: str | None = None) -> dict:
    """Write ``src`` (CLAM/TRIDENT .h5, CLAM .pt, or ours) as our feature HDF5 at ``out_h5``.

    ``extractor`` names the features when the file does not (default: its own
    attribute, else "unknown"). Non-finite features are an error; a file with
    zero rows gives a valid empty output whose ``excluded`` attribute says why.
    """
    src = Path(src)
    feats, coords, attrs = read_feature_file(src)
    if feats.size and not np.isfinite(feats).all():
        bad = int((~np.isfinite(feats)).any(axis=1).sum())
        raise FeatureFileError(f"{src}: {bad} of {len(feats)} feature rows contain NaN or infinite values")
    dtype = np.float16 if feats.dtype == np.float16 else np.float32
    if coords is None:
        if len(feats):
            logger.warning("%s: no coords; writing -1 (attention heatmaps will not be placeable)", src)
        coords = np.full((len(feats), 2), -1, dtype=np.int64)
    excluded = attrs.get("excluded", "")
    if len(feats) == 0 and not excluded:
        excluded = f"no feature rows in {src.name}"
        logger.warning("%s: zero rows; writing an empty feature file marked excluded", src)
    name = extractor or next((attrs[k] for k in EXTRACTOR_ATTRS if attrs.get(k)), "unknown")
    digest = file_digest(src)
    write_features(out_h5, feats.astype(dtype, copy=False), coords.astype(np.int64, copy=False),
                   {"extractor": name, "source": str(src.resolve()), "weights_digest": digest, "excluded": excluded})
    logger.info("%s: %d x %d features -> %s", src, feats.shape[0], feats.shape[1], out_h5)
    return {"source": str(src), "n_tiles": int(feats.shape[0]), "dim": int(feats.shape[1]),
            "excluded": excluded, "digest": digest}


# --------------------------------------------------------------------------- MIL benchmarks


def load_mil_npz(npz: str | os.PathLike, seed: int = 0) -> dict[str, np.ndarray]:
    """The arrays of a MIL benchmark ``.npz``, checked for consistency.

    Without ``cv_train_masks_5x10`` the folds are drawn: a label-stratified 10-fold cross-validation
    repeated 5 times from ``seed`` (``stratified_cv_masks``), so the file needs only the bags.
    """
    npz = Path(npz)
    if not npz.is_file():
        raise FileNotFoundError(f"{npz}: MIL benchmark file not found")
    with np.load(npz) as data:
        missing = [k for k in ("features", "bag_index", "bag_labels") if k not in data]
        if missing:
            raise FeatureFileError(f"{npz}: missing array(s) {', '.join(missing)}")
        arrays = {k: data[k] for k in ("features", "bag_index", "bag_labels", CV_MASKS) if k in data}
    feats, index, labels = (arrays[k] for k in ("features", "bag_index", "bag_labels"))
    n_bags = len(labels)
    if feats.ndim != 2 or index.shape != (len(feats),):
        raise FeatureFileError(f"{npz}: features {feats.shape} and bag_index {index.shape} do not match")
    if index.min() < 0 or index.max() >= n_bags or len(np.unique(index)) != n_bags:
        raise FeatureFileError(f"{npz}: bag_index must cover bags 0..{n_bags - 1}, each with an instance")
    if CV_MASKS not in arrays:
        arrays[CV_MASKS] = stratified_cv_masks(labels, seed, source=str(npz))
    masks = arrays[CV_MASKS]
    if masks.ndim != 3 or masks.shape[2] != n_bags:
        raise FeatureFileError(f"{npz}: {CV_MASKS} has shape {masks.shape}, expected (R, K, {n_bags})")
    if not np.isfinite(feats).all():
        raise FeatureFileError(f"{npz}: features contain NaN or infinite values")
    return arrays


def stratified_cv_masks(labels: np.ndarray, seed: int, repetitions: int = 5, folds: int = 10,
                        source: str = "npz") -> np.ndarray:
    """Train masks [repetitions, folds, n_bags] (True = train) of a label-stratified k-fold CV per repetition,
    repetition r shuffled with seed + r."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    if np.bincount(labels.astype(int)).min() < folds:
        raise FeatureFileError(f"{source}: a {folds}-fold stratified CV needs {folds} bags of each label; "
                               f"add {CV_MASKS} to the file")
    masks = np.ones((repetitions, folds, len(labels)), dtype=bool)
    for r in range(repetitions):
        cv = StratifiedKFold(folds, shuffle=True, random_state=seed + r)
        for k, (_, test) in enumerate(cv.split(np.zeros(len(labels)), labels)):
            masks[r, k, test] = False
    return masks


def cv_test_folds(masks: np.ndarray, repetition: int, source: str = "npz") -> np.ndarray:
    """Each bag's test fold in ``repetition``: the fold whose train mask leaves it out (exactly one)."""
    if not 0 <= repetition < masks.shape[0]:
        raise ValueError(f"{source}: repetition {repetition} out of range 0..{masks.shape[0] - 1}")
    held_out = ~masks[repetition].astype(bool)  # [K, n_bags]
    counts = held_out.sum(axis=0)
    bad = np.flatnonzero(counts != 1)
    if len(bad):
        raise FeatureFileError(f"{source}: repetition {repetition}: bag(s) {bad[:10].tolist()} are in "
                               f"{counts[bad[:10]].tolist()} test folds; each must be in exactly one")
    return held_out.argmax(axis=0)


def bag_ids(n_bags: int) -> list[str]:
    width = len(str(n_bags - 1))
    return [f"bag{i:0{width}d}" for i in range(n_bags)]


def npz_to_cohort(npz: str | os.PathLike, out_dir: str | os.PathLike, repetition: int = 0) -> pd.DataFrame:
    """Write one feature file per bag and ``samples.csv`` (slide_id, patient_id, path, label, fold) to ``out_dir``.

    A bag is one slide of one patient; ``coords`` holds each instance's index in
    the npz (x) and -1 (y). Returns the sheet.
    """
    npz, out_dir = Path(npz), Path(out_dir)
    arrays = load_mil_npz(npz)
    feats, index, labels = arrays["features"], arrays["bag_index"], bag_label_values(arrays["bag_labels"])
    folds = cv_test_folds(arrays[CV_MASKS], repetition, str(npz))
    ids = bag_ids(len(labels))
    digest = file_digest(npz)
    rows = []
    for b, bag in enumerate(ids):
        members = np.flatnonzero(index == b)
        coords = np.stack([members, np.full(len(members), -1)], axis=1).astype(np.int64)
        path = out_dir / "features" / f"{bag}.h5"
        write_features(path, feats[members].astype(np.float32), coords,
                       {"extractor": npz.stem, "source": f"{npz.resolve()}#bag={b}", "weights_digest": digest,
                        "excluded": ""})
        rows.append({"slide_id": bag, "patient_id": bag, "path": f"features/{bag}.h5",
                     "label": labels[b].item(), "fold": int(folds[b])})
    sheet = pd.DataFrame(rows)
    write_csv(out_dir / "samples.csv", sheet)
    kinds = (f"labels {dict(sorted(pd.Series(labels).value_counts().items()))}" if labels.dtype.kind == "i"
             else f"numeric labels {labels.min():.4g}..{labels.max():.4g}")
    logger.info("%s: %d bags (%s), %d instances, %d folds of repetition %d -> %s",
                npz, len(ids), kinds, len(feats), folds.max() + 1, repetition, out_dir)
    return sheet


def bag_label_values(values: np.ndarray) -> np.ndarray:
    """Bag labels as the sheet's label column takes them: integers (0/1, or class indices 0..K-1 of a
    multiclass task) when every label is whole, else numbers (a regression target)."""
    values = np.asarray(values)
    numeric = np.issubdtype(values.dtype, np.number)
    whole = numeric and np.all(np.isfinite(values)) and np.all(values == np.round(values))
    return values.astype(np.int64) if whole else values.astype(np.float64)


def main(argv=None, prog: str = "python -m slidemil.features.byof") -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="normalise one slide's feature file (.h5/.pt) to our HDF5")
    imp.add_argument("src")
    imp.add_argument("--out", required=True)
    imp.add_argument("--extractor", help="name of the features (default: the file's own attribute)")
    npz = sub.add_parser("from-npz", help="MIL benchmark .npz -> per-bag .h5 files and samples.csv")
    npz.add_argument("npz")
    npz.add_argument("--out", required=True, help="output folder")
    npz.add_argument("--repetition", type=int, default=0, help="which repetition of the CV gives the fold column")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        if args.command == "import":
            print(import_features(args.src, args.out, args.extractor))
        else:
            sheet = npz_to_cohort(args.npz, args.out, args.repetition)
            print(f"{len(sheet)} bags -> {Path(args.out) / 'samples.csv'}")
    except (FeatureFileError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}")


if __name__ == "__main__":
    main()
