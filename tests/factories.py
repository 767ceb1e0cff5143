"""Shared test data and runners: every test builds its inputs here, never from another test file.

- paths: ROOT (the repository), SHARED_DATA (../shared/data, third-party files never copied in);
- Snakemake: snakemake_cli (the one runner of the workflow's command line) and job_counts (the one
  parser of a dry run's job table); TINY (the demo cohort, tiny) and TINY_SHEET_CONFIG + make_tiny_cohort
  (a user sample sheet with unusable slides);
- MIL bags: write_dataset (feature files + splits.csv with two folds), FAST, MODEL_KWARGS;
- tiled slides: make_tiled_cohort (binary or multiclass), tiled_slide (one slide and its tiles);
- sample sheets: write_sheet (rows plus placeholder slide files);
- report inputs: write_run / shared_runs (prediction and history files), test_rows;
- deploy: train_two_folds, write_deploy_cohort (binary); train_task_folds, write_task_deploy_cohort, direct_outputs
  (every task).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from slidemil.demo.render import make_cohort, make_slide
from slidemil.files import write_h5
from slidemil.tiling.tile import tile_slide

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


# TINY on a user sample sheet: the demo's slides plus three unusable ones.
TINY_SHEET_CONFIG = {
    "results": "results",
    "tiling": {"mpp": 1.0, "tile_px": 128},
    "features": {"extractors": ["shufflenet_v2"],
                 "settings": {"shufflenet_v2": {"weights": "random", "input_px": 128, "dtype": "float32"}}},
    "splits": {"folds": 2, "test_fraction": 0.25},
    "mil": {"models": ["abmil"], "training": {"epochs": 8, "patience": 4, "lr": 0.0005}},
    "report": {"n_bootstrap": 200},
    "compute": {"threads": 1, "loader_workers": 0, "batch_size": 32},
}


def snakemake_cli(workdir, *args, configfile="config.yaml", timeout=900, env=None):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow" / "Snakefile"), "--configfile", configfile, *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env)


def make_tiny_cohort(folder: Path) -> Path:
    """An 8-patient demo cohort plus unusable slides (no mpp, no tissue, unreadable); returns the sheet."""
    # The easy signal of the first demo: the workflow tests check numbers end to end, not the demo's difficulty.
    make_cohort(str(folder), n_patients=8, seed=7, slide_px=(1536, 1536), tumor_tile_fraction=[0.1, 0.3],
                lymphoid_tile_fraction=[0.0, 0.0], silent_positive_fraction=0.0)
    sheet = pd.read_csv(folder / "samples.csv", dtype=str)
    extra = folder / "extra"
    extra.mkdir()
    make_slide(str(extra / "nompp.tiff"), label=1, seed=3, slide_px=(768, 768), mpp=None, objective_power=None)
    make_slide(str(extra / "blank.tiff"), label=0, seed=4, slide_px=(768, 768), tissue=False)
    rows = [("BAD-NOMPP", "BAD-P1", "extra/nompp.tiff", "1"), ("BAD-BLANK", "BAD-P2", "extra/blank.tiff", "0")]
    unreadable = SHARED_DATA / "slides" / "bad" / "unreadable.svs"
    if unreadable.is_file():
        rows.append(("BAD-UNREADABLE", "DEMO-P001", str(unreadable), sheet.loc[0, "label"]))
    sheet = pd.concat([sheet, pd.DataFrame(rows, columns=["slide_id", "patient_id", "path", "label"])])
    sheet.to_csv(folder / "sheet.csv", index=False)
    return folder / "sheet.csv"



# The demo cohort at its smallest: 16 patients, tiny slides, one fast extractor, abmil and MHIM-MIL on it.
TINY = {
    "results": "results",
    # A strong signal: these runs check the numbers end to end (4 test patients), not the demo's difficulty.
    "demo": {"n_patients": 16, "slide_px": [1536, 1536], "tumor_tile_fraction": [0.3, 0.5],
             "lymphoid_tile_fraction": [0.0, 0.0], "silent_positive_fraction": 0.0},
    "tiling": {"mpp": 1.0, "tile_px": 128},
    "features": {"extractors": ["shufflenet_v2"],
                 "settings": {"shufflenet_v2": {"weights": "random", "input_px": 128, "dtype": "float32"}}},
    "splits": {"folds": 2, "test_fraction": 0.25},
    # mhim_abmil: MHIM-MIL starts from abmil trained on the same fold, and is reported beside it.
    "mil": {"models": ["abmil", "mhim_abmil"], "training": {"epochs": 8, "patience": 4, "lr": 0.0005}},
    "report": {"n_bootstrap": 200},
    "compute": {"threads": 1, "loader_workers": 0, "batch_size": 32},
}



# ---- sample sheets and single slides (the fault cases, issue 21) ----

SHEET_COLUMNS = ["slide_id", "patient_id", "path", "label"]


def write_sheet(folder: Path, rows, name: str = "sheet.csv", sep: str = ",") -> Path:
    """A sample sheet of ``rows`` (slide_id, patient_id, path, label) under ``folder``; every relative path in
    it gets a small placeholder file, so only the problem a test plants is wrong."""
    folder.mkdir(parents=True, exist_ok=True)
    for _, _, path, _ in rows:
        file = folder / path
        if not Path(path).is_absolute() and not file.exists():
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(b"placeholder")
    sheet = folder / name
    pd.DataFrame(rows, columns=SHEET_COLUMNS).to_csv(sheet, sep=sep, index=False)
    return sheet


def tiled_slide(folder: Path, name: str, slide_px: int = 1024, **slide) -> dict:
    """One demo slide of ``slide_px`` square under ``folder`` and its tiles file (64 px tiles at 1 mpp)."""
    folder.mkdir(parents=True, exist_ok=True)
    path, tiles = folder / f"{name}.tiff", folder / f"{name}.h5"
    make_slide(str(path), label=1, seed=len(name), slide_px=(slide_px, slide_px), **slide)
    tile_slide(str(path), str(tiles), None, {"tile_px": 64, "mpp": 1.0})
    return {"slide": str(path), "tiles": str(tiles)}



# ---- dry runs ----

def snakemake_report_text(report_zip: Path) -> str:
    """The text of a `snakemake --report` zip's page (not the result files it holds), as a reader sees its
    captions: the JSON line breaks, HTML tags and escapes undone, white space folded."""
    import html
    import zipfile

    with zipfile.ZipFile(report_zip) as z:
        page = next(n for n in z.namelist() if n.endswith("report.html") and "/data/" not in n)
        text = z.read(page).decode("utf-8").replace("\\n", " ")
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


def job_counts(output: str) -> dict:
    """Rule -> number of jobs from a dry run's job table ({} when nothing would run)."""
    if "Nothing to be done" in output:
        return {}
    table = output.split("Job stats:", 1)[1]
    counts = {}
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m:
            break
        if m.group(1) not in ("all", "total"):
            counts[m.group(1)] = int(m.group(2))
    return counts



# ---- MIL bags ----

DIM = 16


N_PATIENTS = 30  # every third patient has two slides: 40 slides, multi-slide patients in every partition


FAST = {"epochs": 6, "lr": 1e-3}


MODEL_KWARGS = {"dropout": 0.25}  # the default architecture: on 16-d inputs it is fast and learns quickly


def make_bag(rng, label):
    """10-30 Gaussian instances; a positive bag has 3-5 instances shifted by 6 sd along one axis."""
    n = int(rng.integers(10, 31))
    feats = rng.normal(size=(n, DIM)).astype(np.float32)
    if label:
        hot = rng.choice(n, size=int(rng.integers(3, 6)), replace=False)
        feats[hot, 0] += 6.0
    return feats


def partition(patient, fold):
    # fold 0: patients 0-17 train, 18-23 val, 24-29 test; fold 1 rotates and
    # excludes two patients.
    p = (patient + 6 * fold) % N_PATIENTS
    if fold == 1 and patient in (0, 1):
        return "excluded"
    return "train" if p < 18 else "val" if p < 24 else "test"


def write_dataset(root):
    """Feature files and a splits CSV with folds 0 and 1 under ``root``."""
    rng = np.random.default_rng(0)
    rows, features = [], {}
    for patient in range(N_PATIENTS):
        label = patient % 2
        for k in range(2 if patient % 3 == 0 else 1):
            slide = f"S{patient:02d}_{k}"
            feats = make_bag(rng, label)
            path = root / f"{slide}.h5"
            # float16 on some slides: both stored precisions must load.
            write_h5(path, {"features": feats.astype(np.float16 if k else np.float32),
                            "coords": np.zeros((len(feats), 2), dtype=np.int64)}, {})
            features[slide] = str(path)
            rows.append({"slide_id": slide, "patient_id": f"P{patient:02d}", "label": label,
                         "fold_0": partition(patient, 0), "fold_1": partition(patient, 1)})
    splits = root / "splits.csv"
    pd.DataFrame(rows).to_csv(splits, index=False)
    return {"root": root, "features": features, "splits": str(splits), "table": pd.DataFrame(rows)}



# ---- tiled slides ----

# The multiclass demo's classes (slidemil.demo.plan) and the pattern each one's slides show.
TILED_CLASS_PATTERNS = {"normal": {}, "tumor": {"tumor": 0.3}, "lymphoid": {"lymphoid": 0.3}}


def make_tiled_cohort(d, parts: list[str], task: str = "binary") -> dict:
    """One 1024 px slide per patient under ``d``, tiled, and a splits CSV whose fold 0 is ``parts``.

    Binary: slide k has label k % 2. Multiclass: slide k is of class k % 3 of TILED_CLASS_PATTERNS (normal, tumor,
    lymphoid) and shows that class's demo pattern; splits.csv numbers the classes in slidemil.tasks.class_order
    (``classes`` in the result) and names them in label_value."""
    from slidemil.demo.render import render_slide, write_pyramidal_tiff
    from slidemil.tasks import class_order

    classes = class_order(list(TILED_CLASS_PATTERNS)) if task == "multiclass" else None
    slides, tiles, rows = {}, {}, []
    for k, part in enumerate(parts):
        slide_id = f"S{k}"
        slides[slide_id], tiles[slide_id] = str(d / f"{slide_id}.tiff"), str(d / f"{slide_id}.h5")
        row = {"slide_id": slide_id, "patient_id": f"P{k}", "label": k % 2, "fold_0": part}
        if classes is None:
            make_slide(slides[slide_id], label=k % 2, seed=k, slide_px=(1024, 1024))
        else:
            name = list(TILED_CLASS_PATTERNS)[k % 3]
            rgb = render_slide(slide_id, name, k, (1024, 1024), patterns=TILED_CLASS_PATTERNS[name])[0]
            write_pyramidal_tiff(slides[slide_id], rgb, 0.5, 20)
            row.update(label=classes.index(name), label_value=name, task=task)
        tile_slide(slides[slide_id], tiles[slide_id], None, {"tile_px": 64, "mpp": 1.0})
        rows.append(row)
    pd.DataFrame(rows).to_csv(d / "splits.csv", index=False)
    return {"dir": d, "slides": slides, "tiles": tiles, "splits": str(d / "splits.csv"), "classes": classes}



# ---- report inputs ----

def both_class_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    # Both classes guaranteed, the rest random.
    y = rng.integers(0, 2, size=n)
    y[0], y[1] = 0, 1
    return y


def write_run(tmp_path, extractor, model, fold, test_ids, test_labels, signal, rng,
              n_val=8, val_aucs=(0.6, 0.8, 0.7)):
    """Write predictions_patients.csv and history.csv for one fold; return the run dict."""
    test_labels = np.asarray(test_labels)
    # Higher signal -> better separated probabilities -> higher AUC.
    test_prob = 1 / (1 + np.exp(-(signal * (test_labels - 0.5) + rng.normal(size=len(test_ids)))))
    val_labels = both_class_labels(n_val, rng)
    val_prob = rng.uniform(size=n_val)
    preds = pd.DataFrame({
        "patient_id": [f"v{fold}_{i}" for i in range(n_val)] + list(test_ids),
        "label": np.concatenate([val_labels, test_labels]),
        "partition": ["val"] * n_val + ["test"] * len(test_ids),
        "n_slides": rng.integers(1, 4, size=n_val + len(test_ids)),
        "prob": np.concatenate([val_prob, test_prob]),
    })
    # Shuffle rows so nothing depends on the file's order.
    preds = preds.sample(frac=1.0, random_state=int(rng.integers(1 << 30))).reset_index(drop=True)
    history = pd.DataFrame({
        "epoch": np.arange(len(val_aucs)),
        "train_loss": np.linspace(0.7, 0.4, len(val_aucs)),
        "val_loss": np.linspace(0.7, 0.5, len(val_aucs)),
        "val_auc": val_aucs,
        "lr": 1e-4,
    })
    folder = tmp_path / "runs" / extractor / model / str(fold)
    folder.mkdir(parents=True, exist_ok=True)
    preds.to_csv(folder / "predictions_patients.csv", index=False)
    history.to_csv(folder / "history.csv", index=False)
    return {
        "extractor": extractor,
        "model": model,
        "fold": fold,
        "predictions": str(folder / "predictions_patients.csv"),
        "history": str(folder / "history.csv"),
    }


def shared_runs(tmp_path, extractor, model, n_folds, n_test, signal, seed):
    """Folds of one model scored on the same test patients (the normal split design)."""
    rng = np.random.default_rng(seed)
    ids = [f"p{i:04d}" for i in range(n_test)]
    labels = both_class_labels(n_test, rng)
    return [write_run(tmp_path, extractor, model, k, ids, labels, signal, rng) for k in range(n_folds)]


def test_rows(run) -> pd.DataFrame:
    frame = pd.read_csv(run["predictions"], dtype={"patient_id": str})
    return frame[frame["partition"] == "test"]



test_rows.__test__ = False  # a helper, not a test


# ---- odd slide files (issue 21): OME-TIFF, plain TIFF, placeholder resolutions, false colours ----


def he_pixels(width: int = 1024, height: int = 768, seed: int = 3, tissue: bool = True) -> np.ndarray:
    """An (height, width, 3) uint8 H&E-like image (the demo's renderer)."""
    from slidemil.demo.render import render_slide

    rgb, _, _ = render_slide(f"odd{seed}", 1, seed, (width, height), (0.1, 0.3), tissue)
    return rgb


def write_ome_tiff(path, rgb: np.ndarray, mpp: float = 0.5, unit: str = "µm", levels: int = 2) -> Path:
    """A tiled, JPEG OME-TIFF pyramid in SubIFDs with PhysicalSizeX/Y, as QuPath and bfconvert write them."""
    import tifffile

    size = mpp * {"µm": 1.0, "nm": 1000.0, "mm": 1e-3}[unit]
    meta = {"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeXUnit": unit,
            "PhysicalSizeY": size, "PhysicalSizeYUnit": unit}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(rgb, tile=(256, 256), subifds=levels - 1, photometric="rgb", compression="jpeg", metadata=meta)
        for k in range(1, levels):
            tw.write(np.ascontiguousarray(rgb[::4 ** k, ::4 ** k]), tile=(256, 256), subfiletype=1,
                     photometric="rgb", compression="jpeg")
    return Path(path)


def write_plain_tiff(path, rgb: np.ndarray, dpi: float | None = None, mpp: float | None = None,
                     tiled: bool = False, rowsperstrip: int | None = 64, photometric: str = "rgb") -> Path:
    """An untiled (strips) or tiled TIFF, one level, with a resolution in dots per inch (``dpi``, e.g. the
    72 dpi placeholder) or in microns per pixel (``mpp``, written per centimetre), or none."""
    import tifffile

    kwargs = {}
    if dpi is not None:
        kwargs = {"resolution": (dpi, dpi), "resolutionunit": "INCH"}
    elif mpp is not None:
        kwargs = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    layout = {"tile": (256, 256)} if tiled else {"rowsperstrip": rowsperstrip}
    tifffile.imwrite(path, rgb, photometric=photometric, metadata=None, **layout, **kwargs)
    return Path(path)


def ycbcr_as_rgb(rgb: np.ndarray) -> np.ndarray:
    """The image's YCbCr values stored as if they were RGB: what a reader shows when a header declares RGB over
    YCbCr frames (white becomes 255, 128, 128)."""
    import cv2

    ycrcb = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)
    return np.ascontiguousarray(ycrcb[..., [0, 2, 1]])


def write_dicom_wsi(folder, rgb: np.ndarray, mpp: float = 0.5, tile: int = 256, photometric: str = "YBR_FULL_422",
                    levels: int = 2) -> Path:
    """A DICOM WSI series (VL Whole Slide Microscopy, TILED_FULL, JPEG baseline frames), one file per level, as a
    folder. ``photometric="RGB"`` declares RGB over the YCbCr JPEG frames: the header error that false-colours
    a slide."""
    import cv2
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    for level in range(levels):
        img = np.ascontiguousarray(rgb[::2 ** level, ::2 ** level])
        h, w = img.shape[:2]
        frames = []
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                block = np.full((tile, tile, 3), 255, np.uint8)
                part = img[y:y + tile, x:x + tile]
                block[:part.shape[0], :part.shape[1]] = part
                frames.append(cv2.imencode(".jpg", block[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.6"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.Modality, ds.PatientID, ds.PatientName = "SM", "TEST", "TEST"
        ds.ImageType = ["ORIGINAL" if level == 0 else "DERIVED", "PRIMARY", "VOLUME", "NONE"]
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows, ds.TotalPixelMatrixFocalPlanes = w, h, 1
        ds.Columns, ds.Rows, ds.NumberOfFrames = tile, tile, len(frames)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, photometric, 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.NumberOfOpticalPaths = 1
        path_item = Dataset()
        path_item.OpticalPathIdentifier = "1"
        ds.OpticalPathSequence = [path_item]
        spacing = Dataset()
        spacing.PixelSpacing = [mpp * 2 ** level / 1000, mpp * 2 ** level / 1000]
        spacing.SliceThickness = 0.001
        shared = Dataset()
        shared.PixelMeasuresSequence = [spacing]
        ds.SharedFunctionalGroupsSequence = [shared]
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = rgb.shape[1] * mpp / 1000, rgb.shape[0] * mpp / 1000
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        ds.save_as(folder / f"level{level}.dcm", enforce_file_format=True)
    return folder


def write_planar_tiff(path, rgb: np.ndarray, mpp: float = 0.5, ome: bool = False) -> Path:
    """A tiled TIFF whose colour samples lie in separate planes: one page in planar configuration 2, or with
    ``ome`` an OME "CYX" series of one gray page per channel (as Bio-Formats writes some exports)."""
    import tifffile

    planes = np.ascontiguousarray(np.moveaxis(rgb, -1, 0))
    if ome:
        tifffile.imwrite(path, planes, photometric="minisblack", tile=(256, 256), ome=True,
                         metadata={"axes": "CYX", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp})
    else:
        tifffile.imwrite(path, planes, photometric="rgb", planarconfig="separate", tile=(256, 256),
                         resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", metadata=None)
    return Path(path)


def make_odd_files_cohort(folder: Path, dicom: bool = True) -> Path:
    """Eight demo slides plus an OME-TIFF, a 72-dpi TIFF, a false-colour TIFF and (``dicom``, pydicom needed)
    a DICOM WSI folder, in a sample sheet; returns the sheet."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(8):
        make_slide(str(folder / f"s{i}.tiff"), label=i % 2, seed=i, slide_px=(768, 768))
        rows.append((f"S{i}", f"P{i}", f"s{i}.tiff", i % 2))
    write_ome_tiff(folder / "qupath.ome.tif", he_pixels(768, 768, seed=12), mpp=0.5)
    write_plain_tiff(folder / "scan72.tif", he_pixels(768, 768, seed=13), dpi=72)
    write_plain_tiff(folder / "false.tif", ycbcr_as_rgb(he_pixels(768, 768, seed=14)), mpp=0.5)
    rows += [("OME", "P9", "qupath.ome.tif", 1), ("DPI72", "P10", "scan72.tif", 0), ("FALSE", "P11", "false.tif", 1)]
    if dicom:
        write_dicom_wsi(folder / "dicom_series", he_pixels(768, 768, seed=11), mpp=0.5)
        rows.append(("DCM", "P8", "dicom_series", 0))
    sheet = folder / "samples.csv"
    pd.DataFrame(rows, columns=["slide_id", "patient_id", "path", "label"]).to_csv(sheet, index=False)
    return sheet


# ---- deploy (issue 24): trained fold models and a new cohort's bags ----

def train_two_folds(root: Path, model: str = "abmil") -> list[str]:
    """write_dataset under ``root`` and ``model`` trained on its folds 0 and 1; the two model.pt paths."""
    from slidemil.mil.train import Recipe, train_fold

    data = write_dataset(root)
    paths = []
    for fold in (0, 1):
        out = root / "runs" / model / f"fold_{fold}"
        train_fold(data["features"], data["splits"], fold, Recipe(model, MODEL_KWARGS, FAST, seed=0), str(out),
                   device="cpu")
        paths.append(str(out / "model.pt"))
    return paths


def direct_probability(checkpoint, features: np.ndarray) -> float:
    """P(class 1) of a bag from a model.pt rebuilt by hand (torch.load, create_model, its standardisation)."""
    import torch

    from slidemil.mil.models import create_model

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = create_model(ckpt["model"], in_dim=ckpt["in_dim"], n_classes=2, **ckpt["model_kwargs"]).eval()
    model.load_state_dict(ckpt["state_dict"])
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    if ckpt.get("feature_mean") is not None:
        x = (x - ckpt["feature_mean"]) / ckpt["feature_std"]
    with torch.no_grad():
        return float(torch.softmax(model(x[None], None)["logits"].float(), dim=1)[0, 1])


def write_deploy_cohort(root: Path, n_patients: int = 12, seed: int = 5, empty: str | None = None,
                        prefix: str = "N") -> dict:
    """A new labelled cohort of bags (make_bag) under ``root``: feature files, their manifest and a sheet
    (slide_id, patient_id, path, label); every third patient has two slides. ``empty``: a slide id whose
    feature file has no tiles (an excluded slide); ``prefix`` starts every slide and patient id."""
    from slidemil.cohort.manifest import feature_manifest

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows, paths = [], []
    for patient in range(n_patients):
        label = patient % 2
        for k in range(2 if patient % 3 == 0 else 1):
            slide = f"{prefix}{patient:02d}_{k}"
            feats = make_bag(rng, label)[:0] if slide == empty else make_bag(rng, label)
            path = root / f"{slide}.h5"
            write_h5(path, {"features": feats, "coords": np.zeros((len(feats), 2), dtype=np.int64)},
                     {"excluded": "no tissue tiles"} if slide == empty else {})
            rows.append({"slide_id": slide, "patient_id": f"{prefix}P{patient:02d}", "path": str(path), "label": label})
            paths.append(str(path))
    feature_manifest(paths, root / "manifest.csv")
    sheet = pd.DataFrame(rows)
    sheet.to_csv(root / "sheet.csv", index=False)
    return {"sheet": root / "sheet.csv", "manifest": root / "manifest.csv", "table": sheet}


def untrained_checkpoint(path: Path, in_dim: int, model: str = "abmil", seed: int = 0) -> str:
    """A model.pt of a seeded, untrained ``model`` (no standardisation): what deploying needs, without training."""
    import torch

    from slidemil.files.checkpoint import write_checkpoint
    from slidemil.mil.models import create_model

    torch.manual_seed(seed)
    net = create_model(model, in_dim=in_dim, n_classes=2, **MODEL_KWARGS)
    write_checkpoint(path, {"state_dict": net.state_dict(), "model": model, "model_kwargs": MODEL_KWARGS,
                            "in_dim": in_dim, "n_classes": 2, "fold": 0, "feature_mean": None, "feature_std": None})
    return str(path)


# ---- endpoints beyond binary (issue 23): bags with a planted signal per task ----

TASK_CLASSES = ("fox", "other", "tiger")  # class names, not numbers: their index order is alphabetical


def task_cohort(task: str, n_patients: int = 36, seed: int = 0) -> tuple[dict, pd.DataFrame]:
    """Bags (slide_id -> N x DIM float32) and a sheet (slide_id, patient_id, and label or time/event) of
    ``n_patients`` (every fourth has two slides) with a signal a MIL model can learn:

    - multiclass: class k shifts 3-5 instances by 6 sd along axis k (3 classes, equally many patients);
    - regression: the target y in [0, 4) shifts 4 instances by 2 y sd along axis 0;
    - survival: risk r in [0, 1) shifts 4 instances by 8 r along axis 0; time = exp(-3 r + 0.3 N(0, 1)),
      censored (event 0) at a uniform time in [0, 1.5) (about a quarter of the patients);
    - binary: as make_bag.
    """
    rng = np.random.default_rng(seed)
    bags, rows = {}, []
    for p in range(n_patients):
        row = {"patient_id": f"P{p:02d}"}
        if task == "multiclass":
            row["label"], shift, axis = TASK_CLASSES[p % 3], 6.0, p % 3
        elif task == "regression":
            y = float(rng.uniform(0, 4))
            row["label"], shift, axis = round(y, 4), 2 * y, 0
        elif task == "survival":
            r = float(rng.uniform(0, 1))
            time, censor = np.exp(-3 * r + 0.3 * rng.normal()), rng.uniform(0, 1.5)
            row["time"], row["event"] = round(float(min(time, censor)), 5), int(time <= censor)
            shift, axis = 8 * r, 0
        else:
            row["label"], shift, axis = p % 2, 6.0 * (p % 2), 0
        for k in range(2 if p % 4 == 0 else 1):
            slide = f"S{p:02d}_{k}"
            n = int(rng.integers(10, 31))
            feats = rng.normal(size=(n, DIM)).astype(np.float32)
            feats[rng.choice(n, size=4, replace=False), axis] += shift
            bags[slide] = feats
            rows.append({"slide_id": slide, **row})
    return bags, pd.DataFrame(rows)


def write_task_cohort(folder: Path, task: str, n_patients: int = 36, seed: int = 0) -> Path:
    """task_cohort as a precomputed-features cohort: one .h5 per slide and samples.csv (path: the .h5)."""
    folder.mkdir(parents=True, exist_ok=True)
    bags, sheet = task_cohort(task, n_patients, seed)
    for slide, feats in bags.items():
        write_h5(folder / f"{slide}.h5", {"features": feats, "coords": np.zeros((len(feats), 2), dtype=np.int64)}, {})
    sheet.insert(2, "path", [f"{s}.h5" for s in sheet["slide_id"]])
    sheet.to_csv(folder / "samples.csv", index=False)
    return folder / "samples.csv"


def task_splits(task: str, n_test: int = 12, seed: int = 0) -> pd.DataFrame:
    """A splits.csv table of ``task`` (splits.csv's columns for it) with ``n_test`` test slides S00.. in fold 0 and
    two training slides; labels as the task writes them (multiclass: indices of TASK_CLASSES, names in
    label_value; survival: the event, with a time)."""
    rng = np.random.default_rng(seed)
    n = n_test + 2
    frame = pd.DataFrame({"slide_id": [f"S{i:02d}" for i in range(n)], "patient_id": [f"P{i:02d}" for i in range(n)],
                          "fold_0": ["test"] * n_test + ["train", "val"]})
    if task == "multiclass":
        frame["label"] = np.arange(n) % 3
        frame["label_value"] = [TASK_CLASSES[k] for k in frame["label"]]
    elif task == "survival":
        frame["label"] = np.arange(n) % 2
        frame["time"] = np.round(rng.uniform(1, 50, n), 1)
    elif task == "regression":
        frame["label"] = np.round(rng.normal(50, 20, n), 2)
    else:
        frame["label"] = np.arange(n) % 2
    return frame.assign(label_value=frame.get("label_value", frame["label"]), task=task)


def write_task_run(folder: Path, task: str, model: str, fold: int, n_test: int = 30, signal: float = 2.0,
                   seed: int = 0) -> dict:
    """predictions_patients.csv and history.csv of one fold of a multiclass, survival or regression run whose
    outputs follow the truth with ``signal`` (the same test patients for every fold and model); the run dict."""
    rng = np.random.default_rng(seed)
    truth = np.random.default_rng(99)  # the patients' truth, shared by every run
    frame = pd.DataFrame({"patient_id": [f"p{i:03d}" for i in range(n_test)], "partition": "test", "n_slides": 1})
    if task == "multiclass":
        frame["label"] = np.arange(n_test) % 3
        logits = signal * np.eye(3)[frame["label"]] + rng.normal(size=(n_test, 3))
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        for k in range(3):
            frame[f"prob_{k}"] = probs[:, k]
    elif task == "survival":
        frame["label"] = (truth.uniform(size=n_test) < 0.7).astype(int)
        frame["time"] = truth.exponential(size=n_test)
        frame["risk"] = -signal * frame["time"] + rng.normal(size=n_test)
        train = frame.assign(partition="train", patient_id=[f"t{i:03d}" for i in range(n_test)])
        frame = pd.concat([frame, train.assign(risk=rng.normal(size=n_test))], ignore_index=True)
        frame = frame[["patient_id", "label", "time", "partition", "n_slides", "risk"]]
    else:
        frame["label"] = truth.normal(size=n_test)
        frame["pred"] = frame["label"] * signal / 2 + rng.normal(size=n_test)
    out = folder / model / f"fold_{fold}"
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "predictions_patients.csv", index=False)
    metric = {"multiclass": "val_macro_auc", "survival": "val_c_index", "regression": "val_r2"}[task]
    pd.DataFrame({"epoch": [1, 2], "train_loss": [1.0, 0.8], "val_loss": [1.0, 0.9], metric: [0.5, 0.7],
                  "lr": 1e-4}).to_csv(out / "history.csv", index=False)
    return {"extractor": "feats", "model": model, "fold": fold, "predictions": str(out / "predictions_patients.csv"),
            "history": str(out / "history.csv")}



# ---- deploy for every task (issue 24 on issue 23's endpoints) ----

def task_feature_files(root: Path, task: str, n_patients: int = 24) -> dict[str, str]:
    """task_cohort's bags as feature files under ``root`` and ``root/splits.csv`` with two folds (seed 0);
    returns slide_id -> feature file."""
    from slidemil.cohort.sheet import Endpoint
    from slidemil.cohort.splits import make_splits
    from slidemil.config import Splits

    root.mkdir(parents=True, exist_ok=True)
    bags, sheet = task_cohort(task, n_patients)
    features = {}
    for slide, feats in bags.items():
        features[slide] = str(root / f"{slide}.h5")
        write_h5(features[slide], {"features": feats, "coords": np.zeros((len(feats), 2), np.int64)}, {})
    splits = make_splits(sheet.assign(path="x"), Splits(folds=2), seed=0, endpoint=Endpoint(task, 2))
    splits.to_csv(root / "splits.csv", index=False)
    return features


def train_task_folds(root: Path, task: str, model: str = "abmil", n_patients: int = 24) -> dict:
    """task_feature_files under ``root`` and ``model`` trained on both folds: the model.pt paths and the
    training runs' predictions_patients.csv."""
    from slidemil.mil.train import Recipe, train_fold

    features = task_feature_files(root, task, n_patients)
    checkpoints, predictions = [], []
    for fold in (0, 1):
        out = root / "runs" / model / f"fold_{fold}"
        train_fold(features, str(root / "splits.csv"), fold, Recipe(model, MODEL_KWARGS, FAST, seed=0), str(out),
                   device="cpu")
        checkpoints.append(str(out / "model.pt"))
        predictions.append(str(out / "predictions_patients.csv"))
    return {"checkpoints": checkpoints, "predictions": predictions}


def write_task_deploy_cohort(root: Path, task: str, n_patients: int = 15, seed: int = 7,
                             labelled: bool = True) -> dict:
    """A new cohort of task_cohort bags (ids prefixed N) under ``root``: feature files, their manifest and a
    sheet (slide_id, patient_id, path and, when ``labelled``, the task's outcome columns)."""
    from slidemil.cohort.manifest import feature_manifest

    root.mkdir(parents=True, exist_ok=True)
    bags, sheet = task_cohort(task, n_patients, seed)
    sheet["slide_id"], sheet["patient_id"] = "N" + sheet["slide_id"], "N" + sheet["patient_id"]
    paths = []
    for slide, feats in zip(sheet["slide_id"], bags.values()):
        paths.append(str(root / f"{slide}.h5"))
        write_h5(paths[-1], {"features": feats, "coords": np.zeros((len(feats), 2), np.int64)}, {})
    sheet.insert(2, "path", paths)
    if not labelled:
        sheet = sheet[["slide_id", "patient_id", "path"]]
    feature_manifest(paths, root / "manifest.csv")
    sheet.to_csv(root / "sheet.csv", index=False)
    return {"sheet": root / "sheet.csv", "manifest": root / "manifest.csv", "table": sheet,
            "bags": dict(zip(sheet["slide_id"], bags.values()))}


def direct_outputs(checkpoint, features: np.ndarray) -> np.ndarray:
    """A bag's outputs from a model.pt rebuilt by hand, written out per task: class probabilities (softmax),
    risk (minus the sum of the discrete survival function) or the prediction in the target's units."""
    import torch

    from slidemil.mil.models import create_model

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = create_model(ckpt["model"], in_dim=ckpt["in_dim"], n_classes=ckpt["n_classes"],
                         **ckpt["model_kwargs"]).eval()
    model.load_state_dict(ckpt["state_dict"])
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    if ckpt.get("feature_mean") is not None:
        x = (x - ckpt["feature_mean"]) / ckpt["feature_std"]
    with torch.no_grad():
        logits = model(x[None], None)["logits"].float()[0].numpy().astype(np.float64)
    if ckpt["task"] == "survival":
        return np.array([-np.cumprod(1 - 1 / (1 + np.exp(-logits))).sum()])
    if ckpt["task"] == "regression":
        return logits[:1] * ckpt["target_std"] + ckpt["target_mean"]
    return np.exp(logits) / np.exp(logits).sum()

# ---- MIL benchmark files (issue 25) ----

def write_mil_npz(path, n_bags: int = 40, dim: int = 6, signal: float = 2.0, folds: tuple[int, int] | None = None,
                  seed: int = 0) -> Path:
    """A MIL ``.npz`` in the documented layout (../shared/data/README.md): positive bags hold one or more
    instances shifted by ``signal`` in the first dimension. ``folds`` (repetitions, k) adds
    ``cv_train_masks_5x10``; None leaves the folds to be drawn."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_bags) % 2
    sizes = rng.integers(2, 7, n_bags)
    index = np.repeat(np.arange(n_bags), sizes)
    feats = rng.normal(size=(len(index), dim))
    for b in np.flatnonzero(labels):
        members = np.flatnonzero(index == b)
        feats[members[: rng.integers(1, len(members) + 1)], 0] += signal
    arrays = {"features": feats, "bag_index": index, "bag_labels": labels}
    if folds is not None:
        reps, k = folds
        masks = np.ones((reps, k, n_bags), bool)
        for r in range(reps):
            masks[r, rng.permutation(np.arange(n_bags) % k), np.arange(n_bags)] = False
        arrays["cv_train_masks_5x10"] = masks
    np.savez(path, **arrays)
    return Path(path)
