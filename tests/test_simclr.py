"""SimCLR pre-training on tiny synthetic slides (CPU, seconds)."""

import json
import math

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from slidemil import training
from slidemil.pretrain import simclr, tilepool
from slidemil.demo.render import make_slide
from slidemil.features.extractors import create_extractor
from slidemil.features.extract import extract_features
from slidemil.cohort.splits import SplitError
from slidemil.tiling.tile import tile_slide

TINY = {"epochs": 1, "batch_size": 8, "tiles_per_slide": 8, "input_px": 48}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four small slides: A and B train/val, C test in fold 1 only, D test in both folds."""
    d = tmp_path_factory.mktemp("simclr")
    slides, tiles = {}, {}
    for k, slide_id in enumerate("ABCD"):
        slides[slide_id] = str(d / f"{slide_id}.tiff")
        tiles[slide_id] = str(d / f"{slide_id}.h5")
        make_slide(slides[slide_id], label=k % 2, seed=k, slide_px=(1024, 1024))
        tile_slide(slides[slide_id], tiles[slide_id], None, {"tile_px": 64, "mpp": 1.0})
    splits = pd.DataFrame({
        "slide_id": list("ABCD"), "patient_id": ["pA", "pB", "pC", "pD"], "label": [0, 1, 0, 1],
        "fold_0": ["train", "val", "train", "test"], "fold_1": ["val", "train", "test", "test"],
    })
    splits.to_csv(d / "splits.csv", index=False)
    return {"dir": d, "slides": slides, "tiles": tiles, "splits": str(d / "splits.csv")}


def run(cohort, out, **settings):
    return simclr.pretrain_simclr(cohort["slides"], cohort["tiles"], cohort["splits"], str(out),
                                  settings={**TINY, **settings}, seed=0, device="cpu", num_threads=1)


def test_nt_xent_equals_direct_computation():
    torch.manual_seed(0)
    z1, z2, t = torch.randn(5, 7), torch.randn(5, 7), 0.3
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        sims = [math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i]
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / sum(sims))
    assert simclr.nt_xent(z1, z2, t).item() == pytest.approx(total / (2 * n), rel=1e-5)


def test_nt_xent_rewards_matching_positives():
    torch.manual_seed(1)
    z = torch.randn(16, 32)
    aligned = simclr.nt_xent(z, z + 0.01 * torch.randn_like(z))
    shuffled = simclr.nt_xent(z, z[torch.randperm(16)])
    assert aligned < shuffled
    # Perfectly aligned, well separated pairs approach the minimum log(1) = 0 at low temperature.
    eye = torch.eye(16)
    assert simclr.nt_xent(eye, eye, 0.05).item() < 1e-3


def test_views_differ_and_are_seeded(cohort):
    s = tilepool.sample_slide_tiles("A", cohort["slides"]["A"], cohort["tiles"]["A"], 4, seed=0)
    pool = tilepool.TilePool([s], simclr.TwoViews(48), seed=0)
    views, _ = pool[0]
    assert views.shape == (2, 3, 48, 48) and views.dtype == torch.uint8
    assert (views[0].float() - views[1].float()).abs().mean() > 1
    again, _ = pool[0]
    assert torch.equal(views, again)            # a function of (seed, epoch, item) ...
    pool.epoch = 1
    assert not torch.equal(views, pool[0][0])   # ... new views every epoch


def test_pretraining_never_reads_test_slides(cohort, tmp_path, monkeypatch):
    opened = []
    real_open = tilepool.open_slide
    monkeypatch.setattr(tilepool, "open_slide", lambda path: opened.append(path) or real_open(path))
    summary = run(cohort, tmp_path)
    assert summary["slides"] == ["A", "B"]
    assert set(opened) == {cohort["slides"]["A"], cohort["slides"]["B"]}
    assert torch.load(tmp_path / "backbone.pt", weights_only=True)["slides"] == ["A", "B"]


def test_every_slide_test_somewhere_fails(cohort, tmp_path):
    splits = pd.read_csv(cohort["splits"])
    splits["fold_0"] = ["test", "test", "train", "val"]
    splits["fold_1"] = ["train", "val", "test", "test"]
    splits.to_csv(tmp_path / "splits.csv", index=False)
    with pytest.raises(SplitError, match="every slide is a test slide"):
        simclr.pretraining_slides(str(tmp_path / "splits.csv"))


def test_backbone_loads_into_extractor(cohort, tmp_path):
    summary = run(cohort, tmp_path)
    model, digest = create_extractor("shufflenet_simclr", str(tmp_path / "backbone.pt"))
    assert digest == summary["weights_digest"]
    assert digest != create_extractor("shufflenet_simclr", "random")[1]
    out = tmp_path / "f.h5"
    extract_features(cohort["slides"]["A"], cohort["tiles"]["A"], str(out), "shufflenet_simclr",
                     str(tmp_path / "backbone.pt"), input_px=48)
    with h5py.File(out) as f:
        assert f.attrs["weights_digest"] == digest and f["features"].shape[1] == 1024
        assert np.isfinite(f["features"][()]).all()
    curve = pd.read_csv(tmp_path / "loss.csv")
    assert list(curve.columns) == ["epoch", "step", "loss"] and len(curve) >= 1
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_equals_uninterrupted_run(cohort, tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        first = run(cohort, tmp_path / "resumed", epochs=1)
        resumed = run(cohort, tmp_path / "resumed", epochs=2)
        straight = run(cohort, tmp_path / "straight", epochs=2)
    finally:
        torch.use_deterministic_algorithms(False)
    assert first["first_epoch"] == 1 and resumed["first_epoch"] == 2 and straight["first_epoch"] == 1
    assert resumed["weights_digest"] == straight["weights_digest"] != first["weights_digest"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "resumed" / "loss.csv"),
                                  pd.read_csv(tmp_path / "straight" / "loss.csv"))
    # Other settings: the checkpoint is not continued.
    assert run(cohort, tmp_path / "resumed", epochs=2, temperature=0.2)["first_epoch"] == 1


def test_simclr_trains_through_the_shared_loop(cohort, tmp_path, monkeypatch):
    """MIL, tile-supervised and SimCLR share slidemil.training.fit_epochs: SimCLR's without validation, resumed
    after its checkpoint, checkpointing after each epoch."""
    loops = []

    def recording(model, loop, use_auc):
        loops.append(loop)
        return training.fit_epochs(model, loop, use_auc)

    monkeypatch.setattr(simclr, "fit_epochs", recording)
    run(cohort, tmp_path / "out", epochs=1)
    summary = run(cohort, tmp_path / "out", epochs=2)
    assert [(loop.validate, loop.first_epoch, loop.epochs) for loop in loops] == [(None, 1, 1), (None, 2, 2)]
    assert summary["first_epoch"] == 2
    assert torch.load(tmp_path / "out" / simclr.CHECKPOINT, weights_only=True)["epoch"] == 2


def test_a_few_epochs_lower_the_loss_with_weak_views(cohort, tmp_path):
    # Views differ only by flips and grayscale: the optimisation itself works within seconds.
    summary = run(cohort, tmp_path, epochs=4, tiles_per_slide=16, lr=1e-3, min_crop_scale=1.0, color_strength=0.0)
    losses = summary["epoch_loss"]
    chance = math.log(2 * TINY["batch_size"] - 1)
    assert losses[-1] < losses[0] - 0.1 and losses[-1] < chance - 0.3, losses


@pytest.fixture(scope="module")
def training_slides(tmp_path_factory):
    """Four 2048 px slides, two with 30-50 % tumour tiles, none of them test: about 490 tiles."""
    d = tmp_path_factory.mktemp("simclr_train")
    slides, tiles = {}, {}
    for k, slide_id in enumerate("ABCD"):
        slides[slide_id], tiles[slide_id] = str(d / f"{slide_id}.tiff"), str(d / f"{slide_id}.h5")
        make_slide(slides[slide_id], label=k % 2, seed=k, slide_px=(2048, 2048), tumor_tile_fraction=(0.3, 0.5))
        tile_slide(slides[slide_id], tiles[slide_id], None, {"tile_px": 64, "mpp": 1.0})
    pd.DataFrame({"slide_id": list("ABCD"), "patient_id": list("ABCD"), "label": [0, 1, 0, 1],
                  "fold_0": ["train", "val"] * 2}).to_csv(d / "splits.csv", index=False)
    return {"slides": slides, "tiles": tiles, "splits": str(d / "splits.csv")}


def test_a_few_epochs_lower_the_loss(training_slides, tmp_path):
    # The full augmentation pipeline (crop, flip, colour jitter, grayscale) at the strength of the demo
    # comparison (config/simclr_demo.yaml). The paper's 8 %-area crops and full-strength jitter need
    # far more steps on synthetic tissue than a unit test can afford (docs/simclr.md).
    settings = {"epochs": 8, "batch_size": 32, "tiles_per_slide": 200, "input_px": 48, "lr": 1e-3,
                "min_crop_scale": 0.3, "color_strength": 0.5}
    summary = simclr.pretrain_simclr(training_slides["slides"], training_slides["tiles"], training_slides["splits"],
                                     str(tmp_path), settings=settings, seed=0, device="cpu", num_threads=1)
    losses = summary["epoch_loss"]
    chance = math.log(2 * settings["batch_size"] - 1)
    assert summary["n_tiles"] > 400
    assert losses[-1] < losses[0] - 0.1 and losses[-1] < chance - 0.1, losses


def test_cli_trains_from_a_sheet(cohort, tmp_path, capsys):
    sheet = tmp_path / "sheet.csv"
    pd.DataFrame({"slide_id": list("ABCD"), "patient_id": ["pA", "pB", "pC", "pD"],
                  "path": [cohort["slides"][s] for s in "ABCD"], "label": [0, 1, 0, 1]}).to_csv(sheet, index=False)
    simclr.main(["--sheet", str(sheet), "--tiles-dir", str(cohort["dir"]), "--splits", cohort["splits"],
                 "--out", str(tmp_path / "out"), "--settings", json.dumps(TINY), "--device", "cpu",
                 "--num-threads", "1"])
    summary = json.loads(capsys.readouterr().out)
    # Only A and B are never test; C (test in fold 1) and D are not read.
    assert summary["n_tiles"] == 2 * TINY["tiles_per_slide"] and len(summary["epoch_loss"]) == 1
    assert torch.load(tmp_path / "out" / "backbone.pt", weights_only=True)["slides"] == ["A", "B"]


def test_settings_are_checked():
    with pytest.raises(ValueError, match="unknown simclr setting"):
        simclr.resolve_settings({"epoch": 2})
    with pytest.raises(ValueError, match="at least 2"):
        simclr.resolve_settings({"batch_size": 1})


def test_precision_setting_sets_the_autocast(cohort, tmp_path, monkeypatch):
    seen = []  # dtype of the first convolution's output in every forward pass

    class Recording(simclr.SimCLRModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            first = next(m for m in self.modules() if isinstance(m, torch.nn.Conv2d))
            first.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))

    monkeypatch.setattr(simclr, "SimCLRModel", Recording)
    summary = run(cohort, tmp_path / "bf16", precision="bf16")
    assert seen and set(seen) == {torch.bfloat16}
    assert all(math.isfinite(loss) for loss in summary["epoch_loss"])
    assert torch.load(tmp_path / "bf16" / "backbone.pt", weights_only=True)["settings"]["precision"] == "bf16"

    seen.clear()
    run(cohort, tmp_path / "auto")
    assert seen and set(seen) == {torch.float32}  # auto: exact float32 on a CPU
    # auto stays out of the checkpoint's signature, so checkpoints from before the setting still continue;
    # another precision does not continue it.
    assert "precision" not in torch.load(tmp_path / "auto" / simclr.CHECKPOINT, weights_only=True)["signature"]
    assert run(cohort, tmp_path / "auto", epochs=2)["first_epoch"] == 2
    assert run(cohort, tmp_path / "auto", epochs=3, precision="fp32")["first_epoch"] == 1
    with pytest.raises(ValueError, match="simclr.precision must be one of auto, fp32, bf16, got 'fp16'"):
        simclr.resolve_settings({"precision": "fp16"})
