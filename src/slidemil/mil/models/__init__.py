"""Registry of MIL models (bag of N tile features -> slide logits), timm-style.

Every model follows one contract so the training stage never special-cases one:

    forward(x: FloatTensor [B, N, D], mask: BoolTensor [B, N] | None) -> dict
        logits    [B, n_classes]
        attention [B, N], normalised over the real instances and exactly 0 at
                  padding, or None for models without instance attention
        embedding [B, E], the bag embedding

``mask`` is True for real instances and False for padding; None means every
instance is real. Padding must not change a bag's output.

Optional hooks the training stage uses when a model has them (MHIM-MIL does):

    needs_init_checkpoint = True      train_fold must be given a checkpoint ...
    init_from_checkpoint(ckpt, source)   ... and passes it here before training
    training_step(x, mask, y, loss_fn, step, total_steps) -> loss
                                      replaces loss_fn(model(x, mask)["logits"], y)
    after_optimizer_step(step, total_steps)   called after every optimiser step

Parameters with ``requires_grad=False`` (a teacher) are left out of the optimiser.

Adding a model is one file defining a builder decorated with
``@register_model("name")`` whose signature is ``(in_dim, n_classes=2, **its
own keyword arguments with defaults)``, plus one import line at the bottom of
this file; a model of the package also declares its arguments in
slidemil.names.MODEL_PARAMS and their value rules in slidemil.config.MILSettings
(the dry run checks them without importing torch).
"""

from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from slidemil.config import check_model_settings
from slidemil.names import MODEL_PARAMS

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# Arguments create_model passes itself, not part of a model's own kwargs.
_RESERVED = ("in_dim", "n_classes")


def register_model(name: str) -> Callable:
    """Decorator registering a model builder (class or function) under ``name``."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"MIL model {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_kwargs_defaults(name: str) -> dict:
    """The keyword arguments model ``name`` accepts, with their defaults."""
    params = inspect.signature(_builder(name)).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.name not in _RESERVED and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def create_model(name: str, in_dim: int, n_classes: int = 2, **kwargs) -> nn.Module:
    """Build model ``name`` for ``in_dim``-dimensional instances and ``n_classes`` classes.

    Raises ValueError for an unknown name, TypeError for keyword arguments
    the model does not take (a typo in a config should fail loudly, not be
    silently ignored) and slidemil.config.ConfigError (a ValueError) for a
    value outside its rules, in the same line as the workflow's dry run.
    """
    builder = _builder(name)
    _check_kwargs(name, builder, kwargs)
    if name in MODEL_PARAMS:  # the package's models; one registered elsewhere checks its own settings
        check_model_settings(name, {**model_kwargs_defaults(name), **kwargs}, key=name)
    return builder(in_dim=in_dim, n_classes=n_classes, **kwargs)


def _builder(name: str) -> Callable[..., nn.Module]:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(list_models()) or "(none)"
        raise ValueError(f"unknown MIL model {name!r}; known models: {known}") from None


def _check_kwargs(name: str, builder: Callable, kwargs: dict) -> None:
    params = inspect.signature(builder).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = model_kwargs_defaults(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        options = ", ".join(f"{k}={v!r}" for k, v in accepted.items()) or "none"
        raise TypeError(
            f"model {name!r} got unknown keyword argument(s) {', '.join(unknown)}; it accepts: {options}"
        )


# Imported last: the model modules need register_model defined above, and
# importing them here is what registers them.
from slidemil.mil.models import abmil, pooling, transmil, varmil  # noqa: E402,F401
from slidemil.mil.models import mhim  # noqa: E402,F401  (wraps the models above)
