"""Measuring a recipe: every steering entry's vector at coefficient 1, from the texts of each role.

Only blocks 0..L of the deepest layer L are built; each distinct text set runs through them
once for all the points that need it. ``bake.api.compute_vectors`` scales the result (and
calibrates ``coefficient: auto`` entries); ``bake sweep`` reuses one measurement for a grid.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from bake import manifest as manifests
from bake.collection import sampling
from bake.collection.activations import Moments
from bake.collection.methods import ROLES, steering_vector
from bake.collection.streaming import Job, collect_sets, load_whole
from bake.collection.texts import (
    Example,
    digest,
    last_only,
    load_texts,
    sample_background,
    sample_engine,
    sequences_to_examples,
    tokenize,
    uncounted,
)
from bake.errors import BakeError
from bake.families.hf import Site
from bake.recipe import Recipe, Steering
from bake.sources import trust
from bake.sources.load import family_at, load_tokenizer, text_config
from bake.sources.resolve import ModelSource, cache_dir, resolve_model
from bake.vectorfile import VectorSet, tensor_name

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class _TextSet:
    """One role's examples for one steering entry, with what the manifest records about them."""

    examples: list[Example]
    info: dict[str, Any]

    @functools.cached_property
    def key(self) -> str:
        """The tokens and counted positions themselves: the same texts measured differently (chat, positions) are
        different sets."""
        return digest([json.dumps([e.input_ids, e.counted]) for e in self.examples])


def versions() -> dict[str, str]:
    return manifests.package_versions("bake", "torch", "transformers", "safetensors", "huggingface_hub")


def _engine_version(engine: str) -> str:
    return sampling.version() if engine == "llama.cpp" else manifests.package_versions("transformers")["transformers"]


def _text_sets(recipe: Recipe, entry: Steering, index: int, tokenizer: PreTrainedTokenizerBase) -> dict[str, _TextSet]:
    """Tokenized examples for every role the entry measures from its own texts (all but a background).

    An ActAdd prompt gets the start token in front when the tokenizer adds none (Turner et al. prepend BOS): else
    its first word would be the uncounted attention sink, and a one-word prompt would have nothing to measure.
    A set with no position to average is refused here, before anything slow; texts of a set that have none
    are left out of its mean, with a note."""
    where = f"steering.{index} ({entry.name})"
    sets: dict[str, _TextSet] = {}
    for role in ROLES[entry.method]:
        if role == "background":
            continue
        actadd = entry.method == "actadd"
        what = f"{where}.{role}_prompt" if actadd else f"{where}.{role}"
        texts = [getattr(entry, f"{role}_prompt")] if actadd else load_texts(getattr(entry, role), recipe, what)
        examples = tokenize(
            tokenizer, texts, recipe.max_tokens, entry.chat, entry.chat_prompt, entry.positions, start=actadd
        )
        _refuse_empty(what, texts, examples, tokenizer, recipe.max_tokens)
        info = {"kind": "texts", "texts": len(texts), "sha256": digest(texts), "chat": entry.chat}
        info["positions"] = entry.positions
        info["tokens"] = sum(e.n_counted for e in examples)
        sets[role] = _TextSet(examples, info)
    return sets


def _background_set(
    recipe: Recipe,
    entry: Steering,
    index: int,
    full_model: Callable[[], PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    source: ModelSource,
    engine: str | None,
) -> _TextSet:
    """The entry's background examples (``full_model()`` loads the whole model, needed only to sample a background
    that is not cached; ``engine``: the recorded sampler)."""
    where = f"steering.{index} ({entry.name}).background"
    bg = recipe.background_for(entry)
    if bg.sample is not None:
        engine = sample_engine(source.gguf, engine, bg.sample.engine)
        sequences, key = sample_background(
            full_model, tokenizer, source.key, bg.sample, recipe.seed, cache_dir(), engine, source.gguf
        )
        examples = sequences_to_examples(sequences, tokenizer)
        examples = [last_only(e) for e in examples] if bg.positions == "last" else examples
        info = {
            "kind": "model-sample",
            **bg.sample.model_dump(exclude={"engine"}),
            "seed": recipe.seed,
            "texts": len(sequences),
        }
        info["engine"] = {"name": engine, "version": _engine_version(engine)}
        info["sha256"] = digest([json.dumps(s) for s in sequences])
        if not any(e.n_counted for e in examples):
            raise BakeError(f"{where}: every sampled sequence ended at once: sample more or longer sequences")
    else:
        texts = load_texts(bg.corpus, recipe, where)
        examples = tokenize(tokenizer, texts, recipe.max_tokens, positions=bg.positions)
        _refuse_empty(where, texts, examples, tokenizer, recipe.max_tokens)
        info = {"kind": "corpus", "texts": len(texts), "sha256": digest(texts)}
    info["positions"] = bg.positions
    info["tokens"] = sum(e.n_counted for e in examples)
    return _TextSet(examples, info)


def _refuse_empty(
    what: str, texts: list[str], examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_tokens: int
) -> None:
    """Refuse a text set with no position to average; note the texts that have none (left out of its mean)."""
    if not texts:
        raise BakeError(f"{what}: no tokens to average: no texts (empty lines and values are skipped): give texts")
    empty = [(t, e) for t, e in zip(texts, examples) if not e.n_counted]
    if not empty:
        return
    why = uncounted(tokenizer, *empty[0], max_tokens)
    if len(empty) == len(texts):
        raise BakeError(f"{what}: no tokens to average: {why}")
    print(
        f"{what}: {len(empty)} of {len(texts)} texts have no tokens to average, left out of the mean: {why}",
        file=sys.stderr,
    )


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
            entries.append(
                {
                    **entry,
                    "coefficient": c,
                    "norm": float(v.norm()),
                    "relative_norm": float(v.norm()) / mean_norm if mean_norm else 0.0,
                    **(records or {}).get(i, {}),
                }
            )
        return VectorSet(vectors, {**self.meta, "entries": entries})


def measure_vectors(recipe: Recipe, engine: str | None = None) -> MeasuredVectors:
    """Every steering entry of ``recipe`` measured on its base model, at coefficient 1.

    A sampled background is made by ``engine`` (``bake.collection.texts.ENGINES``; default: the recipe's choice).

    Only blocks 0..L of the deepest layer
    L are built and loaded (all at once, or one at a time per ``recipe.collection``: bake.collection.streaming);
    each distinct text set runs through them once, for all the points that need it. The full model
    is loaded only to sample a background that is not cached yet.
    """
    source = resolve_model(recipe.model, recipe.revision, recipe.base_dir)
    trust.refuse_steered_source(source.config, f"model {recipe.model!r}")
    cfg = text_config(source.path)
    family = family_at(source.path)
    for i, entry in enumerate(recipe.steering):
        if entry.layer == "auto":
            raise BakeError(
                f"steering.{i}.layer: auto is chosen by a sweep (bake.compute_vectors, bake run): measure at a block"
            )
        if not 0 <= entry.layer < cfg.num_hidden_layers:
            raise BakeError(
                f"steering.{i}.layer: {entry.layer} is outside the model's blocks 0..{cfg.num_hidden_layers - 1}: "
                "pick a layer in range"
            )
        try:
            family.slot(entry.site, cfg)
        except BakeError as e:
            raise BakeError(f"steering.{i}.site: {e}") from None
    tokenizer = load_tokenizer(source.path)
    full_model = functools.cache(lambda: load_whole(source.path, f"model {recipe.model!r}"))
    # Every entry's own texts are checked before any background is sampled (minutes on a large model).
    role_sets = [_text_sets(recipe, entry, i, tokenizer) for i, entry in enumerate(recipe.steering)]
    for i, (entry, sets) in enumerate(zip(recipe.steering, role_sets)):
        if "background" in ROLES[entry.method]:
            sets["background"] = _background_set(recipe, entry, i, full_model, tokenizer, source, engine)
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
                "positions": entry.positions,
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
        "versions": versions(),
    }
    return MeasuredVectors(points, units, entries, meta)


def entry_table(entries: list[dict[str, Any]]) -> str:
    """The vector entries as a text table (name, point, method, coefficient, norms, tokens counted)."""
    rows = [f"{'name':<16} {'layer':>5} {'site':<10} {'method':<13} {'coef':>7} {'norm':>9} {'rel.norm':>8} tokens"]
    for e in entries:
        tokens = ", ".join(f"{r}={c['tokens']}" for r, c in e["counts"].items())
        rows.append(
            f"{e['name']:<16} {e['layer']:>5} {e['site']:<10} {e['method']:<13} {e['coefficient']:>7g} "
            f"{e['norm']:>9.3f} {e['relative_norm']:>8.3f} {tokens}"
        )
        if "auto" in e:
            a = e["auto"]
            rows.append(
                f"  coefficient auto: {a['chosen']:g}, the largest of the {len(a['grid'])} on the grid whose KL "
                f"({a['kl']:.3g}) is within max_kl {a['max_kl']:g} (perplexity {a['base_perplexity']:.3g} -> "
                f"{a['perplexity']:.3g})"
            )
        if "layer_auto" in e:
            a = e["layer_auto"]
            rows.append(
                f"  layer auto: {a['chosen']}, of {a['layers']}: the most {a['headline']} ({a['goal']}) within max_kl "
                f"{a['max_kl']:g}, at coefficient {a['coefficient']:g}"
            )
        if "compare" in e:
            c = e["compare"]
            compared = ", ".join(r["method"] for r in c["rows"])
            rows.append(
                f"  NOTE: {c['verdict']}"
                if c["verdict"]
                else f"  compared at max_kl {c['max_kl']:g} ({compared}): no method clearly beats {e['method']} on "
                f"{c['headline']}"
            )
    return "\n".join(rows)
