"""The GPU path: each stage on CUDA agrees with the CPU, and what it writes loads on a machine without a GPU.

Skipped where there is no CUDA device (CI never has one); run it on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

import math

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from slidemil.pretrain import simclr, tile_supervised
from slidemil.mil import train
from slidemil.features.extract import extract_features
from slidemil.report.heatmap import load_checkpoint, tile_attention
from slidemil.files import read_h5
from factories import FAST, make_tiled_cohort, MODEL_KWARGS, write_dataset


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the GPU path is tested only where there is one")


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Six small slides, tiled, with splits: 2 train, 2 val, 2 test (fold 0)."""
    return make_tiled_cohort(tmp_path_factory.mktemp("cuda"), ["train", "train", "val", "val", "test", "test"])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("extractor, input_px", [("shufflenet_v2", 96), ("resnet50_trunc", 224)])
def test_features_on_cuda_match_the_cpu(slides, extractor, input_px):
    d, slide, tiles = slides["dir"], slides["slides"]["S1"], slides["tiles"]["S1"]
    out = {}
    for name, device, precision, workers in [("cpu", "cpu", "fp32", 0), ("cuda_fp32", "cuda", "fp32", 2),
                                             ("cuda_auto", "cuda", "auto", 2), ("cuda_bf16", "cuda", "bf16", 2)]:
        path = d / f"{extractor}_{name}.h5"
        # Workers on CUDA: the pinned-memory, non-blocking copy path.
        extract_features(slide, tiles, str(path), extractor, "random", input_px=input_px, device=device,
                         precision=precision, batch_size=16, workers=workers)
        with h5py.File(path) as f:
            out[name] = f["features"][()].astype(np.float64)
    assert len(out["cpu"]) >= 4 and np.std(out["cpu"], axis=0).mean() > 0
    # fp32 differs from the CPU by summation order and cuDNN's TF32 convolutions only.
    assert cosine(out["cpu"], out["cuda_fp32"]).min() > 0.999
    assert cosine(out["cpu"], out["cuda_auto"]).min() > 0.99  # fp16 autocast
    assert cosine(out["cpu"], out["cuda_bf16"]).min() > 0.98
    assert all(np.isfinite(v).all() for v in out.values())


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("cuda_bags"))


@pytest.mark.parametrize("model", ["abmil", "transmil"])
def test_mil_trained_on_cuda_learns_and_predicts_the_same_on_a_cpu(bags, tmp_path, model):
    kwargs = MODEL_KWARGS if model == "abmil" else {}
    summary = train.train_fold(bags["features"], bags["splits"], 0, train.Recipe(model, kwargs, FAST, 0),
                               str(tmp_path), device="cuda", num_threads=1)
    assert summary["device"].startswith("cuda") and summary["test_auc"] >= 0.9
    # Every tensor of the checkpoint is on the CPU: it loads where there is no GPU (report, heatmaps).
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    tensors = [v for v in ckpt["state_dict"].values()] + [ckpt["feature_mean"], ckpt["feature_std"]]
    assert all(t.device.type == "cpu" for t in tensors)
    # The CUDA run's predictions (bf16 autocast) are what the CPU computes from the checkpoint in float32.
    net, ckpt = load_checkpoint(tmp_path / "model.pt", "cpu")
    slides_out = pd.read_csv(tmp_path / "predictions_slides.csv")
    for row in slides_out.itertuples():
        feats = read_h5(bags["features"][row.slide_id], ("features",))[0]["features"]
        _, prob = tile_attention(net, ckpt, feats, "cpu")
        assert prob == pytest.approx(row.prob, abs=0.03), row.slide_id


def test_mhim_on_cuda_starts_from_the_base_model(bags, tmp_path):
    base = tmp_path / "abmil"
    train.train_fold(bags["features"], bags["splits"], 0, train.Recipe("abmil", {}, {**FAST, "epochs": 3}, 0),
                     str(base), device="cuda", num_threads=1)
    summary = train.train_fold(bags["features"], bags["splits"], 0,
                               train.Recipe("mhim_abmil", {}, {**FAST, "epochs": 3}, 0), str(tmp_path / "mhim"),
                               device="cuda", num_threads=1, init_checkpoint=str(base / "model.pt"))
    assert summary["test_auc"] is not None and summary["device"].startswith("cuda")


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_simclr_on_cuda(slides, tmp_path, precision):
    settings = {"epochs": 2, "batch_size": 8, "tiles_per_slide": 8, "input_px": 48, "precision": precision}
    first = simclr.pretrain_simclr(slides["slides"], slides["tiles"], slides["splits"], str(tmp_path),
                                   settings={**settings, "epochs": 1}, seed=0, device="cuda", workers=2)
    # Resuming on the GPU restores the optimiser (and, for fp16, the loss scaler) from a CPU-mapped checkpoint.
    resumed = simclr.pretrain_simclr(slides["slides"], slides["tiles"], slides["splits"], str(tmp_path),
                                     settings=settings, seed=0, device="cuda", workers=2)
    assert first["device"].startswith("cuda") and resumed["first_epoch"] == 2
    assert all(math.isfinite(v) for v in resumed["epoch_loss"]) and len(resumed["epoch_loss"]) == 2
    backbone = torch.load(tmp_path / "backbone.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in backbone["state_dict"].values())


def test_tile_supervised_on_cuda(slides, tmp_path):
    settings = {"input_px": 48, "tiles_per_slide": 8, "eval_tiles_per_slide": 6, "epochs": 2, "batch_size": 16}
    summary = tile_supervised.train_tile_supervised(slides["slides"], slides["tiles"], slides["splits"], 0, settings,
                                                    0, str(tmp_path), device="cuda", workers=2)
    assert summary["device"].startswith("cuda") and 0 <= summary["val_auc"] <= 1
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in ckpt["state_dict"].values())
    slides_out = pd.read_csv(tmp_path / "predictions_slides.csv")
    assert sorted(slides_out["slide_id"]) == ["S2", "S3", "S4", "S5"] and slides_out["prob"].between(0, 1).all()


def test_precision_policy_on_this_gpu():
    from slidemil.runtime import resolve_precision

    dev = torch.device("cuda")
    native_bf16 = torch.cuda.get_device_capability(dev)[0] >= 8
    assert resolve_precision(dev, "auto", "inference").name == "fp16"  # feature files on CUDA: fp16, as always
    training = resolve_precision(dev, "auto", "training")
    assert (training.name, training.scaler) == (("bf16", False) if native_bf16 else ("fp16", True))
    assert training.grad_scaler(dev).is_enabled() == training.scaler
