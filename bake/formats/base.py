"""The one interface every output format implements, and the types it takes and returns.

``bake.api`` picks a format once (``bake.formats.for_path``) and calls only this interface, so adding a format
means one new subpackage with one object satisfying ``Format``, registered in ``bake.formats.FORMATS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bake.manifest import GGUFManifest, Manifest
from bake.recipe import Collection, PreviewSpec, Recipe, VerifySpec
from bake.vectorfile import VectorSet


@dataclass(frozen=True)
class FoldOptions:
    """How to fold (defaults: a plain bake). ``link``, ``dtype``, ``allow_remote_code``, ``verify.scope`` and
    ``collection`` apply to a checkpoint folder only; ``preview`` adds base vs steered samples; ``recipe`` is
    recorded in the manifest."""

    dtype: str = "auto"
    force: bool = False
    verify: VerifySpec | None = None
    preview: PreviewSpec | None = None
    base_model_id: str | None = None
    revision: str | None = None
    recipe: Recipe | None = None
    link: bool = False
    allow_remote_code: bool = False
    collection: Collection = "auto"
    """How to verify: in memory, block by block ('streaming'), or 'auto' (streams when both models would not fit)."""

    @classmethod
    def from_recipe(cls, recipe: Recipe, **settings: Any) -> FoldOptions:
        """The options a recipe asks for (``settings`` override them)."""
        recorded = dict(
            dtype=recipe.dtype,
            verify=recipe.verify,
            preview=recipe.preview,
            base_model_id=recipe.base_model_id,
            revision=recipe.revision,
            recipe=recipe,
            allow_remote_code=recipe.allow_remote_code,
            collection=recipe.collection,
        )
        return cls(**{**recorded, **settings})

    @property
    def base_dir(self) -> Path | None:
        return self.recipe.base_dir if self.recipe else None


@dataclass
class BakeResult:
    """What a fold produced: where, the manifest, and (with a preview) base vs steered samples."""

    path: Path
    manifest: Manifest | GGUFManifest
    preview: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def verification(self) -> dict[str, Any]:
        return self.manifest.verification


@dataclass
class Inspection:
    """``bake inspect``: the manifest, a readable report, and every way the output no longer matches it."""

    manifest: Manifest | GGUFManifest
    report: str
    problems: list[str]


class Format(Protocol):
    """An output format: refuse a recipe it cannot carry, fold and verify, read and check what it wrote."""

    name: str
    ours: Callable[[Path], bool]
    """Whether a path holds an output of this format that bake wrote (what ``force`` may replace)."""

    def check_recipe(self, recipe: Recipe, out: Path, options: FoldOptions) -> None:
        """Refuse, before any vector is computed, a recipe whose steering this format cannot carry, or cannot
        write to ``out``."""

    def fold(self, model: str, vectors: VectorSet, out: Path, options: FoldOptions) -> BakeResult:
        """Write ``model`` with ``vectors`` baked in to ``out``, verified, staged and renamed into place."""

    def read(self, path: Path) -> Manifest | GGUFManifest:
        """The manifest of a bake in this format."""

    def check(self, path: Path) -> tuple[Manifest | GGUFManifest, list[str]]:
        """The manifest, and every way the output no longer matches it (or why it cannot be checked)."""

    def inspect(self, path: Path) -> Inspection:
        """The manifest, a report, and the problems found checking the output against it."""

    def describe(self, verification: dict[str, Any]) -> str:
        """One line: what the verification checked and whether it passed."""
