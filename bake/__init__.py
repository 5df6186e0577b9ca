"""bake: fold activation-steering vectors permanently into a model's weights.

The public API is small on purpose (a notebook needs only these):

    import bake
    recipe = bake.load_recipe("recipes/quickstart.yaml")
    vectors = bake.compute_vectors(recipe)          # mean-centred steering vectors
    report = bake.fold("path/or/hub-id", vectors, "out/cheerful")   # writes + verifies
    bake.unbake("out/cheerful", "out/base")         # the exact base back
"""

from bake.errors import BakeError
from bake.recipe import Recipe, load_recipe
from bake.vectorfile import VectorSet
from bake.api import compute_vectors, fold, run, verify
from bake.formats.hf.undo import unbake

__all__ = [
    "BakeError",
    "Recipe",
    "VectorSet",
    "compute_vectors",
    "fold",
    "load_recipe",
    "run",
    "unbake",
    "verify",
]
__version__ = "0.1.0"
