"""Recipes: one YAML file chains generate -> curate -> train -> evaluate -> report (``synclone run``)."""

from synclone.recipe.check import check
from synclone.recipe.plan import Recipe, load_recipe, plan
from synclone.recipe.run import demo_recipe, run_recipe

__all__ = ["Recipe", "check", "demo_recipe", "load_recipe", "plan", "run_recipe"]
