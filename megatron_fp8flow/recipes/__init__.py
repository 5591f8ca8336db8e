"""YAML training recipes: flat maps of Megatron arguments plus an ``fp8flow:`` section."""

from .recipe import Recipe, RecipeError, find_recipe, list_recipes, load_recipe, to_argv

__all__ = ["Recipe", "RecipeError", "find_recipe", "list_recipes", "load_recipe", "to_argv"]
