"""Verification and preview decode all prompts in one left-padded batch: the same tokens as one prompt at a time,
and a wrong fold is still caught, on its logits and on its greedy tokens."""

from __future__ import annotations

import pytest
import torch

import bake
from bake.families.hf import family_for
from bake.sources.load import generate, greedy_ids, load_model, load_tokenizer, prompt_ids
from bake.vectorfile import VectorSet
from bake.verify import compare, steered

# Of different lengths, so the batch is padded.
PROMPTS = ["the happy dog is here", "a king", "tell me about your day and the weather today"]


def _alone(model: torch.nn.Module, ids: list[list[int]], tokens: int, pad: int) -> list[list[int]]:
    """The path before batching: one prompt at a time, no padding."""
    out = []
    for x in ids:
        t = torch.tensor([x])
        g = model.generate(
            t, attention_mask=torch.ones_like(t), max_new_tokens=tokens, do_sample=False, pad_token_id=pad
        )
        out.append(g[0, len(x) :].tolist())
    return out


def _vectors(hidden: int, scale: float) -> VectorSet:
    g = torch.Generator().manual_seed(1)
    return VectorSet({(1, "resid_post"): scale * torch.randn(hidden, generator=g)})


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_batched_greedy_equals_one_prompt_at_a_time(tiny_models, model_type):
    """Plain and hook-steered: every row of the left-padded batch continues as its prompt does alone."""
    model, tokenizer = load_model(tiny_models[model_type]), load_tokenizer(tiny_models[model_type])
    ids = [prompt_ids(tokenizer, p, chat=False) for p in PROMPTS]
    pad = tokenizer.pad_token_id
    assert len({len(x) for x in ids}) == 3
    with steered(model, family_for(model.config), _vectors(32, 3.0)):
        assert greedy_ids(model, ids, 12, pad) == _alone(model, ids, 12, pad)
    assert greedy_ids(model, ids, 12, pad) == _alone(model, ids, 12, pad)
    texts = [tokenizer.decode(x, skip_special_tokens=True).strip() for x in _alone(model, ids, 12, pad)]
    assert generate(model, tokenizer, PROMPTS, 12) == texts


def test_batched_verification_passes_a_right_fold_and_catches_a_wrong_one(tiny_models, tmp_path):
    """The baked model against the base hooked with the vector it was folded with, and with one half as large: the
    right one passes with identical greedy tokens; the wrong one fails, and its count of divergent continuations is
    the one-prompt-at-a-time count."""
    src = tiny_models["llama"]
    vectors = _vectors(32, 1.0)
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
