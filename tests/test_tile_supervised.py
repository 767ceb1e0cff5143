"""The tile-supervised baseline on tiny synthetic slides (CPU, seconds)."""

import numpy as np
import pandas as pd
import pytest
import torch

from slidemil.pretrain import tile_supervised
from slidemil.tasks import make_task, task_from_checkpoint
from factories import make_tiled_cohort

BINARY_TASK = make_task("binary")


def test_slide_score_is_fraction_of_positive_tiles():
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 0.5], [1.0, 0.0], [0.2, 0.1]])
    scores = tile_supervised.slide_outputs(BINARY_TASK, ["a", "a", "a", "a", "b", "b"], logits)
    assert list(scores.columns) == ["prob"]
    assert scores.loc["a", "prob"] == pytest.approx(0.5) and scores.loc["b", "prob"] == 0.0
    # It counts tiles, not probabilities: a confident positive tile weighs as much as a marginal one.
    one = tile_supervised.slide_outputs(BINARY_TASK, ["c", "c"], torch.tensor([[0.0, 9.0], [0.1, 0.0]]))
    assert one.loc["c", "prob"] == 0.5


def test_binary_score_is_bit_for_bit_the_positive_fraction():
    """The multiclass generalisation leaves binary as it was: the mean of (argmax == 1) per slide."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(997, 2, generator=generator)
    slides = [f"s{k % 13}" for k in range(997)]
    before = pd.Series((logits.argmax(dim=1) == 1).double().numpy()).groupby(pd.Series(slides)).mean()
    after = tile_supervised.slide_outputs(BINARY_TASK, slides, logits)["prob"]
    assert after.index.equals(before.index) and np.array_equal(after.to_numpy(), before.to_numpy())


def test_multiclass_slide_outputs_are_class_fractions_of_tiles():
    task = make_task("multiclass", ["a", "b", "c"])
    logits = torch.tensor([[3.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0], [0, 5.0, 0], [0, 0, 9.0], [0, 0.1, 0]])
    out = tile_supervised.slide_outputs(task, ["x", "x", "x", "x", "y", "y"], logits)
    assert list(out.columns) == ["prob_0", "prob_1", "prob_2"]
    assert out.loc["x"].tolist() == [0.25, 0.5, 0.25] and out.loc["y"].tolist() == [0.0, 0.5, 0.5]
    assert np.allclose(out.sum(axis=1), 1.0)


@pytest.mark.parametrize("task_name", ["survival", "regression"])
def test_tasks_other_than_classification_are_refused_with_one_line(tmp_path, task_name):
    rows = pd.DataFrame({"slide_id": ["a", "b"], "patient_id": ["p", "q"], "label": [0, 1], "label_value": [0, 1],
                         "time": [1.0, 2.0], "task": task_name, "fold_0": ["train", "val"]})
    rows.to_csv(tmp_path / "splits.csv", index=False)
    with pytest.raises(ValueError, match=rf"splits.csv: task {task_name}: tile_supervised classifies tiles, so it "
                                         r"learns binary or multiclass tasks only; train a MIL model") as err:
        tile_supervised.tile_task(str(tmp_path / "splits.csv"))
    assert "\n" not in str(err.value)


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
    assert checkpoint["task"] == "binary" and checkpoint["class_names"] is None and checkpoint["n_classes"] == 2
    assert task_from_checkpoint(checkpoint).name == "binary"
    assert summary["train_tiles"] == 4 * 8
    assert summary["val_auc"] == pytest.approx(history["val_auc"].max())


def test_binary_run_scores_slides_by_their_class_1_tiles(cohort, tmp_path, monkeypatch):
    """The written probabilities are the fractions of each slide's evaluated tiles whose argmax is class 1."""
    calls = []
    real = tile_supervised.slide_outputs

    def recording(task, tile_slides, tile_logits):
        calls.append((list(tile_slides), tile_logits.clone()))
        return real(task, tile_slides, tile_logits)

    monkeypatch.setattr(tile_supervised, "slide_outputs", recording)
    settings = {"input_px": 48, "tiles_per_slide": 8, "eval_tiles_per_slide": 6, "epochs": 1, "batch_size": 16}
    tile_supervised.train_tile_supervised(cohort["slides"], cohort["tiles"], cohort["splits"], 0, settings, 0,
                                          str(tmp_path), device="cpu", num_threads=1)
    tile_slides, logits = calls[-1]  # the final predictions, after the validation of the one epoch
    positive = pd.Series((logits.argmax(dim=1) == 1).double().numpy()).groupby(pd.Series(tile_slides)).mean()
    slides = pd.read_csv(tmp_path / "predictions_slides.csv").set_index("slide_id")
    assert sorted(positive.index) == sorted(slides.index) == ["S4", "S5", "S6", "S7"]
    assert slides["prob"].to_dict() == pytest.approx(positive.to_dict(), abs=1e-12)


@pytest.fixture(scope="module")
def multiclass_cohort(tmp_path_factory):
    """12 one-slide patients of the demo's classes normal, tumor, lymphoid (slide k: class k % 3): 6 train,
    3 val, 3 test, every class in each partition."""
    parts = ["train"] * 6 + ["val"] * 3 + ["test"] * 3
    return make_tiled_cohort(tmp_path_factory.mktemp("tiles_multi"), parts, task="multiclass")


def test_multiclass_run_writes_the_files_of_a_multiclass_mil_model(multiclass_cohort, tmp_path):
    from slidemil.report.endpoints import load_runs

    cohort = multiclass_cohort
    settings = {"input_px": 48, "tiles_per_slide": 8, "eval_tiles_per_slide": 6, "epochs": 2, "batch_size": 16,
                "lr": 1e-3}
    summary = tile_supervised.train_tile_supervised(cohort["slides"], cohort["tiles"], cohort["splits"], 0,
                                                    settings, 0, str(tmp_path), device="cpu", num_threads=1)
    assert cohort["classes"] == ["lymphoid", "normal", "tumor"]
    columns = ["prob_0", "prob_1", "prob_2"]
    slides = pd.read_csv(tmp_path / "predictions_slides.csv")
    assert list(slides.columns) == ["slide_id", "patient_id", "label", "partition", *columns]
    assert sorted(slides["slide_id"]) == sorted(f"S{k}" for k in range(6, 12))
    assert np.allclose(slides[columns].sum(axis=1), 1.0)
    assert ((slides[columns] * 6).round(6) % 1 == 0).all().all()  # fractions of the 6 evaluated tiles
    patients = pd.read_csv(tmp_path / "predictions_patients.csv")
    assert list(patients.columns) == ["patient_id", "label", "partition", "n_slides", *columns]
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history.columns) == ["epoch", "train_loss", "val_loss", "val_macro_auc", "lr"]
    assert history["epoch"].tolist() == [1, 2] and history["val_macro_auc"].between(0, 1).all()
    assert summary["val_macro_auc"] == pytest.approx(history["val_macro_auc"].max())
    assert summary["test_macro_auc"] is None or 0 <= summary["test_macro_auc"] <= 1

    checkpoint = torch.load(tmp_path / "model.pt", weights_only=True)
    assert checkpoint["n_classes"] == 3 and checkpoint["state_dict"]["fc.weight"].shape[0] == 3
    task = task_from_checkpoint(checkpoint)
    assert task.name == "multiclass" and task.class_names == ["lymphoid", "normal", "tumor"]
    assert task.output_columns == columns

    # The report reads it as it reads a multiclass MIL run.
    run = {"extractor": "tiles", "model": "tile_supervised", "fold": 0,
           "predictions": str(tmp_path / "predictions_patients.csv"), "history": str(tmp_path / "history.csv")}
    per_fold, tests = load_runs([run], task)
    test = patients[patients["partition"] == "test"]
    assert per_fold.loc[0, "macro_auc"] == pytest.approx(task.metrics(test)["macro_auc"])
    assert per_fold.loc[0, "best_val_macro_auc"] == pytest.approx(history["val_macro_auc"].max())
    assert len(tests[("tiles", "tile_supervised")][0][1]) == 3


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
