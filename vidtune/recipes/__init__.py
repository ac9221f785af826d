"""Recipes: what a trial trains (model), optimises (loss) and reports (metrics).

A recipe is a plain object with ``build_model``, ``build_loss`` and ``evaluate``; the trainer's
loop is the same for all of them. Add one by writing a module and listing it in ``RECIPES``.
"""

from __future__ import annotations

from vidtune.config import ConfigError
from vidtune.recipes.anomaly import AnomalyRecipe
from vidtune.recipes.classify import ClassifyRecipe, LipreadRecipe, ThermalSlowFastRecipe
from vidtune.recipes.detection import DetectionRecipe
from vidtune.recipes.distill import DistillRecipe

RECIPES = {r.name: r for r in (ClassifyRecipe(), ThermalSlowFastRecipe(), LipreadRecipe(), AnomalyRecipe(), DistillRecipe(),
                               DetectionRecipe())}


def get_recipe(name: str):
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"recipe: unknown {name!r}; choose one of {sorted(RECIPES)}") from None
