"""MHIM-MIL: instance masks, consistency loss, EMA, schedules, training from a baseline, the DAG."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from slidemil.mil.models import mhim_blocks as mhim
from slidemil.mil import train
from slidemil.mil.models import create_model
from factories import FAST, snakemake_cli, write_dataset


def real_mask(lengths, n_max=None):
    n_max = n_max or max(lengths)
    return torch.arange(n_max)[None, :] < torch.tensor(lengths)[:, None]


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("n", [1, 7, 10, 33, 100, 9000])
@pytest.mark.parametrize("ratio", [0.01, 0.2, 0.5, 0.7])
def test_mask_count_is_ceil_of_ratio_times_real_length(n, ratio):
    expected = min(n, math.ceil(round(ratio * n, 9)))
    assert int(mhim.mask_count(ratio, torch.tensor([n]))[0]) == expected
    assert int(mhim.mask_count(0.0, torch.tensor([n]))[0]) == 0


def test_exact_counts_for_each_mask_and_padding_never_counted():
    g = torch.Generator().manual_seed(0)
    lengths = [50, 13, 7]
    real = real_mask(lengths, 60)
    # Padding gets the most extreme attention possible: it must still never be picked.
    attn = torch.rand(3, 60, generator=g).masked_fill(~real, 1e6)
    for kind, ratio in (("r", 0.3), ("l", 0.2), ("h", 0.1)):
        masked = mhim.select_masked(attn, real, **{f"ratio_{kind}": ratio}, generator=g)
        assert not (masked & ~real).any()
        assert masked.sum(1).tolist() == [math.ceil(ratio * n - 1e-9) for n in lengths]
    attn_low = attn.masked_fill(~real, -1e6)
    low = mhim.select_masked(attn_low, real, ratio_l=0.2)
    high = mhim.select_masked(attn_low, real, ratio_h=0.1)
    for b, n in enumerate(lengths):
        order = attn[b, :n].argsort()
        k_l, k_h = math.ceil(0.2 * n), math.ceil(0.1 * n - 1e-9)
        assert set(low[b].nonzero().squeeze(1).tolist()) == set(order[:k_l].tolist())
        assert set(high[b].nonzero().squeeze(1).tolist()) == set(order[n - k_h:].tolist())


def test_masks_combine_as_union():
    g = torch.Generator()
    real = real_mask([40, 25])
    attn = torch.rand(2, 40, generator=g.manual_seed(1))
    k = lambda r: mhim.mask_count(r, real.sum(1))  # noqa: E731
    low = mhim.top_k(attn, real, k(0.2), largest=False)
    high = mhim.top_k(attn, real, k(0.1), largest=True)
    rand = mhim.random_k(real, k(0.5), generator=g.manual_seed(5))
    both = mhim.select_masked(attn, real, ratio_r=0.5, ratio_l=0.2, ratio_h=0.1, ratio_hr=1.0,
                              generator=g.manual_seed(5))
    assert torch.equal(both, rand | low | high)
    assert (both.sum(1) < (k(0.5) + k(0.2) + k(0.1))).any()  # overlaps counted once


def test_random_half_of_the_top_2k():
    n, ratio_h = 60, 0.05  # k = 3 masked among the top 6
    attn = torch.arange(n, dtype=torch.float32).flip(0)[None]  # instance i has rank i
    real = real_mask([n])
    seen = set()
    for seed in range(40):
        masked = mhim.select_masked(attn, real, ratio_h=ratio_h, ratio_hr=0.5,
                                    generator=torch.Generator().manual_seed(seed))
        chosen = set(masked[0].nonzero().squeeze(1).tolist())
        assert len(chosen) == 3 and chosen <= set(range(6))
        seen |= chosen
    assert seen == set(range(6))  # the draw really is random over the candidates


def test_bag_never_emptied():
    real = real_mask([3, 1])
    masked = mhim.select_masked(torch.rand(2, 3), real, ratio_r=0.7, ratio_l=0.5, ratio_h=0.5)
    assert ((real & ~masked).sum(1) == 1).all()


def test_voting_ignores_a_minority_of_uniform_heads():
    g = torch.Generator().manual_seed(2)
    n, k = 30, 4
    agreed = torch.tensor([3, 11, 17, 25])
    heads = torch.rand(8, n, generator=g) * 0.1
    heads[:5, agreed] += 1.0          # five heads agree on the same top 4
    heads[5:] = 1.0 / n               # three "invalid" heads: uniform attention
    real = real_mask([n])
    top = mhim.top_k(heads[None], real, torch.tensor([k]), largest=True, fusion="vote")
    assert set(top[0].nonzero().squeeze(1).tolist()) == set(agreed.tolist())
    low_agreed = torch.tensor([0, 1, 2, 29])
    heads_low = torch.rand(8, n, generator=g) + 1.0
    heads_low[:5, low_agreed] -= 1.0
    heads_low[5:] = 1.0 / n
    low = mhim.top_k(heads_low[None], real, torch.tensor([k]), largest=False, fusion="vote")
    assert set(low[0].nonzero().squeeze(1).tolist()) == set(low_agreed.tolist())


def test_multihead_fusions_and_padding():
    g = torch.Generator().manual_seed(3)
    real = real_mask([20, 9])
    heads = torch.rand(2, 8, 20, generator=g).masked_fill(~real[:, None], 1e6)
    k = torch.tensor([5, 3])
    for fusion in mhim.FUSIONS:
        top = mhim.top_k(heads, real, k, fusion=fusion)
        assert not (top & ~real).any()
        if fusion != "split":
            assert top.sum(1).tolist() == [5, 3]
    mean = mhim.top_k(heads, real, k, fusion="mean")
    assert torch.equal(mean, mhim.top_k(heads.mean(1), real, k))
    split = mhim.top_k(heads, real, k, fusion="split")
    # "averaging": each head contributes its own top ceil(k / H) = 1 instance.
    per_head = heads.masked_fill(~real[:, None], -1).argmax(-1)
    for b in range(2):
        assert set(split[b].nonzero().squeeze(1).tolist()) == set(per_head[b].tolist())


def test_compact_keeps_order_and_pads():
    x = torch.arange(12, dtype=torch.float32).view(2, 6, 1)
    keep = torch.tensor([[True, False, True, True, False, False], [False, True, False, False, False, False]])
    xs, mask = mhim.compact(x, keep)
    assert xs.shape == (2, 3, 1)
    assert xs[0, :, 0].tolist() == [0, 2, 3] and xs[1, 0, 0] == 7
    assert mask.tolist() == [[True, True, True], [True, False, False]]


# --------------------------------------------------------------------------- loss, EMA, schedules


def test_consistency_loss_matches_direct_computation():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    sn, tn = s.double().numpy(), t.double().numpy()
    p = np.exp(tn / 0.1) / np.exp(tn / 0.1).sum(1, keepdims=True)
    log_q = sn - np.log(np.exp(sn).sum(1, keepdims=True))
    expected = -(p * log_q).sum(1).mean()
    assert mhim.consistency_loss(s, t, 0.1, 1.0).item() == pytest.approx(expected, rel=1e-5)


def test_ema_matches_formula():
    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in teacher.parameters()]
    mhim.ema_update(teacher, student, 0.9)
    for old, new, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s.detach())


def test_cosine_schedules():
    total = 50
    values = [mhim.cosine(0.03, 0.0, i, total) for i in range(total)]
    assert values[0] == pytest.approx(0.03) and values[-1] == 0.0
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert mhim.cosine(0.9999, 1.0, total - 1, total) == 1.0


def test_presets_and_explicit_settings():
    model = create_model("mhim_transmil", in_dim=8, preset="tcga", mask_ratio_l=0.1)
    assert model.settings == {"mask_ratio_r": 0.6, "mask_ratio_l": 0.1, "mask_ratio_h": 0.02,
                              "mask_ratio_hr": 1.0, "alpha": 0.5, "momentum_schedule": False}
    c16 = create_model("mhim_abmil", in_dim=8).settings
    assert (c16["mask_ratio_r"], c16["mask_ratio_l"], c16["mask_ratio_h"], c16["mask_ratio_hr"], c16["alpha"]) \
        == (0.5, 0.0, 0.01, 0.5, 0.1)
    assert create_model("mhim_abmil", in_dim=8, preset=None).settings["alpha"] == 0.0
    with pytest.raises(ValueError, match="preset must be one of camelyon16, tcga, null, got 'c17'"):
        create_model("mhim_abmil", in_dim=8, preset="c17")
    with pytest.raises(ValueError, match="mask_attention"):
        create_model("mhim_transmil", in_dim=8, mask_attention="median")


def test_training_step_uses_teacher_attention_and_decays_high_ratio():
    torch.manual_seed(0)
    base = create_model("abmil", in_dim=8)
    model = create_model("mhim_abmil", in_dim=8, mask_ratio_r=0.0, mask_ratio_h=0.2, mask_ratio_hr=1.0)
    model.init_from_checkpoint({"model": "abmil", "model_kwargs": {}, "state_dict": base.state_dict()})
    model.train()
    assert not model.teacher.training
    x, y = torch.randn(1, 40, 8), torch.tensor([1])
    loss_fn = lambda logits, labels: torch.nn.functional.cross_entropy(logits, labels)  # noqa: E731
    loss = model.training_step(x, None, y, loss_fn, step=0, total_steps=10)
    assert model.last_step["ratio_h"] == pytest.approx(0.2) and model.last_step["kept"] == 40 - 8
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    model.training_step(x, None, y, loss_fn, step=9, total_steps=10)
    assert model.last_step["ratio_h"] == 0.0 and model.last_step["kept"] == 40
    # Student starts from the baseline's projection only.
    torch.testing.assert_close(model.student.project[0].weight, base.project[0].weight)
    assert not torch.equal(model.student.pool.V.weight, base.pool.V.weight)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    data = write_dataset(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("abmil")
    train.train_fold(data["features"], data["splits"], 0, train.Recipe("abmil", {}, {**FAST, "epochs": 3}, 0),
                     str(out), device="cpu", num_threads=1)
    return data, out


def test_mhim_trains_from_baseline(base_run, tmp_path):
    data, base_out = base_run
    settings = {"preset": "tcga", "mask_ratio_h": 0.1}
    recipe = train.Recipe("mhim_abmil", settings, {**FAST, "epochs": 3}, 0)
    summary = train.train_fold(data["features"], data["splits"], 0, recipe, str(tmp_path), device="cpu",
                               num_threads=1, init_checkpoint=str(base_out / "model.pt"))
    assert summary["model"] == "mhim_abmil" and summary["test_auc"] is not None
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history.columns) == ["epoch", "train_loss", "val_loss", "val_auc", "lr"]
    slides = pd.read_csv(tmp_path / "predictions_slides.csv")
    assert list(slides.columns) == ["slide_id", "patient_id", "label", "partition", "prob"]
    assert (tmp_path / "predictions_patients.csv").is_file()

    base = torch.load(base_out / "model.pt", weights_only=True)
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    # Same standardisation as the teacher was trained with.
    torch.testing.assert_close(ckpt["feature_mean"], base["feature_mean"])
    torch.testing.assert_close(ckpt["feature_std"], base["feature_std"])
    # EMA moved the teacher away from the baseline, but only slightly (m = 0.9999 or more).
    old = torch.cat([v.flatten() for v in base["state_dict"].values()])
    new = torch.cat([ckpt["state_dict"][f"teacher.{k}"].flatten() for k in base["state_dict"]])
    assert 0 < (new - old).norm() <= 1e-3 * old.norm()
    changed = sum(int(not torch.equal(ckpt["state_dict"][f"teacher.{k}"], v)) for k, v in base["state_dict"].items())
    assert changed == len(base["state_dict"])

    # The saved student reproduces the saved predictions.
    model = create_model("mhim_abmil", ckpt["in_dim"], **ckpt["model_kwargs"]).eval()
    model.load_state_dict(ckpt["state_dict"])
    row = slides.iloc[0]
    from slidemil.files import read_h5
    x = torch.from_numpy(read_h5(data["features"][row["slide_id"]], names=("features",))[0]["features"].astype(np.float32))
    x = (x - ckpt["feature_mean"]) / ckpt["feature_std"]
    with torch.no_grad():
        prob = torch.softmax(model.student(x[None])["logits"], 1)[0, 1].item()
    assert prob == pytest.approx(row["prob"], abs=1e-6)


def test_mhim_transmil_trains(base_run, tmp_path):
    data, _ = base_run
    base_out = tmp_path / "transmil"
    small = {"embed_dim": 32, "n_heads": 4}
    train.train_fold(data["features"], data["splits"], 0, train.Recipe("transmil", small, {**FAST, "epochs": 1}, 0),
                     str(base_out), device="cpu", num_threads=1)
    recipe = train.Recipe("mhim_transmil", {"base_kwargs": small}, {**FAST, "epochs": 2}, 0)
    summary = train.train_fold(data["features"], data["splits"], 0, recipe, str(tmp_path / "mhim"), device="cpu",
                               num_threads=1, init_checkpoint=str(base_out / "model.pt"))
    assert summary["epochs_run"] == 2
    assert pd.read_csv(tmp_path / "mhim" / "predictions_slides.csv")["prob"].between(0, 1).all()


def test_mhim_checkpoint_errors(base_run, tmp_path):
    data, base_out = base_run
    run = lambda model, **kw: train.train_fold(  # noqa: E731
        data["features"], data["splits"], kw.pop("fold", 0),
        train.Recipe(model, kw.pop("settings", {}), {**FAST, "epochs": 1}, 0), str(tmp_path), device="cpu",
        num_threads=1, **kw)
    with pytest.raises(ValueError, match="pass init_checkpoint"):
        run("mhim_abmil")
    with pytest.raises(ValueError, match="not fold 1"):
        run("mhim_abmil", fold=1, init_checkpoint=str(base_out / "model.pt"))
    with pytest.raises(ValueError, match="needs a 'transmil' checkpoint"):
        run("mhim_transmil", init_checkpoint=str(base_out / "model.pt"))
    with pytest.raises(ValueError, match="base_kwargs"):
        run("mhim_abmil", settings={"base_kwargs": {"attn_dim": 64}}, init_checkpoint=str(base_out / "model.pt"))
    with pytest.raises(ValueError, match="does not start from a checkpoint"):
        run("abmil", init_checkpoint=str(base_out / "model.pt"))


# --------------------------------------------------------------------------- DAG


def test_dag_trains_baseline_before_mhim(tmp_path):
    config = {"results": "results", "demo": {"n_patients": 16}, "splits": {"folds": 2},
              "mil": {"models": ["mhim_abmil"]}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake_cli(tmp_path, "--cores", "1", "-n", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = []  # (model, fold, inputs) in the order the dry run schedules them
    for block in proc.stdout.split("\nrule ")[1:]:
        if not block.startswith("train:"):
            continue
        fields = dict(line.strip().split(": ", 1) for line in block.splitlines()[1:] if ": " in line)
        wildcards = dict(w.split("=") for w in fields["wildcards"].split(", "))
        jobs.append((wildcards["model"], int(wildcards["fold"]), fields["input"]))
    assert sorted((m, f) for m, f, _ in jobs) == [("abmil", 0), ("abmil", 1), ("mhim_abmil", 0), ("mhim_abmil", 1)]
    order = [(m, f) for m, f, _ in jobs]
    for model, fold, inputs in jobs:
        if model == "mhim_abmil":
            assert f"train/resnet50_trunc/abmil/fold_{fold}/model.pt" in inputs
            assert order.index(("abmil", fold)) < order.index(("mhim_abmil", fold))
