"""Issue 25: which epoch training keeps (training.selection), the validation-chosen threshold and its accuracy
in the report, the MIL benchmark script on any .npz, and AB-MIL's projection depth."""

from __future__ import annotations

import importlib.util
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from factories import ROOT, write_mil_npz, write_run
from slidemil.config import ConfigError, check_config
from slidemil.features.byof import CV_MASKS, cv_test_folds, load_mil_npz
from slidemil.mil.models import create_model
from slidemil.report.stats import binary_metrics, load_tests, validation_threshold, write_summary
from slidemil.training import Loop, fit_epochs


# --------------------------------------------------------------------------- selection


def _fit(selection: str, aucs, losses, patience: int = 100):
    """fit_epochs on a model whose weight records the epoch, with scripted validation results."""
    net = torch.nn.Linear(1, 1, bias=False)
    epoch = {"n": 0}

    def train(e):
        epoch["n"] = e
        with torch.no_grad():
            net.weight.fill_(e)
        return 0.5, 1e-3

    def validate():
        return aucs[epoch["n"] - 1], losses[epoch["n"] - 1]

    loop = Loop(train, validate, len(aucs), patience, "test", progress=False, selection=selection)
    best, history = fit_epochs(net, loop, use_auc=True)
    assert best.state["weight"].item() == best.epoch  # the kept state is that epoch's
    return best, history


AUCS = [0.60, 0.90, 0.90, 0.70, 0.80, 0.80]
LOSSES = [0.70, 0.65, 0.60, 0.50, 0.40, 0.45]


@pytest.mark.parametrize("selection, epoch", [("val_auc", 3), ("val_loss", 5), ("last", 6)])
def test_selection_policies_keep_their_epoch(selection, epoch):
    best, history = _fit(selection, AUCS, LOSSES)
    assert best.epoch == epoch and len(history) == len(AUCS)


def test_val_loss_ties_go_to_the_higher_auc():
    best, _ = _fit("val_loss", [0.6, 0.8, 0.7], [0.5, 0.5, 0.5])
    assert best.epoch == 2


def test_last_is_never_stopped_by_patience_and_val_loss_is():
    best, history = _fit("last", AUCS, LOSSES, patience=1)
    assert (best.epoch, len(history)) == (6, 6)
    best, history = _fit("val_loss", [0.5] * 6, [0.4, 0.5, 0.3, 0.2, 0.6, 0.1], patience=1)
    assert (best.epoch, len(history)) == (1, 2)


def test_selection_typo_fails_the_config_with_one_line():
    with pytest.raises(ConfigError, match=r"mil\.training\.selection.*val_auc, val_loss, last"):
        check_config({"mil": {"training": {"selection": "val_acc"}}})


# --------------------------------------------------------------------------- threshold


def test_threshold_is_chosen_on_validation_between_the_classes():
    # Separable validation scores: the cut lies midway between the highest negative and the lowest positive.
    assert validation_threshold([0, 0, 1, 1], [0.1, 0.3, 0.7, 0.9]) == pytest.approx(0.5)
    assert validation_threshold([0, 0, 1, 1], [0.05, 0.1, 0.2, 0.3]) == pytest.approx(0.15)
    # One-class validation sets choose nothing: 0.5.
    assert validation_threshold([1, 1, 1], [0.2, 0.3, 0.4]) == 0.5


def test_threshold_maximises_validation_balanced_accuracy():
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(30, int), np.ones(10, int)]
    p = np.clip(0.25 + 0.2 * y + rng.normal(0, 0.1, len(y)), 0, 1)
    t = validation_threshold(y, p)
    chosen = binary_metrics(y, p, t)["balanced_accuracy"]
    assert chosen >= max(binary_metrics(y, p, c)["balanced_accuracy"] for c in np.linspace(0, 1, 201)) - 1e-12
    assert chosen > binary_metrics(y, p, 0.5)["balanced_accuracy"]  # these scores all sit below 0.5


def test_binary_metrics_counts():
    m = binary_metrics([0, 0, 0, 1], [0.1, 0.2, 0.6, 0.9], 0.5)
    assert m["accuracy"] == 0.75 and m["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)


def test_report_gives_accuracy_at_the_validation_threshold(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(20)]
    labels = np.arange(20) % 2
    runs = [write_run(tmp_path, "e", "abmil", k, ids, labels, 3.0, rng) for k in range(3)]
    per_fold, tests = load_tests(runs)
    for run, row in zip(runs, per_fold.itertuples()):
        frame = pd.read_csv(run["predictions"])
        val, test = frame[frame["partition"] == "val"], frame[frame["partition"] == "test"]
        t = validation_threshold(val["label"], val["prob"])
        assert row.threshold == pytest.approx(t)
        assert row.test_accuracy == pytest.approx(((test["prob"] >= t) == test["label"]).mean())
    summary = write_summary(per_fold, tests, tmp_path / "report", n_bootstrap=10)
    assert summary["accuracy_mean"].iloc[0] == pytest.approx(per_fold["test_accuracy"].mean())
    assert summary["balanced_accuracy_std"].iloc[0] == pytest.approx(per_fold["test_balanced_accuracy"].std())
    assert "Balanced accuracy" in (tmp_path / "report" / "summary.md").read_text()


# --------------------------------------------------------------------------- .npz folds and the benchmark script


def test_npz_without_folds_gets_a_stratified_10x5_cv_from_the_seed(tmp_path):
    npz = write_mil_npz(tmp_path / "x.npz", n_bags=40)
    masks = load_mil_npz(npz, seed=1)[CV_MASKS]
    assert masks.shape == (5, 10, 40)
    labels = np.arange(40) % 2
    for r in range(5):
        folds = cv_test_folds(masks, r)  # each bag in exactly one test fold
        assert all(np.bincount(labels[folds == k]).tolist() == [2, 2] for k in range(10))
    assert np.array_equal(masks, load_mil_npz(npz, seed=1)[CV_MASKS])
    assert not np.array_equal(masks, load_mil_npz(npz, seed=2)[CV_MASKS])
    assert not np.array_equal(masks[0], masks[1])


def test_npz_with_folds_keeps_them(tmp_path):
    npz = write_mil_npz(tmp_path / "x.npz", folds=(2, 4))
    with np.load(npz) as data:
        assert np.array_equal(load_mil_npz(npz)[CV_MASKS], data[CV_MASKS])


def _bench():
    spec = importlib.util.spec_from_file_location("mil_benchmarks", ROOT / "bench" / "mil_benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_script_runs_any_npz_with_a_reference_table(tmp_path):
    npz = write_mil_npz(tmp_path / "toy.npz", n_bags=40, signal=4.0)
    preset = tmp_path / "preset.yaml"
    preset.write_text("mil:\n  training: {epochs: 4, patience: 4, lr: 0.005, batch_size: 4, selection: last}\n"
                      "  settings:\n    abmil: {embed_dim: 16, attn_dim: 8, n_layers: 2}\n")
    refs = tmp_path / "refs.csv"
    refs.write_text("name,metric,dataset,mean,se,model\nSome paper,accuracy,toy,0.99,0.001,abmil\n")
    out = tmp_path / "out" / "toy.md"
    _bench().main(["--data", str(npz), "--models", "abmil", "--preset", str(preset), "--references", str(refs),
                   "--repetitions", "1", "--max-folds", "3", "--out", str(out)])
    folds = pd.read_csv(out.with_name("toy_folds.csv"))
    assert len(folds) == 3 and set(folds["dataset"]) == {"toy"}
    assert (folds["epochs_run"] == 4).all() and (folds["best_epoch"] == 4).all()  # selection: last
    assert folds["n_test"].sum() == 12  # 3 of the 10 drawn folds of 40 bags
    assert folds["accuracy"].between(0, 1).all() and folds["threshold"].between(0, 1).all()
    doc = out.read_text()
    assert "| Some paper | 0.990 ± 0.001 | - |" in doc
    assert "`abmil` on TOY" in doc and "(Some paper)" in doc


def test_benchmark_refit_trains_on_the_validation_share_too(tmp_path):
    npz = write_mil_npz(tmp_path / "toy.npz", n_bags=40, signal=4.0)
    preset = tmp_path / "preset.yaml"
    preset.write_text("mil:\n  training: {epochs: 3, patience: 3, lr: 0.005, batch_size: 4, selection: last}\n"
                      "  settings:\n    meanpool: {embed_dim: 16}\n")
    runs = {}
    for name, extra in (("held_out", []), ("refit", ["--refit"])):
        out = tmp_path / name / "toy.md"
        _bench().main(["--data", str(npz), "--models", "meanpool", "--preset", str(preset), "--repetitions", "1",
                       "--max-folds", "2", "--out", str(out), *extra])
        runs[name] = (pd.read_csv(out.with_name("toy_folds.csv")), out.read_text())
    (held, _), (refit, doc) = runs["held_out"], runs["refit"]
    assert (refit["n_test"] == held["n_test"]).all() and (refit["n_val"] == 0).all()
    assert (refit["n_train"] == held["n_train"] + held["n_val"]).all() and (held["n_val"] > 0).all()
    assert refit["threshold"].isna().all() and refit["accuracy"].between(0, 1).all()
    assert "--refit" in doc and "none (`--refit`)" in doc
    with pytest.raises(SystemExit, match="selection: last"):
        _bench().main(["--data", str(npz), "--models", "meanpool", "--preset", str(preset), "--refit",
                       "--training", '{"selection": "val_auc"}', "--out", str(tmp_path / "x" / "toy.md")])


def test_benchmark_label_noise_flips_training_and_validation_labels_only(tmp_path):
    bench = _bench()
    n = 4000
    split = pd.DataFrame({"slide_id": [f"b{i}" for i in range(n)], "label": np.arange(n) % 2,
                          "partition": np.array(["train", "val", "test", "train"])[np.arange(n) % 4]})
    noisy = bench.flip_labels(split, 0.2, seed=3, repetition=1, fold=4)
    flipped = noisy["label"] != split["label"]
    test = split["partition"] == "test"
    assert not flipped[test].any()
    assert abs(flipped[~test].mean() - 0.2) < 0.03 and (noisy["label"].isin([0, 1])).all()
    assert noisy.equals(bench.flip_labels(split, 0.2, seed=3, repetition=1, fold=4))  # same flips every model
    assert not noisy.equals(bench.flip_labels(split, 0.2, seed=3, repetition=1, fold=5))
    assert bench.flip_labels(split, 0.0, 3, 1, 4).equals(split)
    npz = write_mil_npz(tmp_path / "toy.npz", n_bags=40, signal=4.0)
    preset = tmp_path / "preset.yaml"
    preset.write_text("mil:\n  training: {epochs: 2, patience: 2, lr: 0.005, batch_size: 4, selection: last}\n"
                      "  settings:\n    meanpool: {embed_dim: 16}\n")
    out = tmp_path / "noisy" / "toy.md"
    bench.main(["--data", str(npz), "--models", "meanpool", "--preset", str(preset), "--repetitions", "1",
                "--max-folds", "1", "--label-noise", "0.25", "--out", str(out)])
    doc = out.read_text()
    assert "--label-noise 0.25" in doc and "flipped with probability 0.25" in doc
    with pytest.raises(SystemExit):
        bench.main(["--data", str(npz), "--label-noise", "0.5", "--out", str(out)])


def test_benchmark_doc_is_its_run_files_plus_the_notes_it_keeps(tmp_path):
    bench = _bench()
    for name in ("benchmarks.md", "benchmarks_folds.csv", "benchmarks_run.json"):
        shutil.copy(ROOT / "docs" / name, tmp_path / name)
    doc = tmp_path / "benchmarks.md"
    rewrite = ["--rewrite-doc", "--out", str(doc)]
    bench.main(rewrite)
    # docs/benchmarks.md is exactly what its own run files give, with its findings kept below the marker
    assert doc.read_text() == (ROOT / "docs" / "benchmarks.md").read_text()
    assert "## What costs the accuracy" in bench.kept_notes(doc)
    notes = tmp_path / "notes.md"
    notes.write_text("A new finding.\n")
    bench.main([*rewrite, "--notes", str(notes)])
    replaced = doc.read_text()
    assert replaced.endswith(bench.NOTES_MARKER + "\n\nA new finding.\n") and "What costs the accuracy" not in replaced
    bench.main(rewrite)
    assert doc.read_text() == replaced
    # a run without --out writes under results/, never over the project's docs
    assert not (ROOT / bench._parse(["--rewrite-doc"]).out).resolve().is_relative_to(ROOT / "docs")


def test_benchmark_preset_rejects_other_sections(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("mil:\n  models: [abmil]\n")
    with pytest.raises(SystemExit, match="only mil.training and mil.settings"):
        _bench().load_preset(preset)


@pytest.mark.parametrize("name", ["mil_benchmarks.yaml", "mil_benchmarks_baseline.yaml", "mil_benchmarks_ilse.yaml"])
def test_benchmark_presets_are_valid_workflow_configs(name):
    import yaml

    raw = yaml.safe_load((ROOT / "config" / name).read_text())
    cfg = check_config(raw)
    assert cfg["mil"]["training"]["selection"] == raw["mil"]["training"]["selection"]


# --------------------------------------------------------------------------- projection depth


@pytest.mark.parametrize("model", ["abmil", "abmil_gated", "meanpool", "maxpool", "varmil"])
def test_n_layers_stacks_halving_projections(model):
    attention = {"attn_dim": 8} if model in ("abmil", "abmil_gated", "varmil") else {}
    net = create_model(model, in_dim=10, embed_dim=32, n_layers=3, **attention)
    widths = [m.out_features for m in net.project if isinstance(m, torch.nn.Linear)]
    # VarMIL classifies the attention-weighted mean and variance side by side.
    assert widths == [32, 16, 8] and net.classifier.in_features == 8 * (2 if model == "varmil" else 1)
    x, mask = torch.randn(2, 5, 10), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    net.eval()
    padded = net(x, mask)["logits"][1]
    alone = net(x[1:, :3], None)["logits"][0]
    assert torch.allclose(padded, alone, atol=1e-5)


def test_n_layers_too_deep_is_refused():
    with pytest.raises(ValueError, match="n_layers"):
        create_model("abmil", in_dim=4, embed_dim=4, n_layers=4)
    assert math.isfinite(create_model("abmil", in_dim=4, embed_dim=4, n_layers=3)(torch.randn(1, 2, 4))["logits"].sum().item())
    # VarMIL without a projection (DeepSMILE's default) has no layers to stack.
    with pytest.raises(ValueError, match=r"varmil\.n_layers must be 1 without a projection \(embed_dim: null\), got 2"):
        create_model("varmil", in_dim=4, embed_dim=None, n_layers=2)


def test_ablation_effects_are_paired_over_the_common_folds():
    spec = importlib.util.spec_from_file_location("mil_ablations", ROOT / "bench" / "mil_ablations.py")
    ablations = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablations)
    rng = np.random.default_rng(0)
    keys = pd.DataFrame({"dataset": "d", "model": "m", "repetition": 0, "fold": np.arange(10)})
    # Folds differ a lot, the variant adds 0.05 to each: paired, the effect is exact.
    base = keys.assign(accuracy=rng.uniform(0.3, 0.9, 10), auc=rng.uniform(0.3, 0.9, 10))
    variant = base.iloc[:6].assign(accuracy=lambda f: f["accuracy"] + 0.05, auc=lambda f: f["auc"] - 0.02)
    effect = ablations.paired_effects(base, variant).iloc[0]
    assert effect["n"] == 6
    assert effect["accuracy"] == pytest.approx(0.05) and effect["accuracy_se"] == pytest.approx(0, abs=1e-12)
    assert effect["auc"] == pytest.approx(-0.02)
    # Against another model of the baseline: each variant model paired with that model on the same folds.
    other = base.assign(model="pool", accuracy=lambda f: f["accuracy"] - 0.1)
    against = ablations.paired_effects(pd.concat([base, other]), variant, baseline_model="pool").iloc[0]
    assert (against["model"], against["n"]) == ("m", 6) and against["accuracy"] == pytest.approx(0.15)


@pytest.mark.parametrize("selection, words", [(None, "best validation AUC"), ("val_loss", "lowest\nvalidation loss"),
                                               ("last", "the last one's model was kept")])
def test_training_curve_caption_names_the_selection_rule(selection, words):
    """`snakemake --report`'s caption of the training curves says which epoch's model was tested."""
    import jinja2

    from slidemil.names import report_captions

    training = {} if selection is None else {"selection": selection}
    captions = report_captions("binary")  # what the report rule passes as its `captions` param
    snakemake = type("Snakemake", (), {"config": {"task": "binary", "mil": {"training": training}},
                                       "params": type("Params", (), {"captions": captions})})
    caption = jinja2.Template((ROOT / "workflow" / "report" / "history.rst").read_text()).render(snakemake=snakemake)
    assert words in caption
    assert ("best validation" in caption) == (selection is None)
