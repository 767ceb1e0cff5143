import h5py
import numpy as np
import pytest
import torch

from slidemil.demo import make_slide
from slidemil.extractors import create_extractor, get_spec, list_extractors
from slidemil.features import extract_features
from slidemil.tiling import tile_slide


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    d = tmp_path_factory.mktemp("feat")
    slide = d / "s.tiff"
    make_slide(str(slide), label=1, seed=3, slide_px=(1536, 1536))
    tile_slide(str(slide), str(d / "tiles.h5"), None, {"tile_px": 128, "mpp": 1.0})
    with h5py.File(d / "tiles.h5") as f:
        n = len(f["coords"])
    assert n >= 4
    return d, slide


@pytest.mark.parametrize("name", list_extractors())
def test_registry_dims(name):
    model, digest = create_extractor(name, "random", seed=0)
    with torch.inference_mode():
        out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, get_spec(name).dim) and torch.isfinite(out).all()
    assert create_extractor(name, "random", seed=0)[1] == digest     # seeded: same network
    assert create_extractor(name, "random", seed=1)[1] != digest


def test_features_file_deterministic_and_batch_independent(tiled):
    d, slide = tiled
    a = d / "a.h5"
    b = d / "b.h5"
    extract_features(str(slide), str(d / "tiles.h5"), str(a), "shufflenet_v2", "random", input_px=96,
                     batch_size=3, workers=0)
    extract_features(str(slide), str(d / "tiles.h5"), str(b), "shufflenet_v2", "random", input_px=96,
                     batch_size=16, workers=2)
    with h5py.File(a) as fa, h5py.File(b) as fb, h5py.File(d / "tiles.h5") as ft:
        assert fa["features"].shape == (len(ft["coords"]), 1024)
        np.testing.assert_array_equal(fa["coords"][()], ft["coords"][()])
        np.testing.assert_allclose(fa["features"][()], fb["features"][()], rtol=1e-4, atol=1e-5)
        assert fa.attrs["extractor"] == "shufflenet_v2"
        assert fa.attrs["weights_digest"] == create_extractor("shufflenet_v2", "random", 0)[1]
        assert fa.attrs["tile_px"] == 128 and fa.attrs["target_mpp"] == 1.0
        # Different tiles give different features (the tiles are really read).
        assert np.std(fa["features"][()], axis=0).mean() > 0


def test_local_weights_file(tiled, tmp_path):
    model, digest = create_extractor("shufflenet_v2", "random", seed=5)
    truncated = tmp_path / "trunc.pt"
    torch.save(model.state_dict(), truncated)
    assert create_extractor("shufflenet_v2", str(truncated))[1] == digest
    # A full torchvision state dict under a "state_dict" key with a DataParallel prefix also loads.
    import torchvision
    from slidemil.extractors import variance_preserving_init
    torch.manual_seed(5)
    full = variance_preserving_init(torchvision.models.shufflenet_v2_x1_0(weights=None))
    wrapped = tmp_path / "full.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}}, wrapped)
    assert create_extractor("shufflenet_v2", str(wrapped))[1] == digest
    wrong = tmp_path / "wrong.pt"
    torch.save({"foo.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match="does not fit shufflenet_v2"):
        create_extractor("shufflenet_v2", str(wrong))
    with pytest.raises(FileNotFoundError, match="not found"):
        create_extractor("shufflenet_v2", str(tmp_path / "none.pt"))


def test_empty_tiles_give_empty_features(tmp_path):
    slide = tmp_path / "blank.tiff"
    make_slide(str(slide), label=0, seed=1, slide_px=(1024, 1024), tissue=False)
    tile_slide(str(slide), str(tmp_path / "t.h5"), None, {}, on_error="exclude")
    out = tmp_path / "f.h5"
    extract_features(str(slide), str(tmp_path / "t.h5"), str(out), "resnet50_trunc", "random")
    with h5py.File(out) as f:
        assert f["features"].shape == (0, 1024) and f["coords"].shape == (0, 2)


def test_loader_workers_run_opencv_single_threaded_and_the_setting_comes_back():
    import cv2

    from slidemil.slides import one_opencv_thread

    before = cv2.getNumThreads()
    cv2.setNumThreads(2)
    try:
        with pytest.raises(RuntimeError):
            with one_opencv_thread():
                assert cv2.getNumThreads() == 1
                raise RuntimeError("a failing slide")
        assert cv2.getNumThreads() == 2
    finally:
        cv2.setNumThreads(before)
