"""Pathology foundation-model encoders, built with timm exactly as their model cards build them.

Weights are never downloaded: ``weights`` is a local file (.safetensors, .bin, .pth, .pt) or a Hugging Face
snapshot folder, loaded strictly; a file that does not fit fails with one line naming the encoder, the file and
the first mismatching key. ``random`` (seeded) builds the architecture untrained, for tests and dry runs.
What each card says about tiles, feature size, weights and licence is in ``slidemil.names.ENCODER_CARDS``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from slidemil.errors import WeightsError
from slidemil.names import ENCODER_CARDS, ENCODER_POOLS as POOLS
from slidemil.weights import WEIGHT_SUFFIXES, missing_weights, weights_files

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# H-optimus-0 and -1 were trained with their own normalisation (model card).
BIOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
BIOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
# POOLS, how a ViT's tokens become one vector: the model's own head (its global_pool), the class token, the mean
# of the patch tokens (registers left out), or both concatenated (Virchow's 2 x width).
# timm layers the cards pass as classes; named here so that specs (and the config) stay plain data.
_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    arch: str                   # timm architecture, built with pretrained=False
    kwargs: dict                # the card's timm.create_model keyword arguments
    pool: str = "model"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    convert: Callable[[dict], dict] | None = field(default=None, compare=False)  # the card's keys -> timm's

    @property
    def dim(self) -> int:
        card = ENCODER_CARDS.get(self.name)
        return card.dim if card else encoder_dim(self)


def _hf_dinov2_to_timm(state: dict) -> dict:
    """Hugging Face ``Dinov2Model`` keys (Phikon-v2's files) -> timm VisionTransformer keys; timm keys pass."""
    if not any(k.startswith("embeddings.") for k in state):
        return state
    renames = {"norm1.": "norm1.", "norm2.": "norm2.", "attention.output.dense.": "attn.proj.",
               "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
               "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}
    top = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    out, qkv = {}, {}
    for key, value in state.items():
        block = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", key)
        attn = block and re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", block[2])
        if attn:
            qkv.setdefault((block[1], attn[2]), {})[attn[1]] = value
        elif block and any(block[2].startswith(old) for old in renames):
            old = next(o for o in renames if block[2].startswith(o))
            out[f"blocks.{block[1]}.{renames[old]}{block[2][len(old):]}"] = value
        elif key != "embeddings.mask_token":   # only used in pre-training
            out[top.get(key, key)] = value
    for (i, kind), parts in qkv.items():
        if len(parts) == 3:
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


ENCODERS = {spec.name: spec for spec in (
    EncoderSpec("uni", "vit_large_patch16_224", dict(
        img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)),
    EncoderSpec("uni2_h", "vit_giant_patch14_224", dict(
        img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
        mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, reg_tokens=8, dynamic_img_size=True,
        **_SWIGLU)),
    EncoderSpec("virchow2", "vit_huge_patch14_224", dict(
        img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375, global_pool="",
        dynamic_img_size=True, **_SWIGLU), pool="cls_mean"),
    EncoderSpec("h_optimus_0", "vit_giant_patch14_reg4_dinov2", dict(
        num_classes=0, img_size=224, global_pool="token", init_values=1e-5, dynamic_img_size=False),
        mean=BIOPTIMUS_MEAN, std=BIOPTIMUS_STD),
    EncoderSpec("h_optimus_1", "vit_giant_patch14_reg4_dinov2", dict(
        num_classes=0, img_size=224, global_pool="token", init_values=1e-5, dynamic_img_size=False),
        mean=BIOPTIMUS_MEAN, std=BIOPTIMUS_STD),
    # The card's config: the DINOv2 giant with 16 px patches at 224 px.
    EncoderSpec("gigapath", "vit_giant_patch14_dinov2", dict(
        img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
        mlp_ratio=5.33334, num_classes=0)),
    # A transformers Dinov2Model (ViT-L/16, layer scale, no registers): its class token, after the final norm.
    EncoderSpec("phikon_v2", "vit_large_patch16_224", dict(
        img_size=224, init_values=1e-5, num_classes=0, global_pool="token"), convert=_hf_dinov2_to_timm),
    EncoderSpec("dinov2_vits14", "vit_small_patch14_dinov2", dict(img_size=224, num_classes=0)),
)}
assert set(ENCODERS) == set(ENCODER_CARDS), "slidemil.names.ENCODER_CARDS must list every encoder"


class Encoder(nn.Module):
    """A timm ViT and how its tokens become one feature vector (``POOLS``)."""

    def __init__(self, vit: nn.Module, pool: str = "model"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool {pool!r}; allowed: {', '.join(POOLS)}")
        self.vit, self.pool = vit, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "model":
            return self.vit(x)
        tokens = self.vit.forward_features(x)
        cls, patches = tokens[:, 0], tokens[:, getattr(self.vit, "num_prefix_tokens", 1):]
        if self.pool == "cls":
            return cls
        if self.pool == "mean":
            return patches.mean(1)
        return torch.cat([cls, patches.mean(1)], dim=-1)


def build_vit(arch: str, kwargs: dict) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, **kwargs)``, layer names resolved to timm's classes."""
    import timm

    if arch.startswith(("hf-hub:", "hf_hub:")):
        raise WeightsError(f"timm architecture {arch!r} would download; name the architecture (e.g. "
                           "vit_large_patch16_224) and give the local weights file as weights")
    kw = dict(kwargs)
    for key in ("mlp_layer", "act_layer"):
        if isinstance(kw.get(key), str):
            kw[key] = getattr(timm.layers, kw[key], None) or getattr(nn, kw[key])
    return timm.create_model(arch, pretrained=False, **kw)


def create_encoder(spec: EncoderSpec, weights: str, seed: int = 0) -> Encoder:
    """The encoder in eval mode: untrained (``random``, seeded) or with the local ``weights``, loaded strictly."""
    if weights == "random":
        torch.manual_seed(seed)
        return Encoder(build_vit(spec.arch, spec.kwargs), spec.pool).eval()
    if weights in ("imagenet", "simclr"):
        raise WeightsError(f"{spec.name}: weights {weights!r} are for the torchvision extractors; give the local "
                           f"weights file of {spec.name} (or 'random')")
    problem = missing_weights(spec.name, weights)
    if problem:
        raise FileNotFoundError(problem)
    state = read_state_dict(spec.name, weights)
    state = spec.convert(state) if spec.convert else state
    with torch.device("meta"):   # no time spent initialising a billion weights that the file replaces
        vit = build_vit(spec.arch, spec.kwargs)
    check_fits(spec.name, weights, vit, state)
    vit.load_state_dict(state, strict=True, assign=True)
    return Encoder(vit.float(), spec.pool).eval()


def read_state_dict(name: str, weights: str) -> dict:
    """Every tensor of the weights file(s), a checkpoint's ``state_dict``/``model`` unwrapped."""
    state = {}
    for file in weights_files(weights):
        suffix = Path(file).suffix
        if suffix not in WEIGHT_SUFFIXES:
            raise WeightsError(f"{name}: {file}: unknown weights format {suffix!r}; "
                               f"allowed: {', '.join(WEIGHT_SUFFIXES)} or a snapshot folder")
        try:
            if suffix == ".safetensors":
                from safetensors.torch import load_file
                part = load_file(file)
            else:
                part = _torch_load(file)
        except Exception as err:  # pickle, zip or safetensors header errors: all mean "not this format"
            first = (str(err).strip().splitlines() or [""])[0]
            # torch's own first line is a paragraph about weights_only: the error type says more
            detail = first if first and len(first) <= 120 and "weights_only" not in first else type(err).__name__
            raise WeightsError(f"{name}: {file} is not a readable {suffix} weights file ({detail}); expected "
                               f"a state dict saved with torch.save or safetensors") from err
        for key in ("state_dict", "model"):
            if isinstance(part, dict) and isinstance(part.get(key), dict):
                part = part[key]
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise WeightsError(f"{name}: {file} holds a {type(part).__name__}, not a state dict of tensors")
        state.update(part)
    return state


def _torch_load(file: str):
    """torch.load memory-mapped (a giant's 4 GB are paged in as read, not copied first); files in the legacy
    (pre-zip) format cannot be mapped and are read whole."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err) and "zip" not in str(err):
            raise
        return torch.load(file, map_location="cpu", weights_only=True)


def check_fits(name: str, weights: str, model: nn.Module, state: dict) -> None:
    """One line for the first key (in the model's order, then the file's extras) that is missing, extra or of
    another shape."""
    expected = model.state_dict()
    for key in [*expected, *sorted(state.keys() - expected.keys())]:
        if key not in state:
            problem = "missing from the file"
        elif key not in expected:
            problem = "in the file but not in the model"
        elif tuple(state[key].shape) != tuple(expected[key].shape):
            problem = f"shape {tuple(state[key].shape)} in the file, {tuple(expected[key].shape)} in the model"
        else:
            continue
        raise WeightsError(f"{name}: {weights} does not fit the model card's architecture: first mismatching key "
                           f"{key!r} ({problem}); {len(state)} tensors in the file, {len(expected)} in the model")


def encoder_dim(spec: EncoderSpec) -> int:
    """The feature size, from a forward pass on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        model = Encoder(build_vit(spec.arch, spec.kwargs), spec.pool)
        px = spec.kwargs.get("img_size", 224)
        return int(model(torch.empty(1, 3, px, px)).shape[-1])
