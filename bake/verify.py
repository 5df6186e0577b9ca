"""Baked vs hooked: measure that the written checkpoint behaves exactly like the steered base.

The reference is the base model with a forward hook adding each vector to the
residual stream at its site; the candidate is the baked checkpoint loaded from
disk with plain ``AutoModelForCausalLM.from_pretrained`` (with ``trust_remote_code=True``
for a constant-bias module, ``bake.remote``, and only then). Checked: max |Δlogit|
over probe prompts, identical greedy continuations, and that the steering is
present at all (a bias the config does not switch on is silently dropped).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch

from bake.activations import hook_module
from bake.architectures import Family, family_for
from bake.models import load_model, load_tokenizer, prompt_ids
from bake.vectorfile import VectorSet

# Default max |Δlogit| per compute dtype: hook and bias add the same numbers in a
# different order, so the gap is rounding noise amplified through later blocks.
DEFAULT_ATOL = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.05}


@contextlib.contextmanager
def steered(model: torch.nn.Module, family: Family, vectors: VectorSet) -> Iterator[torch.nn.Module]:
    """The model with every vector added to the residual stream by a forward hook at its (layer, site)."""

    def adder(v: torch.Tensor):
        def hook(_module, _inputs, output):
            if isinstance(output, tuple):
                return (output[0] + v.to(output[0].dtype),) + output[1:]
            return output + v.to(output.dtype)
        return hook

    handles = []
    for (layer, site), v in vectors.vectors.items():
        slot = family.slot(site, model.config)
        if slot.scale and slot.hook:  # a sublayer output is scaled before it joins the residual
            v = v / getattr(model.config, slot.scale)
        handles.append(hook_module(model, family, layer, site).register_forward_hook(adder(v)))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def _logits(model, ids: list[list[int]]) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([x])).logits[0].float() for x in ids]


@torch.inference_mode()
def _greedy(model, ids: list[list[int]], tokens: int, pad_id: int) -> list[list[int]]:
    out = []
    for x in ids:
        t = torch.tensor([x])
        g = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=tokens, do_sample=False, pad_token_id=pad_id)
        out.append(g[0, len(x) :].tolist())
    return out


@torch.inference_mode()
def _divergences(hooked, ids: list[list[int]], ref: list[list[int]], other: list[list[int]], margin: float) -> tuple[int, int]:
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


def compare(base, baked, tokenizer, vectors: VectorSet, prompts: list[str], tokens: int = 16, atol: float | None = None) -> dict[str, Any]:
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
    plain_logits = _logits(base, ids)
    baked_greedy = _greedy(baked, ids, tokens, tokenizer.pad_token_id)
    with steered(base, family, vectors):
        hooked_logits = _logits(base, ids)
        hooked_greedy = _greedy(base, ids, tokens, tokenizer.pad_token_id)
        divergent, ties = _divergences(base, ids, hooked_greedy, baked_greedy, 2 * atol)
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
        "passed": diff <= atol and greedy_ok and present,
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
    reasons = []
    if report["max_abs_logit_diff"] > report["atol"]:
        reasons.append("logits differ beyond tolerance")
    if not report["greedy_ok"]:
        reasons.append("greedy continuations differ")
    if not report["steering_present"]:
        reasons.append("the baked model behaves like the unsteered base: the steering was dropped on load")
    why = f" ({'; '.join(reasons)})" if reasons else ""
    return (
        f"verification {verdict}{why}: max |Δlogit| {report['max_abs_logit_diff']:.2e} (tolerance {report['atol']:.0e}, "
        f"{report['dtype']}) over {report['prompts']} prompts; greedy {report['greedy_tokens']} tokens "
        f"{_greedy_words(report)}; steering effect {report['steering_effect']:.3g}"
    )


def verify(base: Path, baked: Path, vectors: VectorSet, prompts: list[str], tokens: int = 16, atol: float | None = None) -> dict[str, Any]:
    """Load both checkpoints from disk in the baked model's dtype and compare (the stock loader; a bake
    constant-bias module with ``trust_remote_code=True``, see ``bake.models.load_model``)."""
    baked_model = load_model(baked)
    dtype = next(baked_model.parameters()).dtype
    base_model = load_model(base, dtype=dtype)
    return compare(base_model, baked_model, load_tokenizer(baked), vectors, prompts, tokens, atol)
