"""The library API the CLI is a thin layer over: compute vectors, fold them, verify, run a recipe, inspect,
rebuild and evaluate a bake. Every step lives in its layer; this module only puts them in order."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import filecmp
from pathlib import Path
from typing import Any

import torch

from bake import formats
from bake import manifest as manifests
from bake.checkpoint import check_output, require_safetensors, staged_output
from bake.collection.measure import measure_vectors
from bake.errors import BakeError
from bake.evaluation.evaluate import Evaluator, build_data
from bake.evaluation.sweep import check_methods, choose_auto, choose_layers
from bake.formats.base import BakeResult, FoldOptions, Inspection
from bake.manifest import MANIFEST, GGUFManifest, Manifest
from bake.recipe import EvaluateSpec, Recipe, VerifySpec, parse_recipe
from bake.release import card
from bake.sources.hub import download
from bake.sources.load import generate, load_model, load_tokenizer, text_config
from bake.sources.resolve import resolve_model
from bake.vectorfile import VectorSet
from bake.verify import verify as verify_paths


def compute_vectors(recipe: Recipe, engine: str | None = None) -> VectorSet:
    """Measure every steering entry of ``recipe`` on its base model and return the vectors (a sampled background
    by ``engine``, ``bake.collection.texts.ENGINES``, default the recipe's ``background.sample.engine``).

    Entries sharing a (layer, site) add up. ``coefficient: auto`` entries get the largest coefficient on
    ``evaluate.coefficients`` whose KL(base ‖ steered) stays within ``evaluate.max_kl``
    (``bake.evaluation.sweep.choose_auto``). With ``evaluate.compare.on_run`` the first entry's metadata also
    gets ``compare``: the methods at that budget and the verdict (``bake.evaluation.sweep.check_methods``).
    ``layer: auto`` entries first get their layer from one sweep of ``evaluate.layers``
    (``bake.evaluation.sweep.choose_layers``).
    """
    recipe, records = choose_layers(recipe)
    measured = measure_vectors(recipe, engine)
    if recipe.evaluate.compare.on_run:
        records.setdefault(0, {})["compare"] = check_methods(recipe)
    if any(e.coefficient == "auto" for e in recipe.steering):
        return choose_auto(recipe, measured, records)
    return measured.scaled([e.coefficient for e in recipe.steering], records)


def fold(
    model: str, vectors: VectorSet, out: str | Path, options: FoldOptions | None = None, /, **settings: Any
) -> BakeResult:
    """Bake ``vectors`` into ``model`` and write a verified output to ``out``: a checkpoint folder, or a GGUF file
    when ``out`` ends in .gguf (``bake.formats.for_path``).

    ``options`` (``bake.formats.base.FoldOptions``) or its fields as keywords (``dtype``, ``force``, ``verify``,
    ``preview``, ``base_model_id``, ``revision``, ``recipe``, ``link``, ``allow_remote_code``, ``collection``) say how.
    Nothing is written unless the output verified; the source is never modified.
    """
    options = dataclasses.replace(options or FoldOptions(), **settings)
    return formats.for_path(out).fold(model, vectors, Path(out), options)


def verify(base: str, baked: str | Path, vectors: VectorSet, spec: VerifySpec | None = None) -> dict[str, Any]:
    """Re-run the baked-vs-hooked comparison on an existing output folder."""
    spec = spec or VerifySpec()
    require_safetensors(Path(baked))
    source = resolve_model(base)
    cfg = text_config(source.path)
    vectors.check_model(cfg.hidden_size, cfg.num_hidden_layers)
    return verify_paths(source.path, Path(baked), vectors, spec.prompts, spec.tokens, spec.atol)


def run(
    recipe: Recipe,
    out: str | Path | None = None,
    force: bool = False,
    allow_remote_code: bool = False,
    output_format: str | None = None,
) -> BakeResult:
    """The whole recipe: compute the vectors, fold, verify, write, with base vs steered samples.

    ``allow_remote_code`` (or ``allow_remote_code: true`` in the recipe) allows a constant-bias module.
    A target ending in ``.gguf``, or ``output_format`` / the recipe's ``output_format`` "gguf", writes
    the GGUF base with the steering as bias tensors instead (``bake.formats.gguf``).
    """
    target = out or (recipe.resolve(recipe.output) if recipe.output else None)
    if target is None:
        raise BakeError("no output folder: pass -o OUT or set 'output' in the recipe")
    output = formats.for_path(target, "gguf" if (output_format or recipe.output_format) == "gguf" else None)
    check_output(target, force, output.ours)  # before resolving the model (perhaps a download) or any work
    allow_remote_code = allow_remote_code or recipe.allow_remote_code
    options = FoldOptions.from_recipe(recipe, force=force, allow_remote_code=allow_remote_code)
    output.check_recipe(recipe, Path(target), options)
    return output.fold(recipe.model, compute_vectors(recipe), Path(target), options)


def rebuild(
    baked: str | Path, out: str | Path, force: bool = False, recipe_dir: str | Path | None = None
) -> tuple[BakeResult, list[str]]:
    """Bake again from a baked checkpoint's manifest (``bake run --from-manifest``).

    Refused unless the base model and every text set are the ones recorded (by
    identity and sha256), so the result can be the same checkpoint. Returns the
    new bake and the files that differ from ``baked`` (the manifest itself, which
    records the time, is not compared): empty means rebuilt bit for bit.
    """
    folder = Path(baked)
    folder = folder.parent if folder.name == MANIFEST else folder
    check_output(out, force, manifests.is_bake_folder, [folder])
    manifest = manifests.read(folder)
    recorded = manifest.recipe
    if not recorded:
        raise BakeError(
            f"{str(folder)!r} was baked from a vector file, not a recipe: rebuild it with "
            f"bake fold {manifest.base.spec} {folder / manifest.vector_file}"
        )
    base_dir = Path(recipe_dir or recorded.base_dir)
    if not base_dir.is_dir():
        raise BakeError(
            f"the recipe's folder {str(base_dir)!r} (where its data paths start) does not exist here: pass --recipe-dir"
        )
    recipe = parse_recipe(recorded.text, base_dir, where=f"{folder / MANIFEST} (recipe)")
    source = resolve_model(recipe.model, recipe.revision, recipe.base_dir)
    if source.identity != manifest.base.identity:
        raise BakeError(
            f"model {recipe.model!r} is not the base this was baked from ({source.identity} here, "
            f"{manifest.base.identity} recorded): use the same base model"
        )
    vectors = compute_vectors(recipe, manifests.sample_engine(manifest.entries, str(folder / MANIFEST)))
    for old, new in zip(manifest.entries, vectors.meta["entries"]):
        for role, info in old["data"].items():
            now = new["data"][role]["sha256"]
            if now != info["sha256"]:
                raise BakeError(
                    f"steering {old['name']!r}: its {role} texts changed since the bake (sha256 {info['sha256'][:12]}… "
                    f"recorded, {now[:12]}… now): restore them to rebuild the same checkpoint"
                )
    result = fold(
        recipe.model,
        vectors,
        out,
        FoldOptions.from_recipe(recipe, force=force, allow_remote_code=manifest.fold.remote_code is not None),
    )
    files = {p.relative_to(d).as_posix() for d in (folder, Path(out)) for p in d.rglob("*") if p.is_file()} - {MANIFEST}
    differ = sorted(
        f
        for f in files
        if not (folder / f).is_file()
        or not (Path(out) / f).is_file()
        or not filecmp.cmp(folder / f, Path(out) / f, shallow=False)
    )
    return result, differ


def continuation(model: str, prompt: str, tokens: int = 40, chat: bool = True) -> str:
    """``bake generate``: the greedy continuation of ``prompt`` by ``model`` (any model spec)."""
    path = resolve_model(model).path
    return generate(load_model(path), load_tokenizer(path), [prompt], tokens, chat)[0]


def _replace_files(folder: Path, texts: dict[str, str]) -> None:
    """Stage every file beside its target first, then rename each over it (``staged_output``): a reader sees an
    old or a new file, never half of one, and a failed write leaves the old files. The folder is a bake output
    (its manifest was read), so its files are bake's to replace."""
    with contextlib.ExitStack() as stack:
        for name, text in texts.items():
            stack.enter_context(staged_output(folder / name, True, ours=lambda p: True, file=True)).write_text(text)


def evaluate_checkpoint(
    path: str | Path, prompts: list[str] | None = None, tokens: int | None = None
) -> dict[str, Any]:
    """Measure a baked checkpoint against the base it was baked from (``bake eval``): effect and cost figures
    (``bake.evaluation.evaluate``) with the settings of its recipe's ``evaluate`` section, or the defaults for a bake
    from a vector file. The figures go into its ``bake.json`` under ``evaluation`` and its model card."""
    folder = Path(path)
    require_safetensors(folder)
    manifest = manifests.read(folder)
    recorded = manifest.recipe
    recipe = (
        parse_recipe(recorded.text, Path(recorded.base_dir), where=f"{folder / MANIFEST} (recipe)")
        if recorded
        else None
    )
    spec = recipe.evaluate if recipe else EvaluateSpec()
    spec = spec.model_copy(update={"tokens": tokens}) if tokens else spec
    source = resolve_model(manifest.base.spec, recipe.revision if recipe else None, recipe.base_dir if recipe else None)
    if source.identity != manifest.base.identity:
        raise BakeError(
            f"base model {manifest.base.spec!r} is not the one {str(folder)!r} was baked from "
            f"({source.identity} here, {manifest.base.identity} recorded): evaluate where that base is available"
        )
    tokenizer = load_tokenizer(folder)
    base = load_model(source.path, dtype=torch.float32)
    data = build_data(
        spec,
        tokenizer,
        recipe,
        recipe.steering[0] if recipe else None,
        source.key,
        lambda: base,
        prompts,
        need_effect=False,
    )
    vectors = VectorSet.load(folder / manifest.vector_file)
    with torch.random.fork_rng():
        torch.manual_seed(recipe.seed if recipe else 0)
        evaluator = Evaluator(base, tokenizer, data, list(vectors.vectors))
        steered = evaluator.measure(load_model(folder, dtype=torch.float32), vectors)
    figures = {
        side: {k: v for k, v in f.items() if k != "replies"}
        for side, f in (("base", evaluator.base), ("steered", steered))
    }
    manifest.evaluation = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "headline": data.headline,
        "max_kl": spec.max_kl,
        "within_budget": steered["kl"] <= spec.max_kl,
        **figures,
        "data": data.info,
        "skipped": data.skipped,
        "samples": [
            {"prompt": p, "base": b, "steered": s}
            for p, b, s in zip(data.prompts, evaluator.base["replies"], steered["replies"])
        ],
    }
    _replace_files(folder, {MANIFEST: manifests.dumps(manifest), "README.md": card.render(manifest)})
    return manifest.evaluation


def _local(path: str, revision: str | None) -> Path:
    """A bake to read: the path itself, or a local copy of the Hub repository it names."""
    if not Path(path).exists() and "/" in path and not path.startswith((".", "/")):
        return download(path, revision)
    return Path(path)


def read_manifest(path: str, revision: str | None = None) -> Manifest | GGUFManifest:
    """The manifest of a bake (a checkpoint folder, a steered .gguf, or a Hub repository id), validated but not
    checked against the weights; ``.as_dict()`` gives it as ``bake.json`` holds it."""
    local = _local(path, revision)
    return formats.for_path(local).read(local)


def verdict(path: str, revision: str | None = None) -> tuple[Manifest | GGUFManifest, list[str]]:
    """``bake inspect --json``: the manifest of ``path`` (folder, .gguf or Hub id) and every way the output no
    longer matches it; a manifest too incomplete to check is shown with why."""
    local = _local(path, revision)
    return formats.for_path(local).check(local)


def inspect(path: str, revision: str | None = None) -> Inspection:
    """``bake inspect``: what is baked into ``path`` (folder, .gguf or Hub id) and whether it still matches."""
    local = _local(path, revision)
    return formats.for_path(local).inspect(local)
