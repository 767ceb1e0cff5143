"""Stage entry points for the workflow steps whose rule hands over files rather than the stage's arguments.

A step script (workflow/scripts/) is one call to one package function. Most stages take a rule's inputs as
they are; the one here first reads the manifest the rule depends on (one file instead of N per-slide files),
inside the call, so that a missing or malformed manifest is reported like any other input error.
"""

from __future__ import annotations

import os


def train_from_manifest(features_manifest: str | os.PathLike, model: str, model_kwargs: dict, training: dict,
                        seed: int, **kwargs) -> dict:
    """:func:`slidemil.mil.train.train_fold` of the recipe that the rule's params give (model, its settings,
    training, seed) on the feature files a feature manifest lists."""
    from slidemil.cohort.manifest import read_manifest
    from slidemil.mil.train import Recipe, train_fold

    recipe = Recipe(model, model_kwargs, training, seed)
    return train_fold(features=read_manifest(features_manifest), recipe=recipe, **kwargs)


def refit_from_manifest(features_manifest: str | os.PathLike, model: str, model_kwargs: dict, training: dict,
                        seed: int, **kwargs) -> dict:
    """:func:`slidemil.mil.refit.refit_model` of the rule's recipe on the feature files a feature manifest lists."""
    from slidemil.cohort.manifest import read_manifest
    from slidemil.mil.refit import refit_model
    from slidemil.mil.train import Recipe

    recipe = Recipe(model, model_kwargs, training, seed)
    return refit_model(features=read_manifest(features_manifest), recipe=recipe, **kwargs)
