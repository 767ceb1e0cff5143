import cv2
import h5py
import numpy as np
import pytest
import torch

from slidemil.demo.render import make_slide
from slidemil.features.extractors import create_extractor, get_spec, list_extractors
from slidemil.names import ENCODER_CARDS, TIMM_EXTRACTOR
from slidemil.features.extract import TileDataset, extract_features
from slidemil.slides.reader import decode_scale, open_slide, read_rgb, resize_tile
from slidemil.tiling.tile import tile_slide


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


# The CNNs; the foundation-model encoders (giants among them) are tested on the meta device in test_encoders.py.
@pytest.mark.parametrize("name", [n for n in list_extractors() if n not in ENCODER_CARDS and n != TIMM_EXTRACTOR])
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


def test_scaled_decoding_reads_nearly_the_same_tiles_and_features(tiled):
    # 256 px reads (level 0) for 48 px inputs: decoded at 1/4 scale (64 px), then resized, instead of 256 -> 48.
    d, slide = tiled
    with h5py.File(d / "tiles.h5") as f:
        coords, level, read_px = f["coords"][()], int(f.attrs["level"]), int(f.attrs["read_px"])
    scale = decode_scale(read_px, 48)
    assert (level, read_px, scale) == (0, 256, 4)
    fast = TileDataset(str(slide), coords, level, read_px, 48, scale)
    s = open_slide(slide)
    for i, (x, y) in enumerate(coords):
        # As if the scan had 1/4 of the pixels: area-averaged, then the same resize as for any slide.
        full = read_rgb(s, slide, (int(x), int(y)), level, (read_px, read_px))
        expected = resize_tile(cv2.resize(full, (64, 64), interpolation=cv2.INTER_AREA), 48).transpose(2, 0, 1)
        got = fast[i].numpy()
        assert got.shape == (3, 48, 48)
        assert np.abs(got.astype(int) - expected).mean() < 0.5, i
    out = {}
    for scaled in (True, False):
        out[scaled] = d / f"scaled-{scaled}.h5"
        extract_features(str(slide), str(d / "tiles.h5"), str(out[scaled]), "shufflenet_v2", "random",
                         input_px=48, scaled_decode=scaled)
    with h5py.File(out[True]) as fa, h5py.File(out[False]) as fb:
        assert fa.attrs["decode_scale"] == 4 and fb.attrs["decode_scale"] == 1
        a, b = fa["features"][()], fb["features"][()]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99 and not np.array_equal(a, b)


def test_local_weights_file(tiled, tmp_path):
    model, digest = create_extractor("shufflenet_v2", "random", seed=5)
    truncated = tmp_path / "trunc.pt"
    torch.save(model.state_dict(), truncated)
    assert create_extractor("shufflenet_v2", str(truncated))[1] == digest
    # A full torchvision state dict under a "state_dict" key with a DataParallel prefix also loads.
    import torchvision
    from slidemil.features.extractors import variance_preserving_init
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

    from slidemil.slides.reader import one_opencv_thread

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
