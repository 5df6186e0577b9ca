"""Verification catches a wrong fold on its logits and on its greedy tokens, counting divergent continuations as
an independent one-prompt-at-a-time decode does."""

from __future__ import annotations

import torch

import bake
from bake.families.hf import family_for
from bake.sources.load import load_model, load_tokenizer, prompt_ids
from bake.vectorfile import VectorSet
from bake.verify import compare, steered

PROMPTS = ["the happy dog is here", "a king", "tell me about your day and the weather today"]


def _alone(model: torch.nn.Module, ids: list[list[int]], tokens: int, pad: int) -> list[list[int]]:
    out = []
    for x in ids:
        t = torch.tensor([x])
        g = model.generate(
            t, attention_mask=torch.ones_like(t), max_new_tokens=tokens, do_sample=False, pad_token_id=pad
        )
        out.append(g[0, len(x) :].tolist())
    return out


def test_verification_passes_a_right_fold_and_catches_a_wrong_one(tiny_models, tmp_path):
    """The baked model against the base hooked with the vector it was folded with, and with one half as large: the
    right one passes with identical greedy tokens; the wrong one fails, with the independent count of divergent
    continuations."""
    src = tiny_models["llama"]
    g = torch.Generator().manual_seed(1)
    vectors = VectorSet({(1, "resid_post"): torch.randn(32, generator=g)})
    out = bake.fold(str(src), vectors, tmp_path / "out").path
    base, baked, tokenizer = load_model(src), load_model(out), load_tokenizer(src)
    right = compare(base, baked, tokenizer, vectors, PROMPTS, tokens=12)
    assert right["passed"] and right["greedy_identical"] and right["max_abs_logit_diff"] < 1e-4
    wrong_vectors = VectorSet({p: 0.5 * v for p, v in vectors.vectors.items()})
    wrong = compare(base, baked, tokenizer, wrong_vectors, PROMPTS, tokens=12)
    assert not wrong["passed"] and wrong["max_abs_logit_diff"] > wrong["atol"]
    ids = [prompt_ids(tokenizer, p, chat=False) for p in PROMPTS]
    pad = tokenizer.pad_token_id
    with steered(base, family_for(base.config), wrong_vectors):
        hooked = _alone(base, ids, 12, pad)
    expected = sum(a != b for a, b in zip(hooked, _alone(baked, ids, 12, pad)))
    assert expected > 0 and wrong["greedy_divergent"] == expected and not wrong["greedy_ok"]
