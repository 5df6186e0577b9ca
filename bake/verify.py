"""Baked vs hooked: measure that the written checkpoint behaves exactly like the steered base.

The reference is the base model with a forward hook adding each vector to the
residual stream at its site; the candidate is the baked checkpoint loaded from
disk with plain ``AutoModelForCausalLM.from_pretrained`` (with ``trust_remote_code=True``
for a constant-bias module, ``bake.formats.hf.remote``, and only then). Checked: max |Δlogit|
over probe prompts, identical greedy continuations, and that the steering is
present at all (a bias the config does not switch on is silently dropped).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from bake.collection.activations import first_tensor, hook_module, module_at, watch_residual
from bake.collection.streaming import (
    Skeleton,
    embed_prompts,
    fits_in_memory,
    in_memory_bytes,
    input_of,
    meta_model,
    prompt_logits,
    resumed_at,
    run_block,
)
from bake.errors import BakeError
from bake.families.hf import Family, family_for
from bake.recipe import Collection
from bake.sources.load import family_at, load_model, load_tokenizer, prompt_ids, source_dtype
from bake.vectorfile import Point, VectorSet, tensor_name

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Default max |Δlogit| per compute dtype: hook and bias add the same numbers in a
# different order, so the gap is rounding noise amplified through later blocks.
DEFAULT_ATOL = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.05}
# A steered model this far gone matches its hooked twin and still says nothing: baked and hooked are equally dead.
MAX_RELATIVE_NORM = 100.0  # vector norm / mean residual norm at its layer (the card's rel.norm)
MIN_LOGIT_STD = 1e-4  # std of the logits over the vocabulary at a probe position: below it, every token is equal


@contextlib.contextmanager
def steered(
    model: torch.nn.Module, family: Family, vectors: VectorSet | Sequence[VectorSet]
) -> Iterator[torch.nn.Module]:
    """The model with every vector added to the residual stream by a forward hook at its (layer, site).

    A list of K vector sets steers K settings in one batch: every batch then holds K blocks of rows, settings-major,
    and the rows of block i get set i's vectors (a zero vector at a point set i does not steer, which adds exactly
    nothing). So K coefficients or layers decode and score together, each row computing what it would alone.
    Below the shallowest steered layer every block of rows computes the same numbers, so a pass without a KV cache
    runs those blocks once on one block of rows (``_shared_prefix``).
    """
    sets = [vectors] if isinstance(vectors, VectorSet) else list(vectors)

    def adder(v: torch.Tensor):
        def add(x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] % len(v):
                raise ValueError(f"a batch of {x.shape[0]} rows cannot hold {len(v)} steering settings")
            return x + v.to(x.dtype).repeat_interleave(x.shape[0] // len(v), dim=0).unsqueeze(1)

        def hook(_module: torch.nn.Module, _inputs: tuple[Any, ...], output: Any):
            if isinstance(output, tuple):
                return (add(output[0]),) + output[1:]
            return add(output)

        return hook

    handles = []
    for layer, site in sorted({p for s in sets for p in s.vectors}):
        vs = [s.vectors.get((layer, site)) for s in sets]
        like = next(v for v in vs if v is not None)
        v = torch.stack([torch.zeros_like(like) if x is None else x for x in vs])
        slot = family.slot(site, model.config)
        if slot.scale and slot.hook:  # a sublayer output is scaled before it joins the residual
            v = v / getattr(model.config, slot.scale)
        handles.append(hook_module(model, family, layer, site).register_forward_hook(adder(v)))
    shallowest = min((layer for layer, _ in {p for s in sets for p in s.vectors}), default=0)
    if len(sets) > 1 and shallowest > 0:
        handles += _shared_prefix(model, family, shallowest, len(sets))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


# The keywords of a pass whose prefix ``_shared_prefix`` may share: the rows' own inputs (cut to one block of rows
# for the shared part), flags and an empty KV cache; a call with any other runs as it is.
_ROW_INPUTS = ("input_ids", "attention_mask", "position_ids")
_FLAGS = ("use_cache", "logits_to_keep", "return_dict")


def _shared_prefix(
    model: torch.nn.Module, family: Family, layer: int, settings: int
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks on the model making a pass whose rows are ``settings`` identical blocks run blocks 0..layer-1 (which no
    setting steers) on the first block alone, and block ``layer`` get that result repeated: identical inputs give
    identical outputs, so the numbers are the same for 1/K of the work below the shallowest steered layer.

    Shared: passes without a KV cache (the evaluator's forwards over texts) and generation's prefill, whose empty
    cache gets the lower layers' keys and values repeated the same way. Decoding steps are not (their rows differ)."""
    from transformers.cache_utils import Cache  # startup

    blocks = module_at(model, family.blocks)
    state: dict[str, Any] = {"inner": False, "open": None}

    def before(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        caches = [k for k, v in kwargs.items() if isinstance(v, Cache)]
        if state["inner"] or args or set(kwargs) - {*_ROW_INPUTS, *_FLAGS, *caches}:
            return
        cached = kwargs.get("use_cache") is True and len(caches) == 1 and kwargs[caches[0]].get_seq_length() == 0
        ids = kwargs.get("input_ids")
        if not (cached or (kwargs.get("use_cache") is False and not caches)) or ids is None or ids.shape[0] % settings:
            return
        rows = ids.shape[0] // settings
        one = {k: x[:rows] for k in _ROW_INPUTS if torch.is_tensor(x := kwargs.get(k)) and len(x) == len(ids)}
        if not all(torch.equal(kwargs[k], x.repeat(settings, 1)) for k, x in one.items()):
            return
        state["inner"] = True  # the call below runs this model's hooks too
        try:
            hidden, call = input_of(module, blocks, layer, **one, use_cache=cached)
        finally:
            state["inner"] = False
        then = lambda: None  # noqa: E731
        if cached:  # the model made its own cache for the rows of one block: repeat it as the settings' rows
            theirs, ours = kwargs[caches[0]], next((v for v in call.values() if isinstance(v, Cache)), None)
            if ours is None or [type(x) for x in theirs.layers[:layer]] != [type(x) for x in ours.layers[:layer]]:
                return
            ours.batch_repeat_interleave(settings)  # [row 0 x K, row 1 x K, ...], then settings-major
            ours.batch_select_indices(
                torch.arange(rows * settings, device=ids.device).view(rows, settings).T.reshape(-1)
            )

            def then() -> None:  # after the model built its masks from the empty cache
                theirs.layers[:layer] = ours.layers[:layer]

        state["open"] = resumed_at(blocks, layer, hidden.repeat(settings, *[1] * (hidden.dim() - 1)), then)
        state["open"].__enter__()

    def after(_module: torch.nn.Module, _args: tuple, _output: Any) -> None:
        if state["open"] is not None and not state["inner"]:
            opened, state["open"] = state["open"], None
            opened.__exit__(None, None, None)

    return [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, always_call=True),
    ]


@torch.inference_mode()
def _logits(model: PreTrainedModel, ids: list[list[int]]) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([x])).logits[0].float() for x in ids]


@contextlib.contextmanager
def _norms_recorded(
    model: PreTrainedModel, family: Family, points: list[Point], totals: dict[Point, list]
) -> Iterator[None]:
    """While open, each forward adds the L2 norms of the residual at each point (one prompt, its first token
    left out as the collection leaves it out) to ``totals[point]`` = [sum, count]."""

    def recorder(point: Point):
        def record(residual: torch.Tensor) -> None:
            norms = residual[0, 1:].float().norm(dim=-1) if residual.shape[1] > 1 else residual[0].float().norm(dim=-1)
            totals[point][0] += float(norms.sum())
            totals[point][1] += norms.numel()

        return record

    handles = [watch_residual(model, family, layer, site, recorder((layer, site))) for layer, site in points]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _means(totals: dict[Point, list]) -> dict[Point, float]:
    return {p: total / count if count else 0.0 for p, (total, count) in totals.items()}


@torch.inference_mode()
def residual_norms(
    model: PreTrainedModel, family: Family, ids: list[list[int]], points: list[Point]
) -> dict[Point, float]:
    """Mean L2 norm of the unsteered residual at each point over the probe tokens: the scale a vector's norm is
    judged against."""
    totals = {p: [0.0, 0] for p in points}
    with _norms_recorded(model, family, points, totals):
        for x in ids:
            model(input_ids=torch.tensor([x]))
    return _means(totals)


def _lower(vectors: VectorSet, point: Point) -> str:
    """What to lower for the vector at ``point``: its recipe entries' coefficients, else the vector itself."""
    name = tensor_name(*point)
    entries = [e for e in vectors.meta.get("entries", []) if isinstance(e, dict) and e.get("tensor") == name]
    if entries:
        named = ", ".join(f"steering {e.get('name')!r} ({e.get('coefficient')})" for e in entries)
        return f"lower the coefficient of {named}"
    return f"lower the coefficient (scale the vector {name} down)"


def degenerate(logits: list[torch.Tensor], vectors: VectorSet, residual: dict[Point, float]) -> list[str]:
    """Why the steered model is useless even if baked and hooked agree: a vector absurdly large against the
    residual it joins, non-finite logits, or logits equal over the whole vocabulary (a dead model)."""
    problems = []
    for point, v in sorted(vectors.vectors.items()):
        norm, scale = float(v.double().norm()), residual[point]  # float64: a huge vector's float32 norm is inf
        if norm > MAX_RELATIVE_NORM * scale:
            ratio = f"{norm / scale:.3g}x" if scale > 0 else "infinitely"
            problems.append(
                f"vector {tensor_name(*point)} has norm {norm:.3g}, {ratio} the mean residual norm "
                f"{scale:.3g} at its layer (at most {MAX_RELATIVE_NORM:g}x): {_lower(vectors, point)}"
            )
    if problems:  # the logits of such a model say nothing more
        return problems
    worst = max(
        vectors.vectors, default=None, key=lambda p: float(vectors.vectors[p].double().norm()) / max(residual[p], 1e-30)
    )
    fix = _lower(vectors, worst) if worst is not None else "check the base model"
    if not all(bool(torch.isfinite(x).all()) for x in logits):
        problems.append(f"the steered model's logits are NaN or inf: {fix}")
    elif min(float(x.std(dim=-1).min()) for x in logits) < MIN_LOGIT_STD:
        problems.append(f"the steered model's logits are constant over the vocabulary (a dead model): {fix}")
    return problems


@torch.inference_mode()
def _greedy(model: PreTrainedModel, ids: list[list[int]], tokens: int, pad_id: int) -> list[list[int]]:
    out = []
    for x in ids:
        t = torch.tensor([x])
        g = model.generate(
            t, attention_mask=torch.ones_like(t), max_new_tokens=tokens, do_sample=False, pad_token_id=pad_id
        )
        out.append(g[0, len(x) :].tolist())
    return out


@torch.inference_mode()
def _divergences(
    hooked: PreTrainedModel, ids: list[list[int]], ref: list[list[int]], other: list[list[int]], margin: float
) -> tuple[int, int]:
    """(divergent continuations, of which near-ties): where two greedy runs first differ, is the
    reference's preference for its own token within ``margin`` logits, i.e. a rounding-level tie?"""
    divergent = ties = 0
    for prompt, a, b in zip(ids, ref, other):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if k is None:
            continue
        divergent += 1
        logits = hooked(input_ids=torch.tensor([prompt + a[:k]])).logits[0, -1].float()
        ties += float(logits[a[k]] - logits[b[k]]) <= margin
    return divergent, ties


def compare(
    base: PreTrainedModel,
    baked: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    vectors: VectorSet,
    prompts: list[str],
    tokens: int = 16,
    atol: float | None = None,
) -> dict[str, Any]:
    """Compare ``baked`` with ``base`` steered by hooks; returns the figures and ``passed``.

    Greedy continuations must be identical; in low precision a divergence is
    tolerated only at a near-tie (the steered base prefers its token by at most
    twice the logit tolerance), where rounding alone can flip the choice.
    """
    family = family_for(base.config)
    dtype = next(baked.parameters()).dtype
    atol = atol if atol is not None else DEFAULT_ATOL.get(dtype, 1e-3)
    ids = [prompt_ids(tokenizer, p, chat=False) for p in prompts]
    baked_logits = _logits(baked, ids)
    totals = {p: [0.0, 0] for p in sorted(vectors.vectors)}
    with _norms_recorded(base, family, sorted(totals), totals):  # the unsteered pass measures the residual too
        plain_logits = _logits(base, ids)
    residual = _means(totals)
    baked_greedy = _greedy(baked, ids, tokens, tokenizer.pad_token_id)
    with steered(base, family, vectors):
        hooked_logits = _logits(base, ids)
        hooked_greedy = _greedy(base, ids, tokens, tokenizer.pad_token_id)
        divergent, ties = _divergences(base, ids, hooked_greedy, baked_greedy, 2 * atol)
    dead = degenerate(hooked_logits + baked_logits, vectors, residual)
    diff = max(float((a - b).abs().max()) for a, b in zip(baked_logits, hooked_logits))
    effect = max(float((a - b).abs().max()) for a, b in zip(baked_logits, plain_logits))
    has_steering = any(float(v.abs().max()) > 0 for v in vectors.vectors.values())
    present = effect > atol or not has_steering
    greedy_ok = divergent == 0 or (dtype != torch.float32 and ties == divergent)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "prompts": len(prompts),
        "max_abs_logit_diff": diff,
        "max_abs_logit": max(float(a.abs().max()) for a in hooked_logits),
        "atol": atol,
        "greedy_tokens": tokens,
        "greedy_identical": divergent == 0,
        "greedy_divergent": divergent,
        "greedy_near_ties": ties,
        "greedy_ok": greedy_ok,
        "steering_effect": effect,
        "steering_present": present,
        "degenerate": dead,
        "passed": diff <= atol and greedy_ok and present and not dead,
    }


def _greedy_words(report: dict[str, Any]) -> str:
    if report.get("streamed"):
        return "not run (verified block by block)"
    if report["greedy_identical"]:
        return "identical"
    return f"{report['greedy_divergent']} of {report['prompts']} diverge ({report['greedy_near_ties']} at near-ties)"


def describe(report: dict[str, Any]) -> str:
    """One line saying what was measured and whether it passed."""
    verdict = "PASSED" if report["passed"] else "FAILED"
    reasons = list(report.get("degenerate", []))  # absent from the reports of bakes before the check
    if report["max_abs_logit_diff"] > report["atol"]:
        reasons.append("logits differ beyond tolerance")
    if not report["greedy_ok"]:
        reasons.append("greedy continuations differ")
    if not report["steering_present"]:
        reasons.append("the baked model behaves like the unsteered base: the steering was dropped on load")
    why = f" ({'; '.join(reasons)})" if reasons else ""
    return (
        f"verification {verdict}{why}: max |Δlogit| {report['max_abs_logit_diff']:.2e} (tolerance "
        f"{report['atol']:.0e}, {report['dtype']}) over {report['prompts']} prompts; greedy {report['greedy_tokens']} "
        f"tokens {_greedy_words(report)}; steering effect {report['steering_effect']:.3g}"
    )


def verify(
    base: Path, baked: Path, vectors: VectorSet, prompts: list[str], tokens: int = 16, atol: float | None = None
) -> dict[str, Any]:
    """Load both checkpoints from disk in the baked model's dtype and compare (the stock loader; a bake
    constant-bias module with ``trust_remote_code=True``, see ``bake.sources.load.load_model``)."""
    baked_model = load_model(baked)
    dtype = next(baked_model.parameters()).dtype
    base_model = load_model(base, dtype=dtype)
    return compare(base_model, baked_model, load_tokenizer(baked), vectors, prompts, tokens, atol)


@torch.inference_mode()
def compare_streaming(
    base: Path,
    baked: Path,
    vectors: VectorSet,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    atol: float | None = None,
    layers: int | None = None,
) -> dict[str, Any]:
    """``bake.verify.compare`` block by block: the base (plain and hook-steered) and the baked checkpoint streamed
    side by side, one block of each in memory, in float32; the logits of blocks 0..layers-1 (all when None).

    Greedy continuations are not compared (generation reads every weight per token); the residual after every
    block is, hooked vs baked, so a gap is located. The tolerance is that of the baked checkpoint's stored dtype.
    """
    ids = [prompt_ids(tokenizer, p, chat=False) for p in prompts]
    sides = {
        name: Skeleton(path, family_at(path), meta_model(path, layers))
        for name, path in (("base", base), ("baked", baked))
    }
    base_sk, baked_sk = sides["base"], sides["baked"]
    if len(base_sk.blocks) != len(baked_sk.blocks):
        raise BakeError(
            f"{str(baked)!r} has {len(baked_sk.blocks)} blocks, its base {len(base_sk.blocks)}: not a bake of it"
        )
    plain, base_calls = embed_prompts(base_sk, ids)
    baked_h, baked_calls = embed_prompts(baked_sk, ids)
    hooked = list(plain)
    totals = {p: [0.0, 0] for p in sorted(vectors.vectors)}
    outputs: dict[str, list[Any]] = {k: [None] * len(ids) for k in ("plain", "hooked", "baked")}
    block_diffs = []
    for i in tqdm(range(len(base_sk.blocks)), desc="verifying", unit="block", leave=False):
        base_block, baked_block = base_sk.load_block(i), baked_sk.load_block(i)
        worst = 0.0
        for p in range(len(ids)):
            with _norms_recorded(base_sk.model, base_sk.family, sorted(totals), totals):
                outputs["plain"][p] = run_block(base_block, base_calls[p][i], plain[p])
            with steered(base_sk.model, base_sk.family, vectors):
                outputs["hooked"][p] = run_block(base_block, base_calls[p][i], hooked[p])
            outputs["baked"][p] = run_block(baked_block, baked_calls[p][i], baked_h[p])
            plain[p], hooked[p], baked_h[p] = (first_tensor(outputs[k][p]) for k in ("plain", "hooked", "baked"))
            worst = max(worst, float((hooked[p] - baked_h[p]).abs().max()))
        block_diffs.append(worst)
        base_sk.free_block(i)
        baked_sk.free_block(i)
    plain_logits = prompt_logits(base_sk, ids, outputs["plain"])
    hooked_logits = prompt_logits(base_sk, ids, outputs["hooked"])
    baked_logits = prompt_logits(baked_sk, ids, outputs["baked"])
    atol = atol if atol is not None else DEFAULT_ATOL.get(source_dtype(baked_sk.ckpt.config), 1e-3)
    diff = max(float((a - b).abs().max()) for a, b in zip(baked_logits, hooked_logits))
    effect = max(float((a - b).abs().max()) for a, b in zip(baked_logits, plain_logits))
    present = effect > atol or not any(float(v.abs().max()) > 0 for v in vectors.vectors.values())
    dead = degenerate(hooked_logits + baked_logits, vectors, _means(totals))
    return {
        "dtype": "float32",
        "prompts": len(prompts),
        "max_abs_logit_diff": diff,
        "max_abs_logit": max(float(a.abs().max()) for a in hooked_logits),
        "atol": atol,
        "greedy_tokens": 0,
        "greedy_identical": True,
        "greedy_divergent": 0,
        "greedy_near_ties": 0,
        "greedy_ok": True,
        "steering_effect": effect,
        "steering_present": present,
        "streamed": True,
        "max_abs_residual_diff_per_block": block_diffs,
        "degenerate": dead,
        "passed": diff <= atol and present and not dead,
    }


def streams_verification(path: Path, layers: int | None, collection: Collection, remote_code: bool) -> bool:
    """Whether verification streams: when asked, or (``auto``) when base and baked model would not fit in memory
    together. A constant-bias module (``bake.formats.hf.remote``) is verified in memory only, loaded as its users
    load it."""
    if collection == "memory":
        return False
    streamed = collection == "streaming" or not fits_in_memory(2 * in_memory_bytes(meta_model(path, layers)))
    if streamed and remote_code:
        raise BakeError(
            "a constant-bias module (allow_remote_code) is verified in memory, loaded with "
            "trust_remote_code as its users load it, and streaming verification cannot do that: set "
            "'collection: memory' on a machine where base and baked model fit, or bake a site with a "
            "stock bias slot"
        )
    return streamed
