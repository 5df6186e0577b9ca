"""The Hugging Face checkpoint output: fold, verify against the hook-steered base, write the manifest and card.

Output is staged beside the target and renamed into place only after the baked model, reloaded from disk,
matched the hook-steered base; otherwise nothing is written and ``BakeError`` says why. The source is never
modified. ``link`` hard-links unchanged shards; ``verify.scope = "steered"`` verifies with blocks 0..L only
(no preview then). ``allow_remote_code`` bakes sites that have no stock bias slot into a constant-bias module
(``bake.formats.hf.remote``): the output then loads only with ``trust_remote_code=True`` and is verified so.
Verification streams block by block (logits, no greedy runs or preview) as ``options.collection`` says
(``bake.verify.streams_verification``).
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import torch

from bake import manifest as manifests
from bake.checkpoint import check_output, folder_bytes, staged_output
from bake.collection.measure import entry_table, versions
from bake.errors import BakeError
from bake.families.hf import family_named, portability
from bake.formats.base import BakeResult, FoldOptions, Inspection
from bake.formats.hf.fold import fold_checkpoint
from bake.manifest import MANIFEST, BakeRecord, BaseRecord, Manifest, RecipeRecord
from bake.recipe import Recipe, VerifySpec
from bake.release import card
from bake.sources import trust
from bake.sources.load import DTYPES, family_at, generate, load_model, load_tokenizer, source_dtype, text_config
from bake.sources.resolve import ModelSource, resolve_model
from bake.vectorfile import VectorSet
from bake.verify import compare, compare_streaming, describe, streams_verification

VECTORS_IN_OUTPUT = "bake/vectors.safetensors"


def _out_dtype(name: str, source: ModelSource) -> torch.dtype | None:
    """None means 'keep the source dtype' (no tensor is cast)."""
    if name == "auto":
        return None
    dtype = DTYPES[name]
    return None if dtype == source_dtype(source.config) else dtype


def _history(source: Path) -> list[BakeRecord]:
    """The manifests of the bakes under this one, oldest first (a bake on top of a baked model)."""
    if not (source / MANIFEST).is_file():
        return []
    previous = manifests.read(source)
    return [*previous.history, BakeRecord.model_validate(previous.model_dump(exclude_unset=True, exclude={"history"}))]


class HFFormat:
    """A standalone Hugging Face checkpoint folder with the steering as biases."""

    name = "hf"
    ours = staticmethod(manifests.is_bake_folder)

    def check_recipe(self, recipe: Recipe, out: Path, options: FoldOptions) -> None:
        source = resolve_model(recipe.model, recipe.revision, recipe.base_dir)
        check_output(out, options.force, self.ours, [source.path], folder_bytes(source.path))
        trust.refuse_steered_source(source.config, f"model {recipe.model!r}")
        cfg = text_config(source.path)
        family = family_at(source.path)
        module = False
        for i, entry in enumerate(recipe.steering):
            try:
                module |= (family.slot if options.allow_remote_code else family.bias_slot)(entry.site, cfg).bias is None
            except BakeError as e:
                raise BakeError(f"steering.{i}.site: {e}") from None
        if module:  # a constant-bias module cannot be verified block by block: refuse that now, not after collection
            scope = (options.verify or recipe.verify).scope
            blocks = 1 + max(max(recipe.layers_of(e)) for e in recipe.steering) if scope == "steered" else None
            streams_verification(source.path, blocks, options.collection, remote_code=True)

    def fold(self, model: str, vectors: VectorSet, out: Path, options: FoldOptions) -> BakeResult:
        recipe, preview = options.recipe, options.preview
        verify = options.verify or VerifySpec()
        local = [model] if Path(model).exists() else []
        check_output(out, options.force, self.ours, local)  # before resolving (perhaps a download) or any work
        source = resolve_model(model, options.revision, options.base_dir)
        out_dtype = _out_dtype(options.dtype, source)
        needed = 0 if options.link else folder_bytes(source.path)
        with staged_output(out, options.force, ours=self.ours, sources=[source.path], needed=needed) as stage:
            fold_record = fold_checkpoint(
                source.path, vectors, stage, out_dtype, link=options.link, allow_remote_code=options.allow_remote_code
            )
            blocks = 1 + max(layer for layer, _ in vectors.vectors) if verify.scope == "steered" else None
            tokenizer = load_tokenizer(stage)
            module = fold_record.remote_code is not None
            streamed = streams_verification(source.path, blocks, options.collection, module)
            if streamed:
                report = compare_streaming(source.path, stage, vectors, tokenizer, verify.prompts, verify.atol, blocks)
            else:
                # Remote code only for a constant-bias module: then loaded exactly as its users must load it.
                baked = load_model(stage, layers=blocks, trust_remote_code=module)
                base = load_model(source.path, dtype=next(baked.parameters()).dtype, layers=blocks)
                report = compare(base, baked, tokenizer, vectors, verify.prompts, verify.tokens, verify.atol)
            report["scope"] = verify.scope if blocks is None else f"blocks 0..{blocks - 1}"
            if not report["passed"]:
                raise BakeError(describe(report) + ": nothing was written")
            samples = []
            if preview is not None and preview.prompts and blocks is None and not streamed:
                before = generate(base, tokenizer, preview.prompts, preview.tokens, preview.chat)
                after = generate(baked, tokenizer, preview.prompts, preview.tokens, preview.chat)
                samples = list(zip(preview.prompts, before, after))
            vectors.save(stage / VECTORS_IN_OUTPUT)
            manifest = Manifest(
                format="bake-manifest/1",
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                versions=versions(),
                base=BaseRecord(
                    spec=source.spec,
                    identity=source.identity,
                    base_model_id=options.base_model_id,
                    license=source.license,
                ),
                recipe=RecipeRecord(
                    text=recipe.text, base_dir=str(recipe.base_dir), parsed=recipe.model_dump(mode="json")
                )
                if recipe
                else None,
                vectors=vectors.meta,
                vector_file=VECTORS_IN_OUTPUT,
                fold=fold_record,
                portable=fold_record.remote_code is None,
                verification=report,
                preview=[{"prompt": p, "base": b, "steered": s} for p, b, s in samples],
                history=_history(source.path),
            )
            (stage / MANIFEST).write_text(manifests.dumps(manifest))
            (stage / "README.md").write_text(card.render(manifest))
        return BakeResult(out, manifest, samples)

    def read(self, path: Path) -> Manifest:
        return manifests.read(path)

    def check(self, path: Path) -> tuple[Manifest, list[str]]:
        manifest = manifests.read(path)
        try:
            return manifest, manifests.check(path, manifest)
        except BakeError as e:  # a manifest naming files that are gone: shown anyway, with why it cannot be checked
            return manifest, [str(e)]

    def inspect(self, path: Path) -> Inspection:
        manifest = manifests.read(path)
        base, fold = manifest.base, manifest.fold
        lines = [f"base: {base.base_model_id or base.spec} ({fold.family} family)"]
        try:  # the entries and the verification report are the collection's and verify's dicts, not typed here
            lines += [
                f"  on top of earlier bake {i + 1}: {', '.join(e['name'] for e in h.entries) or 'a vector file'}"
                for i, h in enumerate(manifest.history)
            ]
            lines.append(entry_table(manifest.entries))  # a bare vector file has no entries
            lines += [f"  {b.vector} -> {b.tensor}" for b in fold.biases]
            lines.append(describe(manifest.verification))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise BakeError(
                f"{str(path)!r}: bake.json is not a complete bake manifest ({e.__class__.__name__}: {e}): use --json "
                "to see it"
            ) from None
        family = family_named(fold.family)
        if family is not None:
            lines.append("loads in " + portability(family))
        problems = manifests.check(path, manifest)
        lines.append("weights: match the manifest" if not problems else "weights: DO NOT match the manifest")
        lines += [f"  - {p}" for p in problems]
        lines += [f"NOTE: {n}" for n in manifest.unverified()]
        return Inspection(manifest, "\n".join(lines), problems)

    def describe(self, verification: dict[str, Any]) -> str:
        return describe(verification)


HF = HFFormat()
