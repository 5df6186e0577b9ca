"""The GGUF output behind the ``Format`` interface: the steered file (``export``), checked in llama.cpp
(``llamacpp``), with base vs steered continuations from llama.cpp itself as the preview."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bake.checkpoint import check_output
from bake.errors import BakeError
from bake.formats.base import BakeResult, FoldOptions, Inspection
from bake.formats.gguf import export, llamacpp
from bake.manifest import GGUFManifest
from bake.recipe import Recipe
from bake.sources.load import load_tokenizer, prompt_ids
from bake.vectorfile import VectorSet


def _preview(model: str, out: Path, options: FoldOptions) -> list[tuple[str, str, str]]:
    """Greedy continuations of the preview prompts by llama.cpp, base file then steered file."""
    preview = options.preview
    if preview is None or not preview.prompts or not llamacpp.available():
        return []
    tokenizer = load_tokenizer(export._dequantized(model, options.recipe))
    ids = [prompt_ids(tokenizer, p, preview.chat) for p in preview.prompts]
    texts = [
        [tokenizer.decode(x, skip_special_tokens=True).strip() for x in llamacpp.greedy(f, ids, preview.tokens)]
        for f in (export.gguf_file(model, options.base_dir), out)
    ]
    return list(zip(preview.prompts, *texts))


class GGUFFormat:
    """The GGUF base with the steering as bias tensors, for llama.cpp and Ollama."""

    name = "gguf"
    ours = staticmethod(export.is_steered_gguf)

    def check_recipe(self, recipe: Recipe, out: Path, options: FoldOptions) -> None:
        check_output(out, options.force, self.ours)
        self._refuse_folder_options(options)
        export.check_points(
            recipe.model, [(layer, e.site) for e in recipe.steering for layer in recipe.layers_of(e)], recipe.base_dir
        )

    def _refuse_folder_options(self, options: FoldOptions) -> None:
        if options.allow_remote_code:
            raise BakeError(
                "--allow-remote-code bakes transformers code, which llama.cpp cannot run: drop it for GGUF output"
            )
        if options.dtype != "auto" or options.link or (options.verify is not None and options.verify.scope != "all"):
            raise BakeError(
                "dtype, link, verify scope and remote code apply to a checkpoint folder: drop them for a .gguf output"
            )

    def fold(self, model: str, vectors: VectorSet, out: Path, options: FoldOptions) -> BakeResult:
        self._refuse_folder_options(options)
        result = export.fold(
            model,
            vectors,
            out,
            force=options.force,
            verify=options.verify,
            base_model_id=options.base_model_id,
            recipe=options.recipe,
        )
        result.preview = _preview(model, result.path, options)
        return result

    def read(self, path: Path) -> GGUFManifest:
        return export.read_manifest(path)[0]

    def check(self, path: Path) -> tuple[GGUFManifest, list[str]]:
        manifest, reader = export.read_manifest(path)
        return manifest, export.check(path, manifest, reader)

    def inspect(self, path: Path) -> Inspection:
        return Inspection(*export.inspect(path))

    def describe(self, verification: dict[str, Any]) -> str:
        return export.describe(verification)


GGUF = GGUFFormat()
