"""Registry of tile feature extractors: name -> a network giving one vector per tile.

Truncated torchvision CNNs: weights are ``imagenet`` (torchvision's published weights, downloaded once into
the torch cache), ``random`` (seeded, for offline demos and tests) or a path to a local file (a state dict of
the full torchvision model or of the truncated one, e.g. the cohort's own SimCLR backbone).
Pathology foundation models and any timm architecture (``timm``): see ``slidemil.features.encoders``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

from slidemil.errors import WeightsError
from slidemil.features.encoders import ENCODERS, IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, create_encoder
from slidemil.names import SIMCLR_EXTRACTORS, SIMCLR_WEIGHTS, TIMM_EXTRACTOR
from slidemil.weights import is_local, weights_sha256

_KNOWN_PREFIXES = ("module.", "backbone.", "encoder.", "model.")


@dataclass(frozen=True)
class ExtractorSpec:
    name: str
    dim: int
    build_full: Callable[[], nn.Module]      # the torchvision model, untrained
    imagenet_weights: Callable[[], object]   # torchvision weights enum member
    truncate: Callable[[nn.Module], nn.Module]
    dropped: tuple[str, ...]                 # top-level modules removed by truncation
    architecture: str = ""                   # as a user knows it ("ResNet-18"), for error messages
    mean: tuple = IMAGENET_MEAN              # the input normalisation its weights were trained with
    std: tuple = IMAGENET_STD


_REGISTRY: dict[str, ExtractorSpec] = {}


def register_extractor(spec: ExtractorSpec) -> ExtractorSpec:
    _REGISTRY[spec.name] = spec
    return spec


def list_extractors() -> list[str]:
    return sorted([*_REGISTRY, *ENCODERS, TIMM_EXTRACTOR])


def get_spec(name: str, options: dict | None = None) -> ExtractorSpec | EncoderSpec:
    """The spec of extractor ``name``; ``options`` are the generic ``timm`` extractor's settings (arch,
    timm_kwargs, mean, std, pool)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in ENCODERS:
        return ENCODERS[name]
    if name == TIMM_EXTRACTOR:
        return timm_spec(options or {})
    raise ValueError(f"unknown extractor {name!r}; known: {', '.join(list_extractors())}")


def timm_spec(options: dict) -> EncoderSpec:
    """Any timm architecture, its keyword arguments, normalisation and pooling from the settings."""
    if not options.get("arch"):
        raise WeightsError(f"{TIMM_EXTRACTOR}: features.settings.{TIMM_EXTRACTOR}.arch is missing; name a timm "
                           "architecture, e.g. vit_small_patch14_dinov2")
    kwargs = {"num_classes": 0, **(options.get("timm_kwargs") or {})}
    return EncoderSpec(TIMM_EXTRACTOR, options["arch"], kwargs, options.get("pool") or "model",
                       tuple(options.get("mean") or IMAGENET_MEAN), tuple(options.get("std") or IMAGENET_STD))


def _resnet50_trunc(m: nn.Module) -> nn.Module:
    # CLAM's truncation: layer4 and fc dropped, global average pooling after layer3 (1024-d).
    return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def _shufflenet_trunc(m: nn.Module) -> nn.Module:
    # DeepSMILE: backbone up to conv5, global average pooling (1024-d).
    return nn.Sequential(m.conv1, m.maxpool, m.stage2, m.stage3, m.stage4, m.conv5,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


register_extractor(ExtractorSpec(
    "resnet50_trunc", 1024,
    lambda: torchvision.models.resnet50(weights=None),
    lambda: torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    _resnet50_trunc, ("layer4", "fc"), "ResNet-50"))
register_extractor(ExtractorSpec(
    "shufflenet_v2", 1024,
    lambda: torchvision.models.shufflenet_v2_x1_0(weights=None),
    lambda: torchvision.models.ShuffleNet_V2_X1_0_Weights.IMAGENET1K_V1,
    _shufflenet_trunc, ("fc",), "ShuffleNetV2"))


def _resnet18_trunc(m: nn.Module) -> nn.Module:
    # DeepSMILE (TCGA-CRCk): the whole ResNet-18 up to global average pooling (512-d).
    return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


register_extractor(ExtractorSpec(
    "resnet18", 512,
    lambda: torchvision.models.resnet18(weights=None),
    lambda: torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    _resnet18_trunc, ("fc",), "ResNet-18"))

# SimCLR extractors share their architecture's spec under their own name; their
# weights setting "simclr" is resolved by the workflow to the cohort's backbone file.
for _name, _arch in SIMCLR_EXTRACTORS.items():
    register_extractor(dataclasses.replace(_REGISTRY[_arch], name=_name))


def create_extractor(name: str, weights: str = "imagenet", seed: int = 0,
                     options: dict | None = None) -> tuple[nn.Module, str]:
    """Build the extractor in eval mode; returns (model, digest of its weights)."""
    spec = get_spec(name, options)
    if isinstance(spec, EncoderSpec):
        model = create_encoder(spec, weights, seed)
        # A giant's tensors take seconds to hash per slide: a weights file's own sha256 names them as well.
        return model, weights_sha256(weights)[:16] if is_local(weights) else weights_digest(model)
    if weights == "random":
        torch.manual_seed(seed)  # every slide of a cohort must see the same random network
        full = variance_preserving_init(spec.build_full())
    elif weights == SIMCLR_WEIGHTS:
        raise ValueError(
            f"{name}: weights {SIMCLR_WEIGHTS!r} stands for the cohort's SimCLR backbone, which the workflow "
            "resolves to a file; outside it, pass the path of a backbone.pt written by slidemil.pretrain.simclr")
    elif weights == "imagenet":
        full = spec.build_full()
        full.load_state_dict(_download_imagenet(spec))
    else:
        full = spec.build_full()
        _load_local(spec, full, weights)
    model = spec.truncate(full).eval()
    return model, weights_digest(model)


def variance_preserving_init(model: nn.Module) -> nn.Module:
    """He (fan-in) init for every convolution, identity batch norms.

    PyTorch's default conv init shrinks activations layer by layer; through a
    deep random network (BN in eval mode is the identity) features end up near
    1e-6 and carry no usable signal. He init keeps them at unit scale.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def _download_imagenet(spec: ExtractorSpec) -> dict:
    enum = spec.imagenet_weights()
    try:
        return enum.get_state_dict(progress=False)
    except Exception as err:  # no network, proxy, disk: all end the same for the user
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise WeightsError(
            f"could not download torchvision's ImageNet weights for {spec.name} ({reason}); on a machine with "
            f"internet download {enum.url}, copy it here and set the extractor's weights to that file's path"
        ) from err


def _load_local(spec: ExtractorSpec, full: nn.Module, path: str) -> None:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"weights file for {spec.name} not found: {file}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike: not a file of weights
        raise WeightsError(f"{file}: cannot be read as PyTorch weights ({type(err).__name__}); "
                           f"pass a state dict of {_title(spec)} saved with torch.save") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{file}: expected a state dict (or a dict with 'state_dict'), got {type(state).__name__}")
    raw = {_strip_prefix(k): v for k, v in state.items()}
    state = _as_full_keys(spec, full, raw)
    if not _fits(spec, full, state):
        other = next((s for s in _architectures() if s.build_full is not spec.build_full
                      and _fits(s, s.build_full(), _as_full_keys(s, s.build_full(), raw))), None)
        holds = f"{_title(other)}'s weights" if other else "no weights of an extractor slidemil knows"
        raise WeightsError(f"{file}: does not fit {spec.name}: this file holds {holds}, not {_title(spec)}'s; "
                           f"pass weights saved from {_title(spec)}, or choose the extractor they belong to")
    own = full.state_dict()
    # What truncation drops (a SimCLR projection head, another fc) may have any shape: it is not loaded.
    full.load_state_dict({k: v for k, v in state.items() if k in own and v.shape == own[k].shape}, strict=False)


def _title(spec: ExtractorSpec) -> str:
    return spec.architecture or spec.name


def _architectures() -> list[ExtractorSpec]:
    # One spec per architecture: the SimCLR extractors share theirs.
    return list({id(s.build_full): s for s in _REGISTRY.values()}.values())


def _as_full_keys(spec: ExtractorSpec, full: nn.Module, state: dict) -> dict:
    """A truncated model's state dict ("4.0.conv1.weight") renamed to the full model's keys."""
    truncated_keys = _truncated_key_map(spec, full)
    if truncated_keys.keys() & state.keys() and not (state.keys() & full.state_dict().keys()):
        return {truncated_keys[k]: v for k, v in state.items() if k in truncated_keys}
    return state


def _fits(spec: ExtractorSpec, full: nn.Module, state: dict) -> bool:
    """Whether ``state`` fills every tensor the truncated model keeps, each with its shape."""
    kept = {k: v for k, v in full.state_dict().items()
            if k.split(".")[0] not in spec.dropped and not k.endswith("num_batches_tracked")}
    return all(k in state and tuple(state[k].shape) == tuple(v.shape) for k, v in kept.items())


def _strip_prefix(key: str) -> str:
    for prefix in _KNOWN_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _truncated_key_map(spec: ExtractorSpec, full: nn.Module) -> dict[str, str]:
    """Keys of the truncated Sequential ("4.0.conv1.weight") -> keys of the full model."""
    trunc = spec.truncate(full)
    names = {id(mod): name for name, mod in full.named_children()}
    mapping = {}
    for idx, child in enumerate(trunc):
        if id(child) in names:
            for key in child.state_dict():
                mapping[f"{idx}.{key}"] = f"{names[id(child)]}.{key}"
    return mapping


def weights_digest(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the model's tensors, so a feature file names its exact weights."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
