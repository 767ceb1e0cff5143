"""Issue 22: pathology foundation-model encoders from local weights; issue 21 item 4: a replaced weights file
reruns extraction and what depends on it, not tiling or splits.

Giants are only built on the meta device (no memory, no compute): their parameter names and shapes must be those
of the model card's own timm construction, written out here as the cards write them. The small DINOv2 ViT-S/14
and a tiny generic timm ViT run for real.
"""

import hashlib
import shutil

import h5py
import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from factories import TINY_SHEET_CONFIG, job_counts, make_tiny_cohort, snakemake_cli
from slidemil.config import ConfigError, check_config
from slidemil.demo.render import make_slide
from slidemil.errors import WeightsError
from slidemil.features.encoders import ENCODERS, Encoder, _hf_dinov2_to_timm, build_vit, encoder_dim
from slidemil.features.extract import extract_features
from slidemil.features.extractors import create_extractor, get_spec
from slidemil.mil.models import create_model, list_models
from slidemil.names import ENCODER_CARDS
from slidemil.tiling.tile import tile_slide

SWIGLU = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}
# Each card's construction, as the card (or TRIDENT's loader for local weights) writes it.
CARD_BUILDS = {
    "uni": lambda: timm.create_model("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5,
                                     num_classes=0, dynamic_img_size=True),
    "uni2_h": lambda: timm.create_model(
        "vit_giant_patch14_224", pretrained=False, img_size=224, patch_size=14, depth=24, num_heads=24,
        init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True,
        reg_tokens=8, dynamic_img_size=True, **SWIGLU),
    "virchow2": lambda: timm.create_model(
        "vit_huge_patch14_224", img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375,
        global_pool="", dynamic_img_size=True, **SWIGLU),
    "h_optimus_0": lambda: timm.create_model("vit_giant_patch14_reg4_dinov2", num_classes=0, img_size=224,
                                             global_pool="token", init_values=1e-5, dynamic_img_size=False),
    "h_optimus_1": lambda: timm.create_model("vit_giant_patch14_reg4_dinov2", num_classes=0, img_size=224,
                                             global_pool="token", init_values=1e-5, dynamic_img_size=False),
    "gigapath": lambda: timm.create_model("vit_giant_patch14_dinov2", img_size=224, in_chans=3, patch_size=16,
                                          embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
                                          mlp_ratio=5.33334, num_classes=0),
    "phikon_v2": lambda: timm.create_model("vit_large_patch16_224", img_size=224, init_values=1e-5, num_classes=0),
    "dinov2_vits14": lambda: timm.create_model("vit_small_patch14_dinov2", img_size=224, num_classes=0),
}
# Parameters (millions) the cards and papers state: catches a construction that is wrong in both places.
CARD_PARAMS_M = {"uni": 303, "uni2_h": 681, "virchow2": 631, "h_optimus_0": 1135, "h_optimus_1": 1135,
                 "gigapath": 1135, "phikon_v2": 303, "dinov2_vits14": 22}


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_every_encoder_has_a_card_construction():
    assert set(CARD_BUILDS) == set(ENCODERS) == set(ENCODER_CARDS) == set(CARD_PARAMS_M)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_registry_builds_the_cards_architecture(name):
    spec = ENCODERS[name]
    with torch.device("meta"):
        ours, card = build_vit(spec.arch, spec.kwargs), CARD_BUILDS[name]()
    assert _shapes(ours) == _shapes(card)
    assert round(sum(p.numel() for p in ours.parameters()) / 1e6) == pytest.approx(CARD_PARAMS_M[name], abs=1)
    # the documented feature size, from a forward pass on the meta device
    assert encoder_dim(spec) == ENCODER_CARDS[name].dim == get_spec(name).dim


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    d = tmp_path_factory.mktemp("enc")
    slide = d / "s.tiff"
    make_slide(str(slide), label=1, seed=3, slide_px=(1024, 1024))
    tile_slide(str(slide), str(d / "tiles.h5"), None, {"tile_px": 112, "mpp": 1.0})
    return d


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    """A randomly initialised DINOv2 ViT-S/14 saved as .safetensors, .bin and a snapshot folder."""
    d = tmp_path_factory.mktemp("w")
    model, _ = create_extractor("dinov2_vits14", "random", seed=4)
    state = {k: v.contiguous() for k, v in model.vit.state_dict().items()}
    save_file(state, d / "model.safetensors")
    torch.save(state, d / "pytorch_model.bin")
    (d / "snapshot").mkdir()
    shutil.copy(d / "model.safetensors", d / "snapshot" / "model.safetensors")
    (d / "snapshot" / "config.json").write_text("{}")
    return d, model


@pytest.mark.parametrize("file", ["model.safetensors", "pytorch_model.bin", "snapshot"])
def test_small_encoder_loads_strictly_and_extracts_its_dim(tiled, small_weights, file):
    d, random_model = small_weights
    out = tiled / f"{file}.h5"
    info = extract_features(None, str(tiled / "tiles.h5"), str(out), "dinov2_vits14", str(d / file),
                            input_px=224, batch_size=4)
    with h5py.File(out) as f:
        feats, attrs = f["features"][()], dict(f.attrs)
    assert info["n_tiles"] >= 2 and feats.shape == (info["n_tiles"], 384) and np.isfinite(feats).all()
    # the file's sha256, as sha256sum (and Hugging Face) give it
    assert attrs["weights_sha256"] == hashlib.sha256((d / "model.safetensors" if file == "snapshot"
                                                      else d / file).read_bytes()).hexdigest()
    assert attrs["weights_digest"] == attrs["weights_sha256"][:16]
    # the loaded network is the saved one: same features as the random model it came from
    x = torch.rand(2, 3, 224, 224)
    loaded, _ = create_extractor("dinov2_vits14", str(d / file))
    with torch.inference_mode():
        assert torch.allclose(loaded(x), random_model(x), atol=1e-5)


def test_legacy_torch_format_and_wrapped_state_dict_load(small_weights, tmp_path):
    d, random_model = small_weights
    state = torch.load(d / "pytorch_model.bin", weights_only=True)
    torch.save({"model": state}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    loaded, _ = create_extractor("dinov2_vits14", str(tmp_path / "legacy.pth"))
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(loaded(x), random_model(x), atol=1e-5)


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_mismatched_weights_name_encoder_file_and_first_key(small_weights, tmp_path):
    d, _ = small_weights
    with pytest.raises(WeightsError) as err:   # a ViT-S/14 file given to UNI (ViT-L/16)
        create_extractor("uni", str(d / "model.safetensors"))
    text = _one_line(err)
    assert text.startswith(f"uni: {d / 'model.safetensors'} does not fit") and "'cls_token'" in text
    state = torch.load(d / "pytorch_model.bin", weights_only=True)
    state.pop("blocks.3.attn.qkv.weight")
    state["head.weight"] = torch.zeros(2, 384)
    torch.save(state, tmp_path / "cut.bin")
    with pytest.raises(WeightsError) as err:
        create_extractor("dinov2_vits14", str(tmp_path / "cut.bin"))
    assert "first mismatching key 'blocks.3.attn.qkv.weight' (missing from the file)" in _one_line(err)


def test_missing_file_says_where_the_card_is(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        create_extractor("virchow2", str(tmp_path / "virchow2.bin"))
    text = _one_line(err)
    assert "https://huggingface.co/paige-ai/Virchow2" in text and "features.settings.virchow2.weights" in text
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weights file"):
        create_extractor("uni", str(tmp_path / "empty"))


def test_wrong_format_is_one_line(tmp_path):
    (tmp_path / "w.bin").write_text("not a checkpoint")
    with pytest.raises(WeightsError) as err:
        create_extractor("dinov2_vits14", str(tmp_path / "w.bin"))
    assert _one_line(err).startswith(f"dinov2_vits14: {tmp_path / 'w.bin'} is not a readable .bin weights file")
    (tmp_path / "w.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(WeightsError):
        create_extractor("dinov2_vits14", str(tmp_path / "w.safetensors"))
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(WeightsError, match="unknown weights format '.txt'"):
        create_extractor("dinov2_vits14", str(tmp_path / "w.txt"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="holds a list, not a state dict"):
        create_extractor("dinov2_vits14", str(tmp_path / "list.pt"))


def test_generic_timm_extractor(tmp_path, tiled):
    options = {"arch": "vit_tiny_patch16_224", "timm_kwargs": {"img_size": 64}, "pool": "cls_mean",
               "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    model, _ = create_extractor("timm", "random", seed=0, options=options)
    save_file(dict(model.vit.state_dict()), tmp_path / "tiny.safetensors")
    assert get_spec("timm", options).dim == 2 * 192
    info = extract_features(None, str(tiled / "tiles.h5"), str(tmp_path / "f.h5"), "timm",
                            str(tmp_path / "tiny.safetensors"), input_px=64, options=options)
    assert info["dim"] == 384
    with pytest.raises(WeightsError, match="would download"):
        create_extractor("timm", "random", options={"arch": "hf-hub:MahmoodLab/UNI"})


def test_phikon_v2_hugging_face_keys_convert_to_timm():
    with torch.device("meta"):
        vit = timm.create_model("vit_large_patch16_224", img_size=224, init_values=1e-5, num_classes=0, depth=2)
    ours = vit.state_dict()
    hf = {"embeddings.mask_token": torch.zeros(1, 1024)}
    names = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
             "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
             "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
             "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    for key, value in ours.items():
        if ".attn.qkv." in key:
            i, kind = key.split(".")[1], key.rsplit(".", 1)[1]
            for part, chunk in zip(("query", "key", "value"), torch.empty_like(value, device="cpu").chunk(3)):
                hf[f"encoder.layer.{i}.attention.attention.{part}.{kind}"] = chunk
        elif key.startswith("blocks."):
            i, rest = key.split(".", 2)[1:]
            rest = (rest.replace("attn.proj.", "attention.output.dense.").replace("ls1.gamma", "layer_scale1.lambda1")
                    .replace("ls2.gamma", "layer_scale2.lambda1"))
            hf[f"encoder.layer.{i}.{rest}"] = torch.empty(value.shape)
        else:
            hf[names[key]] = torch.empty(value.shape)
    assert _shapes_of(_hf_dinov2_to_timm(hf)) == {k: tuple(v.shape) for k, v in ours.items()}


def _shapes_of(state):
    return {k: tuple(v.shape) for k, v in state.items()}


# ---- config -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("features, tiling, message", [
    ({"uni": {"weights": "u.bin", "input_px": 256, "dtype": "float32"}}, {},
     "config: features.settings.uni.input_px: 256 differs from the 224 px of uni's model card; allowed: 224"),
    ({"uni": {"weights": "u.bin", "input_px": 224, "dtype": "float32"}}, {"mpp": 1.0},
     "config: tiling.mpp: uni would see tiles at 1.14 um/px"),
    ({"timm": {"weights": "t.bin", "input_px": 224, "dtype": "float32"}}, {},
     "config: features.settings.timm.arch: missing"),
    ({"uni": {"weights": "u.bin", "input_px": 224, "dtype": "float32", "pool": "cls"}}, {},
     "config: features.settings.uni.pool: is a setting of the timm extractor only"),
])
def test_encoder_settings_are_checked(features, tiling, message):
    name = next(iter(features))
    with pytest.raises(ConfigError) as err:
        check_config({"features": {"extractors": [name], "settings": features}, "tiling": tiling})
    assert str(err.value).startswith(message)


# ---- issue 22 item 3: every MIL model on the encoders' feature sizes ------------------------------------------


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("dim", [384, 1536, 2560])
def test_every_mil_model_takes_any_feature_dim(name, dim):
    torch.manual_seed(0)
    model = create_model(name, in_dim=dim, n_classes=2).eval()
    x, mask = torch.randn(2, 9, dim), torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.inference_mode():
        out = model(x, mask)
    assert out["logits"].shape == (2, 2) and torch.isfinite(out["logits"]).all()


# ---- issue 21 item 4: a replaced weights file reruns extraction, not tiling or splits --------------------------


@pytest.mark.workflow
def test_replacing_the_weights_file_reruns_extraction_only(tmp_path):
    weights = tmp_path / "weights" / "shufflenet.pt"
    weights.parent.mkdir()
    torch.save(create_extractor("shufflenet_v2", "random", seed=1)[0].state_dict(), weights)
    config = yaml.safe_load(yaml.safe_dump(TINY_SHEET_CONFIG))
    config["samples"] = str(make_tiny_cohort(tmp_path / "cohort"))
    config["features"]["settings"]["shufflenet_v2"]["weights"] = str(weights)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake_cli(tmp_path, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-5000:]
    feature_files = sorted((tmp_path / "results" / "features" / "shufflenet_v2").glob("*.h5"))
    with h5py.File(next(f for f in feature_files if "BAD" not in f.name)) as f:
        assert f.attrs["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    dry = snakemake_cli(tmp_path, "-n", "--cores", "2")
    assert job_counts(dry.stdout + dry.stderr) == {}
    # other weights, same path
    torch.save(create_extractor("shufflenet_v2", "random", seed=2)[0].state_dict(), weights)
    dry = snakemake_cli(tmp_path, "-n", "--cores", "2")
    counts = job_counts(dry.stdout + dry.stderr)
    assert counts.get("extract_features") == len(feature_files)
    assert {"feature_manifest", "train", "report"} <= counts.keys()
    assert not {"tile_slide", "tile_manifest", "splits"} & counts.keys()
    # a missing weights file stops the run before any job, with one line naming the file
    weights.unlink()
    proc = snakemake_cli(tmp_path, "-n", "--cores", "2")
    assert proc.returncode != 0 and f"config: weights of shufflenet_v2: not found: {weights}" in proc.stderr
