"""The training stage on tiny synthetic bags (CPU, seconds)."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from slidemil.mil import train
from slidemil.files import read_h5, write_h5
from slidemil.mil.models import create_model
from slidemil.runtime import resolve_precision
from slidemil.tasks import make_task
from factories import DIM, FAST, MODEL_KWARGS, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


def run(dataset, out, fold=0, training=None, seed=0, model="abmil", features=None, splits=None):
    return train.train_fold(
        features or dataset["features"], splits or dataset["splits"], fold,
        train.Recipe(model, MODEL_KWARGS, {**FAST, **(training or {})}, seed), str(out), device="cpu", num_threads=1,
    )


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return run(dataset, out), out


def test_learns_easy_task(trained):
    summary, _ = trained
    assert summary["test_auc"] >= 0.9
    assert 1 <= summary["best_epoch"] <= summary["epochs_run"] <= FAST["epochs"]
    assert summary["n_slides"] == {"train": 24, "val": 8, "test": 8}


def test_outputs(trained, dataset):
    summary, out = trained
    history = pd.read_csv(out / "history.csv")
    assert list(history.columns) == ["epoch", "train_loss", "val_loss", "val_auc", "lr"]
    assert history["epoch"].tolist() == list(range(1, summary["epochs_run"] + 1))
    assert (history["lr"].diff().dropna() < 0).all()  # cosine decay, stepped per batch

    slides = pd.read_csv(out / "predictions_slides.csv", dtype={"slide_id": str, "patient_id": str})
    assert list(slides.columns) == ["slide_id", "patient_id", "label", "partition", "prob"]
    table = dataset["table"]
    expected = table.loc[table["fold_0"].isin(["val", "test"]), "slide_id"]
    assert sorted(slides["slide_id"]) == sorted(expected)
    assert slides["prob"].between(0, 1).all()

    ckpt = torch.load(out / "model.pt", weights_only=False)
    assert {"state_dict", "model", "model_kwargs", "in_dim", "epoch", "val_auc", "training", "seed"} <= set(ckpt)
    assert ckpt["epoch"] == summary["best_epoch"] and ckpt["val_auc"] == summary["val_auc"]
    assert ckpt["training"]["patience"] == 5  # defaults filled in

    # The saved checkpoint reproduces the saved predictions.
    model = create_model(ckpt["model"], ckpt["in_dim"], **ckpt["model_kwargs"]).eval()
    model.load_state_dict(ckpt["state_dict"])
    row = slides.iloc[0]
    bag, _ = read_h5(dataset["features"][row["slide_id"]], names=("features",))
    x = torch.from_numpy(bag["features"].astype(np.float32))
    # Features are standardised with the training-slide statistics saved in the checkpoint.
    train_ids = table.loc[table["fold_0"] == "train", "slide_id"]
    train_x = np.concatenate([read_h5(dataset["features"][s], names=("features",))[0]["features"]
                              for s in train_ids]).astype(np.float64)
    np.testing.assert_allclose(ckpt["feature_mean"].numpy(), train_x.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ckpt["feature_std"].numpy(), train_x.std(0), rtol=1e-3, atol=1e-5)
    x = (x - ckpt["feature_mean"]) / ckpt["feature_std"]
    with torch.no_grad():
        logits = model(x[None])["logits"]
    assert torch.softmax(logits, 1)[0, 1].item() == pytest.approx(row["prob"], abs=1e-6)


def test_patient_prob_is_mean_of_slides(trained):
    _, out = trained
    slides = pd.read_csv(out / "predictions_slides.csv", dtype={"patient_id": str})
    patients = pd.read_csv(out / "predictions_patients.csv", dtype={"patient_id": str})
    assert list(patients.columns) == ["patient_id", "label", "partition", "n_slides", "prob"]
    expected = slides.groupby("patient_id").agg(prob=("prob", "mean"), n=("prob", "size"), label=("label", "first"))
    merged = patients.merge(expected, left_on="patient_id", right_index=True, suffixes=("", "_slides"))
    assert len(merged) == slides["patient_id"].nunique()
    np.testing.assert_allclose(merged["prob"], merged["prob_slides"], rtol=1e-12)
    assert (merged["n_slides"] == merged["n"]).all() and (merged["label"] == merged["label_slides"]).all()
    assert (merged["n_slides"] == 2).any()


def test_same_seed_same_predictions(dataset, tmp_path):
    settings = {"epochs": 2, "batch_size": 4, "max_tiles": 12}
    runs = [run(dataset, tmp_path / name, training=settings, seed=seed) for name, seed in (("a", 3), ("b", 3), ("c", 4))]
    probs = [pd.read_csv(tmp_path / name / "predictions_slides.csv")["prob"].to_numpy() for name in "abc"]
    np.testing.assert_array_equal(probs[0], probs[1])
    assert not np.array_equal(probs[0], probs[2])
    history = [pd.read_csv(tmp_path / name / "history.csv") for name in "ab"]
    pd.testing.assert_frame_equal(history[0], history[1])
    assert runs[0]["val_auc"] == runs[1]["val_auc"]
    # Each run's checkpoint and summary record its own recipe: model, settings, seed and training.
    for name, summary, seed in zip("ac", runs[::2], (3, 4)):
        ckpt = torch.load(tmp_path / name / "model.pt", weights_only=False)
        assert (ckpt["model"], ckpt["model_kwargs"], ckpt["seed"]) == ("abmil", MODEL_KWARGS, seed) == (
            summary["model"], MODEL_KWARGS, summary["seed"])
        assert ckpt["training"] == train.resolve_training({**FAST, **settings})


def test_max_tiles_subset_fixed_per_slide(dataset):
    idx = train.subsample_indices(30, 12, seed=7, slide_id="S01_0")
    assert len(idx) == 12 and len(set(idx)) == 12 and (np.diff(idx) > 0).all() and idx.max() < 30
    np.testing.assert_array_equal(idx, train.subsample_indices(30, 12, seed=7, slide_id="S01_0"))
    assert not np.array_equal(idx, train.subsample_indices(30, 12, seed=8, slide_id="S01_0"))
    assert not np.array_equal(idx, train.subsample_indices(30, 12, seed=7, slide_id="S02_0"))
    assert train.subsample_indices(12, 12, seed=7, slide_id="S01_0") is None

    ids = sorted(dataset["features"])
    bags, _ = train.load_bags(ids, dataset["features"], max_tiles=12, seed=7)
    # The subset depends on the slide alone, not on which other slides are loaded.
    again, _ = train.load_bags(ids[::-1][:5], dataset["features"], max_tiles=12, seed=7)
    for slide in again:
        torch.testing.assert_close(again[slide], bags[slide], rtol=0, atol=0)
    for slide, bag in bags.items():
        full = read_h5(dataset["features"][slide], names=("features",))[0]["features"].astype(np.float32)
        keep = train.subsample_indices(len(full), 12, 7, slide)
        assert len(bag) == min(len(full), 12)
        np.testing.assert_array_equal(bag.float().numpy(), full if keep is None else full[keep])


def mapped_files() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
def test_bags_are_maps_of_the_feature_files_up_to_the_budget(dataset, monkeypatch):
    ids = sorted(dataset["features"])
    read, _ = train.load_bags(ids, dataset["features"], mmap=False)
    bags, _ = train.load_bags(ids, dataset["features"])
    maps = mapped_files()
    assert all(str(Path(dataset["features"][s]).resolve()) in maps for s in ids)
    for s in ids:
        torch.testing.assert_close(bags[s], read[s], rtol=0, atol=0)
    del bags, maps
    # Past the descriptor budget the rest are read, with the same values.
    monkeypatch.setattr(train, "_map_budget", lambda n: 3)
    some, _ = train.load_bags(ids[::-1], dataset["features"])
    maps = mapped_files()
    assert sum(str(Path(dataset["features"][s]).resolve()) in maps for s in ids) == 3
    for s in ids:
        torch.testing.assert_close(some[s], read[s], rtol=0, atol=0)


def test_batches_are_standardised_and_padding_stays_zero():
    bags = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float16), "b": torch.tensor([[5.0, 6.0]])}
    mean, std = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])
    data = train.Data(bags, {"a": 0, "b": 1}, make_task(), torch.device("cpu"), (mean, std))
    x, mask, y = data.batch(["a", "b"])
    torch.testing.assert_close(x, torch.tensor([[[0.0, 0.0], [1.0, 0.5]], [[2.0, 1.0], [0.0, 0.0]]]))
    assert mask.tolist() == [[True, True], [True, False]] and y.tolist() == [0, 1]
    assert bags["a"].tolist() == [[1.0, 2.0], [3.0, 4.0]] and bags["a"].dtype == torch.float16  # never in place


def test_empty_slides_skipped_and_missing_ones_fail(dataset, tmp_path, caplog):
    empty = tmp_path / "EMPTY.h5"
    write_h5(empty, {"features": np.zeros((0, DIM), np.float32), "coords": np.zeros((0, 2), np.int64)}, {})
    table = dataset["table"].copy()
    table.loc[len(table)] = {"slide_id": "EMPTY", "patient_id": "P25", "label": 1, "fold_0": "test", "fold_1": "test"}
    splits = tmp_path / "splits.csv"
    table.to_csv(splits, index=False)
    features = {**dataset["features"], "EMPTY": str(empty)}

    with caplog.at_level(logging.WARNING, logger="slidemil.mil.train"):
        summary = run(dataset, tmp_path / "out", training={"epochs": 1}, features=features, splits=str(splits))
    assert summary["skipped_slides"] == ["EMPTY"]
    assert any("EMPTY" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    slides = pd.read_csv(tmp_path / "out" / "predictions_slides.csv")
    assert "EMPTY" not in set(slides["slide_id"])

    missing = dict(features)
    del missing["S27_0"]
    with pytest.raises(ValueError, match="S27_0"):
        run(dataset, tmp_path / "out2", training={"epochs": 1}, features=missing, splits=str(splits))


def test_early_stopping_when_val_cannot_improve(dataset, tmp_path):
    # lr 0 leaves the weights untouched: validation AUC and loss never improve after epoch 1.
    summary = run(dataset, tmp_path, training={"epochs": 20, "patience": 3, "lr": 0.0})
    assert summary["best_epoch"] == 1
    assert summary["epochs_run"] == 4
    assert len(pd.read_csv(tmp_path / "history.csv")) == 4


def test_single_class_validation_selects_on_loss(dataset, tmp_path, caplog):
    table = dataset["table"].copy()
    table.loc[(table["fold_0"] == "val") & (table["label"] == 1), "fold_0"] = "excluded"
    splits = tmp_path / "splits.csv"
    table.to_csv(splits, index=False)
    with caplog.at_level(logging.WARNING, logger="slidemil.mil.train"):
        summary = run(dataset, tmp_path / "out", training={"epochs": 2}, splits=str(splits))
    assert summary["val_auc"] is None
    assert any("one class" in r.getMessage() for r in caplog.records)
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    assert summary["best_epoch"] == int(history.loc[history["val_loss"].idxmin(), "epoch"])


def test_excluded_slides_unused(dataset, tmp_path):
    summary = run(dataset, tmp_path, fold=1, training={"epochs": 1})
    slides = pd.read_csv(tmp_path / "predictions_slides.csv", dtype={"patient_id": str})
    assert not set(slides["patient_id"]) & {"P00", "P01"}
    assert sum(summary["n_slides"].values()) == 40 - 3


def test_bad_settings_fail_clearly(dataset, tmp_path):
    with pytest.raises(ValueError, match="epoch"):
        run(dataset, tmp_path, training={"epoch": 3})
    with pytest.raises(TypeError, match="'abmil'.*width"):
        train.train_fold(dataset["features"], dataset["splits"], 0, train.Recipe("abmil", {"width": 3}, FAST, 0),
                         str(tmp_path))
    with pytest.raises(ValueError, match="fold_5"):
        run(dataset, tmp_path, fold=5)


def test_precision_setting_sets_the_autocast(dataset, tmp_path, monkeypatch):
    seen = []  # dtype of the first projection's output in every forward pass

    def recording_model(*args, **kwargs):
        model = create_model(*args, **kwargs)
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        first.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
        return model

    monkeypatch.setattr(train, "create_model", recording_model)
    summary = run(dataset, tmp_path / "bf16", training={"precision": "bf16"})
    assert set(seen) == {torch.bfloat16}  # training and the predictions alike
    assert summary["test_auc"] >= 0.9  # bf16 on a CPU still learns the easy task
    ckpt = torch.load(tmp_path / "bf16" / "model.pt", weights_only=False)
    assert ckpt["training"]["precision"] == "bf16"

    seen.clear()
    run(dataset, tmp_path / "auto", training={"epochs": 1})
    assert set(seen) == {torch.float32}  # auto: exact float32 on a CPU
    for precision, dtype in (("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with resolve_precision(torch.device("cpu"), precision).autocast(torch.device("cpu")):
            assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == dtype
    with pytest.raises(ValueError, match="training.precision must be one of auto, fp32, bf16, got 'fp16'"):
        run(dataset, tmp_path / "fp16", training={"precision": "fp16"})


def test_bf16_on_a_cpu_without_bf16_units_warns(dataset, tmp_path, monkeypatch, caplog):
    from slidemil import runtime as devices

    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    with caplog.at_level(logging.WARNING):
        run(dataset, tmp_path / "fp32", training={"epochs": 1, "precision": "fp32"})
        assert "no bf16 units" not in caplog.text
        run(dataset, tmp_path / "bf16", training={"epochs": 1, "precision": "bf16"})
    assert "training.precision is bf16, but this CPU has no bf16 units" in caplog.text


def test_cli(dataset, tmp_path, capsys):
    out = tmp_path / "cli"
    train.main([
        "--features-dir", str(dataset["root"]), "--splits", dataset["splits"], "--fold", "0",
        "--model", "abmil_gated", "--model-kwargs", json.dumps({"attn_dim": 64}),
        "--training", json.dumps({"epochs": 1, "batch_size": 8}), "--seed", "1", "--out", str(out),
        "--device", "cpu", "--num-threads", "1",
    ])
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == "abmil_gated" and summary["epochs_run"] == 1
    for name in ("model.pt", "history.csv", "predictions_slides.csv", "predictions_patients.csv"):
        assert (out / name).is_file()
    assert not list(out.glob(".*.tmp"))


def test_collate_pads_with_mask_and_keeps_precision():
    a = torch.tensor([[1.0, 2.0]], dtype=torch.float16)
    b = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    x, mask = train.collate([a, b])
    assert x.dtype == torch.float32 and x.shape == (2, 3, 2)
    assert mask.tolist() == [[True, False, False], [True, True, True]]
    assert torch.equal(x[1], b) and (x[0, 1:] == 0).all()
