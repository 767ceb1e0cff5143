"""The MIL model registry and the model contract, checked for every registered model."""

import numpy as np
import pytest
import torch

from slidemil.mil import models
from slidemil.mil.models import create_model, list_models, register_model
from factories import ROOT

IN_DIM = 12
SMALL = {"embed_dim": 16, "attn_dim": 8}  # keeps the abmil family tiny; other models use defaults


def build(name, n_classes=2, seed=0):
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in SMALL.items() if k in models.model_kwargs_defaults(name)}
    return create_model(name, in_dim=IN_DIM, n_classes=n_classes, **kwargs).eval()


def padded(bags):
    """Zero-pad a list of [N_i, D] bags to [B, max N, D] with a mask."""
    n_max = max(len(b) for b in bags)
    x = torch.zeros(len(bags), n_max, IN_DIM)
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    return x, mask


@pytest.fixture
def bags():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, IN_DIM, generator=g) for n in (7, 3, 5)]


ORDER_INVARIANT = ["abmil", "abmil_gated", "varmil", "meanpool", "maxpool"]


def test_registry_lists_model_zoo():
    assert {"abmil", "abmil_gated", "meanpool", "maxpool", "varmil", "transmil", "mhim_abmil", "mhim_transmil"} \
        <= set(list_models())


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("n_classes", [2, 3])
def test_output_shapes_and_finite(name, n_classes, bags):
    x, mask = padded(bags)
    out = build(name, n_classes)(x, mask)
    assert out["logits"].shape == (3, n_classes)
    assert out["embedding"].ndim == 2 and out["embedding"].shape[0] == 3
    assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["embedding"]).all()
    if out["attention"] is not None:
        assert out["attention"].shape == (3, x.shape[1])
        assert torch.isfinite(out["attention"]).all()


@pytest.mark.parametrize("name", list_models())
def test_attention_normalised_and_zero_at_padding(name, bags):
    x, mask = padded(bags)
    attention = build(name)(x, mask)["attention"]
    if attention is None:
        pytest.skip(f"{name} has no attention")
    torch.testing.assert_close(attention.sum(dim=1), torch.ones(3))
    assert (attention[~mask] == 0).all()
    assert (attention[mask] > 0).all()


@pytest.mark.parametrize("name", list_models())
def test_padding_does_not_change_outputs(name, bags):
    model = build(name)
    x, mask = padded(bags)
    batched = model(x, mask)
    for i, bag in enumerate(bags):
        alone = model(bag.unsqueeze(0), None)
        torch.testing.assert_close(batched["logits"][i], alone["logits"][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched["embedding"][i], alone["embedding"][0], atol=1e-5, rtol=1e-5)
        if alone["attention"] is not None:
            n = len(bag)
            torch.testing.assert_close(batched["attention"][i, :n], alone["attention"][0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list_models())
def test_mask_none_equals_all_true(name, bags):
    model = build(name)
    x = bags[0].unsqueeze(0)
    torch.testing.assert_close(model(x, None)["logits"], model(x, torch.ones(1, len(bags[0]), dtype=torch.bool))["logits"])


@pytest.mark.parametrize("name", list_models())
def test_ignores_padding_content(name, bags):
    model = build(name)
    x, mask = padded(bags)
    noisy = x.clone()
    noisy[~mask] = 100.0 * torch.randn(int((~mask).sum()), IN_DIM)
    torch.testing.assert_close(model(noisy, mask)["logits"], model(x, mask)["logits"])


@pytest.mark.parametrize("name", ORDER_INVARIANT)
def test_invariant_to_instance_order(name, bags):
    model = build(name)
    bag = bags[0]
    perm = torch.randperm(len(bag), generator=torch.Generator().manual_seed(3))
    out, shuffled = model(bag.unsqueeze(0)), model(bag[perm].unsqueeze(0))
    torch.testing.assert_close(shuffled["logits"], out["logits"], atol=1e-6, rtol=1e-5)
    if out["attention"] is not None:
        torch.testing.assert_close(shuffled["attention"][0], out["attention"][0, perm])


def test_transmil_depends_on_instance_order(bags):
    # The positional encoding makes the order matter: the other side of the test above.
    model = build("transmil")
    bag = torch.cat(bags)
    perm = torch.randperm(len(bag), generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(model(bag[perm][None])["logits"], model(bag[None])["logits"], atol=1e-5)


@pytest.mark.parametrize("name", list_models())
def test_single_instance_and_all_padding_rows_are_safe(name, bags):
    model = build(name).train()
    x, mask = padded(bags)
    mask[1] = False
    mask[2, 1:] = False
    out = model(x, mask)
    assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["embedding"]).all()
    out["logits"].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["abmil", "abmil_gated"])
def test_abmil_all_padding_row_is_safe(name, bags):
    model = build(name).train()
    x, mask = padded(bags)
    mask[1] = False
    out = model(x, mask)
    assert torch.isfinite(out["logits"]).all()
    assert (out["attention"][1] == 0).all()
    out["logits"].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_abmil_defaults_and_architecture():
    model = create_model("abmil", in_dim=1024)
    assert models.model_kwargs_defaults("abmil") == {"embed_dim": 512, "attn_dim": 128, "dropout": 0.25, "n_layers": 1}
    assert model.project[0].out_features == 512 and model.project[2].p == 0.25
    assert model.pool.V.out_features == 128 and model.pool.U is None
    assert create_model("abmil_gated", in_dim=1024).pool.U.out_features == 128
    out = model(torch.randn(2, 4, 1024))
    assert out["embedding"].shape == (2, 512) and out["logits"].shape == (2, 2)


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match="unknown MIL model 'nope'.*abmil"):
        create_model("nope", in_dim=IN_DIM)


def test_unknown_kwarg_names_model_and_argument():
    with pytest.raises(TypeError, match="'abmil_gated'.*hidden_dim"):
        create_model("abmil_gated", in_dim=IN_DIM, hidden_dim=3)


def test_register_new_model(monkeypatch):
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))

    @register_model("toy")
    def toy(in_dim, n_classes=2, width=4):
        return torch.nn.Linear(in_dim, width)

    assert "toy" in list_models()
    assert create_model("toy", in_dim=3, width=5).out_features == 5
    with pytest.raises(ValueError, match="already registered"):
        register_model("toy")(toy)


def test_varmil_matches_numpy(bags):
    model = build("varmil")
    bag = bags[0]
    out = model(bag[None])
    with torch.no_grad():
        h = model.project(bag).double().numpy()
    a = out["attention"][0].detach().double().numpy()
    n, e = h.shape
    assert out["embedding"].shape == (1, 2 * e)
    mean = (a[:, None] * h).sum(0)
    var = n / (n - 1) * (a[:, None] * (h - mean) ** 2).sum(0)
    np.testing.assert_allclose(out["embedding"][0, :e].detach().numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["embedding"][0, e:].detach().numpy(), var, rtol=1e-5, atol=1e-6)
    w, b = model.classifier.weight.detach().double().numpy(), model.classifier.bias.detach().double().numpy()
    np.testing.assert_allclose(out["logits"][0].detach().numpy(), w @ np.concatenate([mean, var]) + b, rtol=1e-5, atol=1e-5)


def test_varmil_single_instance_has_zero_variance(bags):
    out = create_model("varmil", in_dim=IN_DIM).eval()(bags[0][:1][None])  # DeepSMILE: no projection
    assert out["embedding"].shape == (1, 2 * IN_DIM)
    assert (out["embedding"][0, IN_DIM:] == 0).all() and torch.isfinite(out["logits"]).all()


def test_varmil_nonzero_count_differs_only_on_underflow(bags):
    real = create_model("varmil", in_dim=IN_DIM).eval()
    nonzero = create_model("varmil", in_dim=IN_DIM, variance_n="nonzero").eval()
    nonzero.load_state_dict(real.state_dict())
    x = bags[0][None]
    torch.testing.assert_close(real(x)["embedding"], nonzero(x)["embedding"])
    with pytest.raises(ValueError, match="variance_n"):
        create_model("varmil", in_dim=IN_DIM, variance_n="all")


def test_pooling_baselines_match_direct_pooling(bags):
    x, mask = padded(bags)
    for name, pool in (("meanpool", lambda h: h.mean(0)), ("maxpool", lambda h: h.amax(0))):
        model = build(name)
        out = model(x, mask)
        for i, bag in enumerate(bags):
            with torch.no_grad():
                expected = pool(model.project(bag))
            torch.testing.assert_close(out["embedding"][i], expected)


def test_transmil_head_attention(bags):
    model = create_model("transmil", in_dim=IN_DIM, embed_dim=32, n_heads=4).eval()
    x, mask = padded(bags)
    out = model(x, mask)
    heads = out["head_attention"]
    assert heads.shape == (3, 4, x.shape[1])
    assert (heads.permute(0, 2, 1)[~mask] == 0).all()
    torch.testing.assert_close(heads.sum(-1), torch.ones(3, 4))
    torch.testing.assert_close(out["attention"], heads.mean(1))
    alone = model(bags[1][None])["head_attention"][0]
    torch.testing.assert_close(heads[1, :, : len(bags[1])], alone, atol=1e-6, rtol=1e-5)


def test_transmil_defaults():
    model = create_model("transmil", in_dim=1024)
    assert model.project[0].out_features == 512 and model.layer1.n_heads == 8
    assert [c.kernel_size for c in (model.ppeg.proj7, model.ppeg.proj5, model.ppeg.proj3)] == [(7, 7), (5, 5), (3, 3)]
    # A bag larger than the minimum 7 x 7 grid, padded to the next square.
    out = model(torch.randn(1, 70, 1024))
    assert out["logits"].shape == (1, 2) and torch.isfinite(out["logits"]).all()


def test_config_settings_build_every_model():
    import yaml

    settings = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["mil"]["settings"]
    assert {"meanpool", "maxpool", "varmil", "transmil", "mhim_abmil", "mhim_transmil"} <= set(settings)
    # tile_supervised trains a CNN on tiles (slidemil.pretrain.tile_supervised), not a MIL model on features.
    for name, kwargs in settings.items():
        if name == "tile_supervised":
            continue
        kwargs = dict(kwargs)
        if name.startswith("mhim_"):
            kwargs["base_kwargs"] = settings[name[len("mhim_"):]]
        assert isinstance(create_model(name, in_dim=IN_DIM, **kwargs), torch.nn.Module)
