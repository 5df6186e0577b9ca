"""The library API the CLI is a thin layer over: compute vectors, fold them, verify, run a recipe."""

from __future__ import annotations

import datetime
import filecmp
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bake import card, remote
from bake import manifest as manifests
from bake.activations import Moments
from bake.architectures import Site, family_for
from bake.checkpoint import staged_output
from bake.data import Example, digest, load_texts, sample_background, sequences_to_examples, tokenize
from bake.errors import BakeError
from bake.fold import fold_checkpoint
from bake.manifest import MANIFEST
from bake.models import DTYPES, ModelSource, cache_dir, generate, load_model, load_tokenizer, resolve_model, source_dtype, text_config
from bake.recipe import PreviewSpec, Recipe, Steering, VerifySpec, parse_recipe
from bake.streaming import Job, collect_sets, compare_streaming, load_whole, streams_verification
from bake.vectorfile import VectorSet, tensor_name
from bake.vectors import ROLES, steering_vector
from bake.verify import compare, describe

VECTORS_IN_OUTPUT = "bake/vectors.safetensors"


@dataclass
class _TextSet:
    """One role's examples for one steering entry, with what the manifest records about them."""

    examples: list[Example]
    info: dict[str, Any]

    @property
    def key(self) -> str:
        return self.info["sha256"]


def _versions() -> dict[str, str]:
    return manifests.package_versions("bake", "torch", "transformers", "safetensors", "huggingface_hub")


def _role_sets(recipe: Recipe, entry: Steering, index: int, full_model, tokenizer, source: ModelSource) -> dict[str, _TextSet]:
    """Tokenized examples for every role the entry's method measures (``full_model()`` loads the
    whole model, needed only to sample a background that is not cached)."""
    where = f"steering.{index} ({entry.name})"
    sets: dict[str, _TextSet] = {}
    for role in ROLES[entry.method]:
        if role == "background":
            bg = recipe.background_for(entry)
            if bg.sample is not None:
                sequences, key = sample_background(full_model, tokenizer, source.key, bg.sample, recipe.seed, cache_dir())
                examples = sequences_to_examples(sequences, tokenizer)
                info = {"kind": "model-sample", **bg.sample.model_dump(), "seed": recipe.seed, "texts": len(sequences)}
                info["sha256"] = digest([json.dumps(s) for s in sequences])
            else:
                texts = load_texts(bg.corpus, recipe, f"{where}.background")
                examples = tokenize(tokenizer, texts, recipe.max_tokens)
                info = {"kind": "corpus", "texts": len(texts), "sha256": digest(texts)}
        else:
            if entry.method == "actadd":
                texts = [getattr(entry, f"{role}_prompt")]
            else:
                texts = load_texts(getattr(entry, role), recipe, f"{where}.{role}")
            examples = tokenize(tokenizer, texts, recipe.max_tokens, entry.chat, entry.chat_prompt)
            info = {"kind": "texts", "texts": len(texts), "sha256": digest(texts), "chat": entry.chat}
        info["tokens"] = sum(e.n_counted for e in examples)
        if info["tokens"] == 0:
            raise BakeError(
                f"{where}.{role}: no tokens to average ({info['texts']} texts, nothing left after dropping the first "
                "position and special tokens): give longer or more texts"
            )
        sets[role] = _TextSet(examples, info)
    return sets


@dataclass
class MeasuredVectors:
    """Each steering entry's vector at coefficient 1 (vectors scale linearly, so a sweep measures once)."""

    points: list[tuple[int, Site]]
    units: list[torch.Tensor]
    entries: list[dict[str, Any]]
    meta: dict[str, Any]

    def scaled(self, coefficients: list[float], records: dict[int, dict[str, Any]] | None = None) -> VectorSet:
        """The vector set at these per-entry coefficients (entries sharing a point add); ``records`` adds
        fields to the entries' metadata (``coefficient: auto`` keeps its choice there)."""
        vectors: dict[tuple[int, Site], torch.Tensor] = {}
        entries = []
        for i, (point, u, entry, c) in enumerate(zip(self.points, self.units, self.entries, coefficients)):
            v = c * u
            vectors[point] = vectors.get(point, torch.zeros_like(v)) + v
            mean_norm = entry["mean_residual_norm"]
            entries.append({**entry, "coefficient": c, "norm": float(v.norm()),
                            "relative_norm": float(v.norm()) / mean_norm if mean_norm else 0.0, **(records or {}).get(i, {})})
        return VectorSet(vectors, {**self.meta, "entries": entries})


def compute_vectors(recipe: Recipe) -> VectorSet:
    """Measure every steering entry of ``recipe`` on its base model and return the vectors.

    Entries sharing a (layer, site) add up. ``coefficient: auto`` entries get the largest coefficient on ``evaluate.coefficients`` whose
    KL(base ‖ steered) stays within ``evaluate.max_kl`` (``bake.sweep.choose_auto``).
    """
    measured = measure_vectors(recipe)
    if any(e.coefficient == "auto" for e in recipe.steering):
        from bake.sweep import choose_auto

        return choose_auto(recipe, measured)
    return measured.scaled([e.coefficient for e in recipe.steering])


def measure_vectors(recipe: Recipe) -> MeasuredVectors:
    """Every steering entry of ``recipe`` measured on its base model, at coefficient 1.

    Only blocks 0..L of the deepest layer
    L are built and loaded (all at once, or one at a time per ``recipe.collection``: bake.streaming);
    each distinct text set runs through them once, for all the points that need it. The full model
    is loaded only to sample a background that is not cached yet.
    """
    source = resolve_model(recipe.model, recipe.revision, recipe.base_dir)
    remote.refuse_steered_source(source.config, f"model {recipe.model!r}")
    cfg = text_config(source.path)
    family = family_for(cfg)
    for i, entry in enumerate(recipe.steering):
        if not 0 <= entry.layer < cfg.num_hidden_layers:
            raise BakeError(
                f"steering.{i}.layer: {entry.layer} is outside the model's blocks 0..{cfg.num_hidden_layers - 1}: pick a layer in range"
            )
        try:
            family.slot(entry.site, cfg)
        except BakeError as e:
            raise BakeError(f"steering.{i}.site: {e}") from None
    tokenizer = load_tokenizer(source.path)
    full_model = functools.cache(lambda: load_whole(source.path, f"model {recipe.model!r}"))
    role_sets = [_role_sets(recipe, entry, i, full_model, tokenizer, source) for i, entry in enumerate(recipe.steering)]
    full_model.cache_clear()  # free it before building the truncated model
    needed: dict[str, tuple[_TextSet, set[tuple[int, Site]]]] = {}
    for entry, sets in zip(recipe.steering, role_sets):
        for s in sets.values():
            needed.setdefault(s.key, (s, set()))[1].add((entry.layer, entry.site))
    jobs = [Job(s.examples, sorted(points), f"collecting {s.info['kind']}") for s, points in needed.values()]
    results = collect_sets(source.path, family, jobs, recipe.batch_tokens, tokenizer.pad_token_id, recipe.collection)
    measured: dict[str, dict[tuple[int, Site], Moments]] = dict(zip(needed, results))

    points, units, entries = [], [], []
    for entry, sets in zip(recipe.steering, role_sets):
        point = (entry.layer, entry.site)
        moments = {role: measured[s.key][point] for role, s in sets.items()}
        u = steering_vector(entry.method, moments, 1.0)
        points.append(point)
        units.append(u)
        reference = moments.get("background") or next(iter(moments.values()))
        entries.append(
            {
                "name": entry.name,
                "layer": entry.layer,
                "site": entry.site,
                "tensor": tensor_name(*point),
                "method": entry.method,
                "unscaled_norm": float(u.norm()),
                "mean_residual_norm": reference.mean_norm,
                # Tokens as the collection counted them (after any all-reduce across ranks).
                "counts": {role: {"texts": s.info["texts"], "tokens": moments[role].count} for role, s in sets.items()},
                "data": {role: s.info for role, s in sets.items()},
            }
        )
    meta = {
        "format": "bake-vectors/1",
        "model": {"spec": source.spec, "identity": source.identity, "model_type": cfg.model_type},
        "hidden_size": cfg.hidden_size,
        "versions": _versions(),
    }
    return MeasuredVectors(points, units, entries, meta)


@dataclass
class BakeResult:
    """What a fold produced: where, the manifest, and (for ``run``) base vs steered samples."""

    path: Path
    manifest: dict[str, Any]
    preview: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def verification(self) -> dict[str, Any]:
        return self.manifest["verification"]


def _out_dtype(name: str, source: ModelSource) -> torch.dtype | None:
    """None means 'keep the source dtype' (no tensor is cast)."""
    if name == "auto":
        return None
    dtype = DTYPES[name]
    return None if dtype == source_dtype(source.config) else dtype


def fold(
    model: str,
    vectors: VectorSet,
    out: str | Path,
    *,
    dtype: str = "auto",
    force: bool = False,
    verify: VerifySpec | None = None,
    preview: PreviewSpec | None = None,
    base_model_id: str | None = None,
    revision: str | None = None,
    recipe: Recipe | None = None,
    link: bool = False,
    allow_remote_code: bool = False,
) -> BakeResult:
    """Bake ``vectors`` into ``model`` and write a verified standalone checkpoint to ``out``.

    Output is staged beside ``out`` and renamed into place only after the baked
    model, reloaded from disk, matched the hook-steered base; otherwise nothing is
    written and ``BakeError`` says why. The source model is never modified.
    ``link`` hard-links unchanged shards; ``verify.scope = "steered"`` verifies with
    blocks 0..L only (no preview then). ``allow_remote_code`` bakes sites that have no
    stock bias slot into a constant-bias module (``bake.remote``): the output then loads
    only with ``trust_remote_code=True`` and is verified loaded that way. Verification streams block by
    block (logits, no greedy runs or preview) as ``recipe.collection`` says (``streams_verification``).
    """
    if str(out).lower().endswith(".gguf"):  # the GGUF base with the steering as bias tensors (bake.gguf_export)
        from bake import gguf_export

        if dtype != "auto" or link or allow_remote_code or (verify is not None and verify.scope != "all"):
            raise BakeError("dtype, link, verify scope and remote code apply to a checkpoint folder: drop them for a .gguf output")
        return gguf_export.fold(model, vectors, out, force=force, verify=verify, base_model_id=base_model_id, recipe=recipe)
    verify = verify or VerifySpec()
    source = resolve_model(model, revision, recipe.base_dir if recipe else None)
    out = Path(out)
    out_dtype = _out_dtype(dtype, source)
    with staged_output(out, force) as stage:
        fold_record = fold_checkpoint(source.path, vectors, stage, out_dtype, link=link, allow_remote_code=allow_remote_code)
        blocks = 1 + max(layer for layer, _ in vectors.vectors) if verify.scope == "steered" else None
        tokenizer = load_tokenizer(stage)
        streamed = streams_verification(source.path, blocks, recipe.collection if recipe else "auto",
                                        fold_record["remote_code"] is not None)
        if streamed:
            report = compare_streaming(source.path, stage, vectors, tokenizer, verify.prompts, verify.atol, blocks)
        else:
            # Remote code only for a constant-bias module: then loaded exactly as its users must load it.
            baked = load_model(stage, layers=blocks, trust_remote_code=fold_record["remote_code"] is not None)
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
        manifest = {
            "format": "bake-manifest/1",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            "base": {"spec": source.spec, "identity": source.identity, "base_model_id": base_model_id, "license": source.license},
            "recipe": {"text": recipe.text, "base_dir": str(recipe.base_dir), "parsed": recipe.model_dump(mode="json")} if recipe else None,
            "vectors": vectors.meta,
            "vector_file": VECTORS_IN_OUTPUT,
            "fold": fold_record,
            "portable": fold_record["remote_code"] is None,
            "verification": report,
            "preview": [{"prompt": p, "base": b, "steered": s} for p, b, s in samples],
            "history": _history(source.path),
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (stage / "README.md").write_text(card.render(manifest))
    return BakeResult(out, manifest, samples)


def _history(source: Path) -> list[dict[str, Any]]:
    """The manifests of the bakes under this one, oldest first (a bake on top of a baked model)."""
    if not (source / MANIFEST).is_file():
        return []
    previous = manifests.read(source)
    return previous.get("history", []) + [{k: v for k, v in previous.items() if k != "history"}]


def verify(base: str, baked: str | Path, vectors: VectorSet, spec: VerifySpec | None = None) -> dict[str, Any]:
    """Re-run the baked-vs-hooked comparison on an existing output folder."""
    from bake.verify import verify as verify_paths

    spec = spec or VerifySpec()
    source = resolve_model(base)
    cfg = text_config(source.path)
    vectors.check_model(cfg.hidden_size, cfg.num_hidden_layers)
    return verify_paths(source.path, Path(baked), vectors, spec.prompts, spec.tokens, spec.atol)


def _check_foldable(recipe: Recipe, allow_remote_code: bool = False) -> None:
    """Refuse a recipe whose vectors could not be baked, before spending time computing them."""
    source = resolve_model(recipe.model, recipe.revision, recipe.base_dir)
    remote.refuse_steered_source(source.config, f"model {recipe.model!r}")
    cfg = text_config(source.path)
    family = family_for(cfg)
    module = False
    for i, entry in enumerate(recipe.steering):
        try:
            module |= (family.slot if allow_remote_code else family.bias_slot)(entry.site, cfg).bias is None
        except BakeError as e:
            raise BakeError(f"steering.{i}.site: {e}") from None
    if module:  # a constant-bias module cannot be verified block by block: refuse that now, not after collection
        blocks = 1 + max(e.layer for e in recipe.steering) if recipe.verify.scope == "steered" else None
        streams_verification(source.path, blocks, recipe.collection, remote_code=True)


def run(recipe: Recipe, out: str | Path | None = None, force: bool = False, allow_remote_code: bool = False,
        output_format: str | None = None) -> BakeResult:
    """The whole recipe: compute the vectors, fold, verify, write, with base vs steered samples.

    ``allow_remote_code`` (or ``allow_remote_code: true`` in the recipe) allows a constant-bias module.
    A target ending in ``.gguf``, or ``output_format`` / the recipe's ``output_format`` "gguf", writes
    the GGUF base with the steering as bias tensors instead (``bake.gguf_export``).
    """
    allow_remote_code = allow_remote_code or recipe.allow_remote_code
    target = out or (recipe.resolve(recipe.output) if recipe.output else None)
    if target is None:
        raise BakeError("no output folder: pass -o OUT or set 'output' in the recipe")
    if (output_format or recipe.output_format) == "gguf" or str(target).lower().endswith(".gguf"):
        from bake import gguf_export

        if allow_remote_code:
            raise BakeError("--allow-remote-code bakes transformers code, which llama.cpp cannot run: drop it for GGUF output")
        return gguf_export.run(recipe, target, force)
    if Path(target).exists() and not force:
        raise BakeError(f"output {str(target)!r} already exists: choose another path or pass --force to replace it")
    _check_foldable(recipe, allow_remote_code)
    vectors = compute_vectors(recipe)
    return fold(
        recipe.model,
        vectors,
        target,
        dtype=recipe.dtype,
        force=force,
        verify=recipe.verify,
        preview=recipe.preview,
        base_model_id=recipe.base_model_id,
        revision=recipe.revision,
        recipe=recipe,
        allow_remote_code=allow_remote_code,
    )


def rebuild(baked: str | Path, out: str | Path, force: bool = False, recipe_dir: str | Path | None = None) -> tuple[BakeResult, list[str]]:
    """Bake again from a baked checkpoint's manifest (``bake run --from-manifest``).

    Refused unless the base model and every text set are the ones recorded (by
    identity and sha256), so the result can be the same checkpoint. Returns the
    new bake and the files that differ from ``baked`` (the manifest itself, which
    records the time, is not compared): empty means rebuilt bit for bit.
    """
    folder = Path(baked)
    folder = folder.parent if folder.name == MANIFEST else folder
    manifest = manifests.read(folder)
    recorded = manifest.get("recipe")
    if not recorded:
        raise BakeError(f"{str(folder)!r} was baked from a vector file, not a recipe: rebuild it with "
                        f"bake fold {manifest['base']['spec']} {folder / manifest['vector_file']}")
    base_dir = Path(recipe_dir or recorded["base_dir"])
    if not base_dir.is_dir():
        raise BakeError(f"the recipe's folder {str(base_dir)!r} (where its data paths start) does not exist here: pass --recipe-dir")
    recipe = parse_recipe(recorded["text"], base_dir, where=f"{folder / MANIFEST} (recipe)")
    source = resolve_model(recipe.model, recipe.revision, recipe.base_dir)
    if source.identity != manifest["base"]["identity"]:
        raise BakeError(f"model {recipe.model!r} is not the base this was baked from ({source.identity} here, "
                        f"{manifest['base']['identity']} recorded): use the same base model")
    vectors = compute_vectors(recipe)
    for old, new in zip(manifest["vectors"]["entries"], vectors.meta["entries"]):
        for role, info in old["data"].items():
            now = new["data"][role]["sha256"]
            if now != info["sha256"]:
                raise BakeError(f"steering {old['name']!r}: its {role} texts changed since the bake (sha256 {info['sha256'][:12]}… "
                                f"recorded, {now[:12]}… now): restore them to rebuild the same checkpoint")
    result = fold(recipe.model, vectors, out, dtype=recipe.dtype, force=force, verify=recipe.verify, preview=recipe.preview,
                  base_model_id=recipe.base_model_id, revision=recipe.revision, recipe=recipe,
                  allow_remote_code=manifest["fold"]["remote_code"] is not None)
    files = {p.relative_to(d).as_posix() for d in (folder, Path(out)) for p in d.rglob("*") if p.is_file()} - {MANIFEST}
    differ = sorted(f for f in files if not (folder / f).is_file() or not (Path(out) / f).is_file()
                    or not filecmp.cmp(folder / f, Path(out) / f, shallow=False))
    return result, differ


def _replace_files(folder: Path, texts: dict[str, str]) -> None:
    """Write every file beside its target first, then rename each over it: a reader sees an old or a new
    file, never half of one, and a failed write leaves the old files."""
    temps = {name: folder / f".{name}.tmp" for name in texts}
    try:
        for name, text in texts.items():
            temps[name].write_text(text)
        for name, tmp in temps.items():
            os.replace(tmp, folder / name)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def evaluate_checkpoint(path: str | Path, prompts: list[str] | None = None, tokens: int | None = None) -> dict[str, Any]:
    """Measure a baked checkpoint against the base it was baked from (``bake eval``): effect and cost figures
    (``bake.evaluate``) with the settings of its recipe's ``evaluate`` section, or the defaults for a bake from a
    vector file. The figures go into its ``bake.json`` under ``evaluation`` and its model card."""
    from bake.evaluate import Evaluator, build_data
    from bake.recipe import EvaluateSpec

    folder = Path(path)
    manifest = manifests.read(folder)
    recorded = manifest.get("recipe")
    recipe = parse_recipe(recorded["text"], Path(recorded["base_dir"]), where=f"{folder / MANIFEST} (recipe)") if recorded else None
    spec = recipe.evaluate if recipe else EvaluateSpec()
    spec = spec.model_copy(update={"tokens": tokens}) if tokens else spec
    source = resolve_model(manifest["base"]["spec"], recipe.revision if recipe else None, recipe.base_dir if recipe else None)
    if source.identity != manifest["base"]["identity"]:
        raise BakeError(f"base model {manifest['base']['spec']!r} is not the one {str(folder)!r} was baked from "
                        f"({source.identity} here, {manifest['base']['identity']} recorded): evaluate where that base is available")
    tokenizer = load_tokenizer(folder)
    base = load_model(source.path, dtype=torch.float32)
    data = build_data(spec, tokenizer, recipe, recipe.steering[0] if recipe else None, source.key, lambda: base, prompts, need_effect=False)
    vectors = VectorSet.load(folder / manifest["vector_file"])
    with torch.random.fork_rng():
        torch.manual_seed(recipe.seed if recipe else 0)
        evaluator = Evaluator(base, tokenizer, data, list(vectors.vectors))
        steered = evaluator.measure(load_model(folder, dtype=torch.float32), vectors)
    figures = {side: {k: v for k, v in f.items() if k != "replies"} for side, f in (("base", evaluator.base), ("steered", steered))}
    manifest["evaluation"] = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "headline": data.headline,
        "max_kl": spec.max_kl,
        "within_budget": steered["kl"] <= spec.max_kl,
        **figures,
        "data": data.info,
        "skipped": data.skipped,
        "samples": [{"prompt": p, "base": b, "steered": s} for p, b, s in zip(data.prompts, evaluator.base["replies"], steered["replies"])],
    }
    _replace_files(folder, {MANIFEST: json.dumps(manifest, indent=2) + "\n", "README.md": card.render(manifest)})
    return manifest["evaluation"]
