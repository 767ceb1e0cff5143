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
from factories import TASK_CLASSES, task_splits  # noqa: E402

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


# What a checkpoint of each task records beyond its weights (slidemil.tasks' state()).
TASK_STATES = {
    "binary": {"task": "binary", "class_names": None},
    "multiclass": {"task": "multiclass", "class_names": ["fox", "other", "tiger"]},
    "survival": {"task": "survival", "class_names": None, "time_cuts": [3.0, 8.0, 20.0]},
    "regression": {"task": "regression", "class_names": None, "target_mean": 40.0, "target_std": 12.5},
}
HEADS = {"binary": 2, "multiclass": 3, "survival": 4, "regression": 1}


def save_checkpoint(path, model_name="abmil", kwargs=None, standardize=True, seed=0, task=None):
    torch.manual_seed(seed)
    kwargs = kwargs if kwargs is not None else {"embed_dim": 16, "attn_dim": 8, "dropout": 0.0}
    n_classes = HEADS[task or "binary"]
    net = create_model(model_name, in_dim=IN_DIM, n_classes=n_classes, **kwargs)
    mean = torch.full((IN_DIM,), 5.0) if standardize else None
    std = torch.full((IN_DIM,), 3.0) if standardize else None
    torch.save({"state_dict": net.state_dict(), "model": model_name, "model_kwargs": kwargs, "in_dim": IN_DIM,
                "n_classes": n_classes, "fold": 0, "feature_mean": mean, "feature_std": std,
                **(TASK_STATES[task] if task else {})}, path)
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
    assert result["score"] == pytest.approx(prob, abs=1e-6) and result["n_tiles"] == len(cohort["coords"])
    assert result["prediction"] == f"P(positive) {result['score']:.3f}"
    image = mpimg.imread(out)
    assert image.shape[1] == 1260 and image.shape[0] > 700
    assert image[..., :3].std() > 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.png", "model.pt"]  # atomic write, no leftovers


def direct_score(task, logits: torch.Tensor) -> tuple[float, str]:
    """A bag's score written out per task, and a part of the words its title must hold."""
    logits = logits[0].double()
    if task == "multiclass":
        probs = torch.softmax(logits, 0)
        k = int(probs.argmax())
        return float(probs[k]), f"predicted {TASK_STATES[task]['class_names'][k]} (P "
    if task == "survival":  # -sum_k S_k, S_k = prod_{j<=k} (1 - sigmoid(logit_j))
        return -float(torch.cumprod(1 - torch.sigmoid(logits), 0).sum()), "risk "
    if task == "regression":  # back in the target's units
        return float(logits[0]) * 12.5 + 40.0, "predicted "
    return float(torch.softmax(logits, 0)[1]), "P(positive) "


@pytest.mark.parametrize("task", ["binary", "multiclass", "survival", "regression"])
def test_each_tasks_heatmap_draws_the_same_attention_and_titles_its_score(cohort, tmp_path, task):
    net = save_checkpoint(tmp_path / "model.pt", task=task)
    result = heatmap.make_heatmap(cohort["slide"], cohort["feats"], tmp_path / "model.pt", tmp_path / "h.png",
                                  settings=heatmap.HeatmapSettings(top_k=3))
    x = (torch.from_numpy(cohort["features"]) - 5.0) / 3.0
    with torch.no_grad():
        out = net(x[None], None)
    score, words = direct_score(task, out["logits"])
    assert result.score == pytest.approx(score, rel=1e-5, abs=1e-6)
    assert result.prediction.startswith(words) and f"{score:.3f}"[:4] in result.prediction
    # The map is the model's attention whatever the task: the same tiles on top as its forward pass ranks them.
    order = np.argsort(-out["attention"][0].numpy())[:3]
    assert [(t["x"], t["y"]) for t in result.top] == [tuple(cohort["coords"][i]) for i in order]
    assert mpimg.imread(tmp_path / "h.png")[..., :3].std() > 0.05


@pytest.mark.parametrize("task", ["binary", "multiclass", "survival", "regression"])
def test_heatmap_slides_cycle_through_each_tasks_groups(task):
    from slidemil.report.model_heatmaps import pick_heatmap_slides
    from slidemil.tasks import make_task

    splits = task_splits(task, n_test=12)
    names = list(TASK_CLASSES) if task == "multiclass" else None
    usable = set(splits["slide_id"]) - {"S00"}
    picked = pick_heatmap_slides(splits, 0, usable, 4, seed=3, task=make_task(task, names))
    rows = splits.set_index("slide_id").loc[[s for s, _ in picked]]
    assert len(picked) == 4 and len(set(rows.index)) == 4 and set(rows["fold_0"]) == {"test"}
    assert "S00" not in rows.index
    labels = [label for _, label in picked]
    if task == "multiclass":  # one of each class in index order, then the first again
        assert labels == ["fox", "other", "tiger", "fox"] and list(rows["label_value"]) == labels
    elif task == "regression":  # above, below, above, below the test slides' median
        median = splits.loc[splits["slide_id"].isin(usable) & (splits["fold_0"] == "test"), "label"].median()
        assert [y > median for y in labels] == [True, False, True, False] and labels == list(rows["label"])
    elif task == "survival":  # event, censored, ..., each with its time
        assert labels == [f"{w} at {t:g}" for w, t in zip(["event", "censored"] * 2, rows["time"])]
    else:
        assert labels == [1, 0, 1, 0] and labels == list(rows["label"])
    # Another seed draws other slides of the same groups.
    again = pick_heatmap_slides(splits, 0, usable, 4, seed=4, task=make_task(task, names))
    assert [s for s, _ in again] != [s for s, _ in picked]


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
