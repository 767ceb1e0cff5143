"""The shared training core (slidemil.training): the epoch loop, selection, the optimiser step, metrics."""

import ast
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from slidemil import training
from slidemil.training import Loop, Selection, Stepper, fit_epochs

SRC = Path(__file__).resolve().parents[1] / "src" / "slidemil"


def scripted(aucs, losses):
    """A loop whose validation returns the given AUCs and losses, and whose 'training' sets the weight to the epoch."""
    model = torch.nn.Linear(1, 1, bias=False)
    seen = iter(zip(aucs, losses))

    def train(epoch):
        with torch.no_grad():
            model.weight.fill_(epoch)
        return 1.0 / epoch, 0.1

    return model, train, lambda: next(seen)


def test_best_epoch_is_kept_and_patience_stops():
    model, train, validate = scripted([0.6, 0.8, 0.7, 0.8, 0.75, 0.9], [1.0, 0.9, 0.8, 0.95, 0.7, 0.1])
    best, history = fit_epochs(model, Loop(train, validate, epochs=6, patience=2, desc="t", progress=False), True)
    # Epoch 2 (0.8); epoch 4 ties on AUC with a higher loss; epochs 3-4 do not improve: stop after 4.
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert best.epoch == 2 and best.auc == 0.8 and best.loss == 0.9
    assert best.state["weight"].item() == 2.0  # the weights of the best epoch, not the last
    assert list(history[0]) == training.HISTORY_COLUMNS
    assert history[0] == {"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_auc": 0.6, "lr": 0.1}


def test_without_validation_every_epoch_runs_from_the_first_epoch_and_ends_with_the_hook():
    """SimCLR's use: no validation, a resumed start, a checkpoint after each epoch; patience never stops it."""
    model, train, _ = scripted([], [])
    after = []
    loop = Loop(train, None, epochs=5, patience=1, desc="t", progress=False, first_epoch=3,
                after_epoch=lambda epoch: after.append((epoch, model.weight.item())))
    best, history = fit_epochs(model, loop, use_auc=False)
    assert [h["epoch"] for h in history] == [3, 4, 5]
    assert after == [(3, 3.0), (4, 4.0), (5, 5.0)]  # after each epoch's training, in order
    assert best.epoch == 5 and best.state["weight"].item() == 5.0
    assert history[0]["val_auc"] is None and math.isnan(history[0]["val_loss"])
    assert history[0]["train_loss"] == 1.0 / 3


def test_ties_and_single_class_validation_select_on_loss(caplog):
    model, train, validate = scripted([None, None, None], [0.5, 0.4, 0.6])
    best, history = fit_epochs(model, Loop(train, validate, epochs=3, patience=5, desc="one-class"), False)
    assert best.epoch == 2 and len(history) == 3
    assert "all of one class" in caplog.text
    s = Selection(use_auc=True)
    s.update(1, 0.7, 0.5, torch.nn.Linear(1, 1))
    assert s.improves(0.7, 0.4) and not s.improves(0.7, 0.6) and s.improves(0.71, 9.0)


def test_stepper_matches_the_hand_written_step_exactly():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 3)
    opt_a, opt_b = torch.optim.Adam(a.parameters()), torch.optim.Adam(b.parameters())
    stepper = Stepper(opt_b, torch.amp.GradScaler("cpu", enabled=False))
    for _ in range(3):
        opt_a.zero_grad(set_to_none=True)
        a(x).pow(2).mean().backward()
        opt_a.step()
        stepper.step(b(x).pow(2).mean())
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_patient_auc_groups_slides_of_a_patient():
    slides = pd.DataFrame({"slide_id": list("abcd"), "patient_id": ["p", "p", "q", "r"], "label": [1, 1, 0, 0],
                           "partition": "val", "prob": [0.9, 0.5, 0.6, 0.2]})
    # Patient p: mean 0.7, above both negative patients; its slide at 0.5 alone is below q's 0.6.
    assert training.patient_auc(slides) == 1.0
    assert training.patient_auc(slides.assign(patient_id=list("abcd"))) == pytest.approx(0.75)
    assert training.patient_auc(slides.assign(label=1)) is None


def test_class_weights_and_subsets():
    w = training.class_weights(np.array([0, 0, 0, 1]), True)
    assert torch.allclose(w, torch.tensor([4 / 6, 2.0])) and math.isclose(float((w * torch.tensor([3, 1])).sum()), 4)
    with pytest.raises(ValueError, match="both classes"):
        training.class_weights(np.array([1, 1]), True)
    idx = training.subsample_indices(30, 12, 7, "S")
    assert len(idx) == 12 and (np.diff(idx) > 0).all() and training.subsample_indices(12, 12, 7, "S") is None


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_no_stage_imports_mil_training_internals():
    for path in (SRC / "pretrain" / "tilepool.py", SRC / "pretrain" / "tile_supervised.py", SRC / "pretrain" / "simclr.py"):
        assert "slidemil.mil.train" not in _imports(path), path.name
    # A core module: it imports the file contracts and nothing of any stage.
    assert {m for m in _imports(SRC / "training.py") if m.startswith("slidemil.")} <= {"slidemil.files",
                                                                                     "slidemil.files.checkpoint"}
