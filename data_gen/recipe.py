"""data_gen's recipes: the configs read by the kernel's recipe parser (`train/recipe.py`), as every stage's are.

`python -m data_gen --config recipe.yaml --key value`: an unknown key, or a value of the wrong type or out of its
range, is an error naming the file (or the command line) and the key, before any work starts.
"""

from train.recipe import RecipeError, recipe_parser
from train.recipe import parse_recipe as _parse

__all__ = ["RecipeError", "parse_recipe"]


def parse_recipe(config_types, argv=None, description="", prog=None):
    """Returns one instance per dataclass in `config_types`, from --config YAML plus CLI overrides."""
    return _parse(recipe_parser(config_types, description, prog=prog), argv)
