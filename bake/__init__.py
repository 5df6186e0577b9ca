"""bake: fold activation-steering vectors permanently into a model's weights.

The public API is small on purpose (a notebook needs only these):

    import bake
    recipe = bake.load_recipe("recipes/quickstart.yaml")
    vectors = bake.compute_vectors(recipe)          # mean-centred steering vectors
    report = bake.fold("path/or/hub-id", vectors, "out/cheerful")   # writes + verifies
    bake.unbake("out/cheerful", "out/base")         # the exact base back
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

# Each public name and the module that defines it, loaded on first use: `bake --help` then starts without torch.
_PUBLIC = {
    "BakeError": "bake.errors",
    "Recipe": "bake.recipe",
    "load_recipe": "bake.recipe",
    "VectorSet": "bake.vectorfile",
    "FoldOptions": "bake.formats.base",
    "compute_vectors": "bake.api",
    "fold": "bake.api",
    "run": "bake.api",
    "verify": "bake.api",
    "unbake": "bake.formats.hf.undo",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


class _Package(types.ModuleType):
    """The ``bake`` package, resolving the public API lazily."""

    def __getattr__(self, name: str) -> Any:
        if name not in _PUBLIC:
            raise AttributeError(f"module 'bake' has no attribute {name!r}")
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        self.__dict__[name] = value
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # Importing the submodule bake.verify binds it here; the public name is the function bake.api.verify.
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *_PUBLIC})


sys.modules[__name__].__class__ = _Package
