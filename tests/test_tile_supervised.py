"""The tile-supervised baseline on tiny synthetic slides (CPU, seconds)."""

import pandas as pd
import pytest
import torch

from slidemil.pretrain import tile_supervised
from factories import make_tiled_cohort


def test_slide_score_is_fraction_of_positive_tiles():
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 0.5], [1.0, 0.0], [0.2, 0.1]])
    scores = tile_supervised.slide_scores(["a", "a", "a", "a", "b", "b"], logits)
    assert scores["a"] == pytest.approx(0.5) and scores["b"] == 0.0
    # It counts tiles, not probabilities: a confident positive tile weighs as much as a marginal one.
    assert tile_supervised.slide_scores(["c", "c"], torch.tensor([[0.0, 9.0], [0.1, 0.0]]))["c"] == 0.5


def test_settings_are_checked():
    with pytest.raises(ValueError, match="unknown tile_supervised setting"):
        tile_supervised.resolve_settings({"epoch": 1})
    with pytest.raises(ValueError, match="arch"):
        tile_supervised.resolve_settings({"arch": "vit"})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """8 one-slide patients: 4 train, 2 val, 2 test (one of each class each)."""
    parts = ["train", "train", "train", "train", "val", "val", "test", "test"]
    return make_tiled_cohort(tmp_path_factory.mktemp("tiles_sup"), parts)


def test_tiny_run_writes_standard_outputs(cohort, tmp_path):
    settings = {"input_px": 48, "tiles_per_slide": 8, "eval_tiles_per_slide": 6, "epochs": 2, "batch_size": 16,
                "lr": 1e-3}
    summary = tile_supervised.train_tile_supervised(cohort["slides"], cohort["tiles"], cohort["splits"], 0,
                                                    settings, 0, str(tmp_path), device="cpu", num_threads=1)
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history.columns) == ["epoch", "train_loss", "val_loss", "val_auc", "lr"]
    assert history["epoch"].tolist() == [1, 2] and history["val_auc"].between(0, 1).all()
    slides = pd.read_csv(tmp_path / "predictions_slides.csv")
    assert list(slides.columns) == ["slide_id", "patient_id", "label", "partition", "prob"]
    assert sorted(slides["slide_id"]) == ["S4", "S5", "S6", "S7"]
    # A slide's score is a fraction of its 6 evaluated tiles.
    assert ((slides["prob"] * 6).round(6) % 1 == 0).all()
    patients = pd.read_csv(tmp_path / "predictions_patients.csv")
    assert list(patients.columns) == ["patient_id", "label", "partition", "n_slides", "prob"]
    assert patients.set_index("patient_id")["prob"].to_dict() == slides.set_index("patient_id")["prob"].to_dict()
    checkpoint = torch.load(tmp_path / "model.pt", weights_only=True)
    assert checkpoint["epoch"] == summary["best_epoch"] and checkpoint["model"] == "tile_supervised"
    assert summary["train_tiles"] == 4 * 8
    assert summary["val_auc"] == pytest.approx(history["val_auc"].max())


def test_simclr_backbone_initialises_the_classifier(tmp_path):
    from slidemil.pretrain.simclr import SimCLRModel

    torch.manual_seed(3)
    backbone = SimCLRModel("shufflenet_v2").backbone
    torch.save({"state_dict": backbone.state_dict()}, tmp_path / "backbone.pt")
    model = tile_supervised.TileClassifier("shufflenet_v2", str(tmp_path / "backbone.pt"))
    for key, value in backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value)


def test_precision_setting_sets_the_autocast(cohort, tmp_path, monkeypatch):
    seen = []  # dtype of the classifier's logits in every forward pass, training and predictions

    class Recording(tile_supervised.TileClassifier):
        def forward(self, x):
            out = super().forward(x)
            seen.append(out.dtype)
            return out

    monkeypatch.setattr(tile_supervised, "TileClassifier", Recording)
    settings = {"input_px": 48, "tiles_per_slide": 8, "eval_tiles_per_slide": 6, "epochs": 1, "batch_size": 16}
    for precision, dtype in (("bf16", torch.bfloat16), ("auto", torch.float32)):
        seen.clear()
        summary = tile_supervised.train_tile_supervised(
            cohort["slides"], cohort["tiles"], cohort["splits"], 0, {**settings, "precision": precision}, 0,
            str(tmp_path / precision), device="cpu", num_threads=1)
        # 2 training batches, then the validation and the final predictions
        assert len(seen) >= 4 and set(seen) == {dtype}, precision
        assert 0 <= summary["val_auc"] <= 1
    with pytest.raises(ValueError, match="tile_supervised.precision must be one of auto, fp32, bf16, got 'fp16'"):
        tile_supervised.resolve_settings({"precision": "fp16"})
