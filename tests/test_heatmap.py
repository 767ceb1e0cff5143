"""Attention heatmaps on a tiny synthetic pyramidal slide and a real AB-MIL checkpoint."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib import colormaps  # noqa: E402

from slidemil.report import heatmap  # noqa: E402
from slidemil.demo.render import write_pyramidal_tiff  # noqa: E402
from slidemil.files import write_h5  # noqa: E402
from slidemil.mil.models import create_model  # noqa: E402
from slidemil.slides.reader import open_slide  # noqa: E402

W, H, SIZE0, IN_DIM = 2048, 1536, 256, 6


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A 2048 x 1536 slide (two levels): pink tissue, one blue tile at a known place, tiles and features."""
    root = tmp_path_factory.mktemp("heat")
    rgb = np.full((H, W, 3), 245, np.uint8)
    rgb[256:1280, 256:1792] = (220, 120, 170)
    blue = (768, 512)  # level-0 x, y of the marked tile
    rgb[blue[1]:blue[1] + SIZE0, blue[0]:blue[0] + SIZE0] = (40, 60, 200)
    slide = root / "S1.tiff"
    write_pyramidal_tiff(slide, rgb, mpp=0.5, objective_power=20, n_levels=2, downsample=4)
    xs, ys = np.meshgrid(np.arange(256, 1792, SIZE0), np.arange(256, 1280, SIZE0))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)
    rng = np.random.default_rng(0)
    features = (rng.normal(size=(len(coords), IN_DIM)) * 3 + 5).astype(np.float32)
    attrs = {"tile_size_level0": SIZE0, "level": 0, "read_px": SIZE0, "tile_px": SIZE0}
    write_h5(root / "S1_tiles.h5", {"coords": coords}, attrs)
    write_h5(root / "S1_feats.h5", {"features": features, "coords": coords}, attrs)
    return {"root": root, "slide": slide, "coords": coords, "features": features, "blue": blue,
            "tiles": root / "S1_tiles.h5", "feats": root / "S1_feats.h5"}


def save_checkpoint(path, model_name="abmil", kwargs=None, standardize=True, seed=0):
    torch.manual_seed(seed)
    kwargs = kwargs if kwargs is not None else {"embed_dim": 16, "attn_dim": 8, "dropout": 0.0}
    net = create_model(model_name, in_dim=IN_DIM, n_classes=2, **kwargs)
    mean = torch.full((IN_DIM,), 5.0) if standardize else None
    std = torch.full((IN_DIM,), 3.0) if standardize else None
    torch.save({"state_dict": net.state_dict(), "model": model_name, "model_kwargs": kwargs, "in_dim": IN_DIM,
                "n_classes": 2, "fold": 0, "feature_mean": mean, "feature_std": std}, path)
    return net.eval()


def direct_attention(net, features, standardize=True):
    x = torch.from_numpy(features)
    if standardize:
        x = (x - 5.0) / 3.0
    with torch.no_grad():
        out = net(x[None], None)
    return out["attention"][0].numpy(), torch.softmax(out["logits"], 1)[0, 1].item()


def test_attention_is_the_models_forward_on_standardised_features(cohort, tmp_path):
    net = save_checkpoint(tmp_path / "model.pt")
    model, ckpt = heatmap.load_checkpoint(tmp_path / "model.pt")
    attention, prob = heatmap.tile_attention(model, ckpt, cohort["features"])
    expected, expected_prob = direct_attention(net, cohort["features"])
    np.testing.assert_allclose(attention, expected, rtol=1e-5, atol=1e-8)
    assert prob == pytest.approx(expected_prob, abs=1e-6)
    assert attention.sum() == pytest.approx(1.0, abs=1e-5)
    # Without standardisation the attention would differ: the checkpoint's statistics are really used.
    raw, _ = direct_attention(net, cohort["features"], standardize=False)
    assert np.abs(raw - attention).max() > 1e-3


def test_canvas_puts_each_tiles_value_on_its_footprint(cohort):
    coords, n = cohort["coords"], len(cohort["coords"])
    values = np.arange(1, n + 1, dtype=np.float32) / n
    scale = 1024 / W
    canvas = heatmap.attention_canvas(coords, SIZE0, values, (int(H * scale), int(W * scale)), scale)
    for (x, y), v in zip(coords, values):
        block = canvas[int(y * scale):int((y + SIZE0) * scale), int(x * scale):int((x + SIZE0) * scale)]
        assert block.size == (SIZE0 * scale) ** 2 and np.all(block == v)
    # Outside the tiled region nothing is painted; inside, every pixel belongs to a tile.
    assert np.isnan(canvas[: int(256 * scale)]).all() and np.isnan(canvas[:, int(1792 * scale):]).all()
    assert not np.isnan(canvas[int(256 * scale):int(1280 * scale), int(256 * scale):int(1792 * scale)]).any()
    # The blend puts the colour of the value where the tile is, the thumbnail elsewhere.
    thumb = np.full(canvas.shape + (3,), 200, np.uint8)
    image = heatmap.overlay(thumb, canvas, alpha=0.5)
    last = coords[-1]
    cy, cx = int((last[1] + SIZE0 / 2) * scale), int((last[0] + SIZE0 / 2) * scale)
    expected = 0.5 * 200 + 0.5 * np.array(colormaps[heatmap.COLORMAP](1.0)[:3]) * 255
    np.testing.assert_allclose(image[cy, cx], expected, atol=1)
    assert (image[0, 0] == 200).all()


def test_percentiles_rank_tiles():
    p = heatmap.attention_percentiles(np.array([0.1, 0.5, 0.2, 0.2]))
    np.testing.assert_allclose(p, [0.25, 1.0, 0.625, 0.625])


def test_crop_reads_the_tile_at_its_level0_coordinates(cohort):
    slide = open_slide(cohort["slide"])
    crop = heatmap._tile_crop(slide, cohort["slide"], cohort["blue"], 0, SIZE0, SIZE0)
    next_tile = heatmap._tile_crop(slide, cohort["slide"], (cohort["blue"][0] + SIZE0, cohort["blue"][1]), 0,
                                   SIZE0, SIZE0)
    # From the coarser level (4x downsampled) the same tile is read too.
    coarse = heatmap._tile_crop(slide, cohort["slide"], cohort["blue"], 1, SIZE0 // 4, SIZE0)
    slide.close()
    assert crop.shape == (heatmap.CROP_PX, heatmap.CROP_PX, 3)
    for image in (crop, coarse):
        centre = image[40:-40, 40:-40].reshape(-1, 3).mean(0)
        assert centre[2] > 150 and centre[0] < 90  # blue
    assert next_tile.reshape(-1, 3).mean(0)[0] > 180  # pink


def test_cli_writes_heatmap_and_lists_top_tiles(cohort, tmp_path, capsys):
    net = save_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "heat.png"
    assert heatmap.main(["--slide", str(cohort["slide"]), "--tiles", str(cohort["tiles"]),
                         "--features", str(cohort["feats"]), "--checkpoint", str(tmp_path / "model.pt"),
                         "--out", str(out), "--top-k", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected, prob = direct_attention(net, cohort["features"])
    order = np.argsort(-expected)[:5]
    assert [(t["x"], t["y"]) for t in result["top"]] == [tuple(cohort["coords"][i]) for i in order]
    assert [t["rank"] for t in result["top"]] == [1, 2, 3, 4, 5]
    assert result["top"][0]["percentile"] == pytest.approx(1.0)
    assert result["prob"] == pytest.approx(prob, abs=1e-6) and result["n_tiles"] == len(cohort["coords"])
    image = mpimg.imread(out)
    assert image.shape[1] == 1260 and image.shape[0] > 700
    assert image[..., :3].std() > 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.png", "model.pt"]  # atomic write, no leftovers


def test_model_without_attention_is_skipped_with_note(cohort, tmp_path):
    save_checkpoint(tmp_path / "model.pt", "maxpool", kwargs={"embed_dim": 16})
    result = heatmap.make_heatmap(cohort["slide"], cohort["feats"], tmp_path / "model.pt", tmp_path / "h.png")
    assert result.png is None and "no instance attention" in result.note
    assert not (tmp_path / "h.png").exists()


def test_bad_inputs_name_the_file(cohort, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(heatmap.CheckpointError, match="junk.pt"):
        heatmap.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "partial.pt")
    with pytest.raises(heatmap.CheckpointError, match="partial.pt.*missing model"):
        heatmap.load_checkpoint(tmp_path / "partial.pt")
    save_checkpoint(tmp_path / "model.pt")
    empty = tmp_path / "empty.h5"
    write_h5(empty, {"features": np.zeros((0, IN_DIM), np.float32), "coords": np.zeros((0, 2), np.int64)},
             {"excluded": "no tissue"})
    with pytest.raises(ValueError, match="no tiles"):
        heatmap.make_heatmap(cohort["slide"], empty, tmp_path / "model.pt", tmp_path / "h.png")
    with pytest.raises(SystemExit, match="error: .*differ"):
        heatmap.main(["--slide", str(cohort["slide"]), "--tiles", str(empty), "--features", str(cohort["feats"]),
                      "--checkpoint", str(tmp_path / "model.pt"), "--out", str(tmp_path / "h.png")])
