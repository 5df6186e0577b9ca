"""The vector maths and the activation collection, against independent computations."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tokenizer

from bake.collection.activations import Moments, batches, collect
from bake.collection.methods import steering_vector
from bake.collection.texts import Example, tokenize
from bake.families.hf import family_for
from bake.sources.load import load_model, load_tokenizer
from bake.vectorfile import VectorSet


def _moments(rows: list[list[float]]) -> Moments:
    m = Moments.zeros(len(rows[0]))
    m.add(torch.tensor(rows))
    return m


def test_methods_against_hand_computed_values():
    target = _moments([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])  # mean (2, 3, 4)
    background = _moments([[1.0, 1.0, 1.0], [0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])  # mean (1, 1, 1)
    assert steering_vector("mean-centred", {"target": target, "background": background}, 2.0).tolist() == [
        2.0,
        4.0,
        6.0,
    ]
    assert steering_vector("mean", {"target": target}, 0.5).tolist() == [1.0, 1.5, 2.0]
    for method in ("actadd", "contrast"):
        v = steering_vector(method, {"positive": target, "negative": background}, -1.0)
        assert v.tolist() == [-1.0, -2.0, -3.0]


def test_moments_accumulate_in_float64_and_merge():
    a, b = Moments.zeros(2), Moments.zeros(2)
    a.add(torch.tensor([[3.0, 4.0]], dtype=torch.bfloat16))
    b.add(torch.tensor([[0.0, 0.0], [6.0, 8.0]]))
    a.merge(b)
    assert a.total.dtype == torch.float64
    assert a.count == 3
    assert a.mean.tolist() == [3.0, 4.0]
    assert a.mean_norm == pytest.approx((5 + 0 + 10) / 3)


def test_batches_respect_the_token_budget_and_keep_every_example():
    examples = [Example(list(range(n)), [True] * n) for n in (5, 1, 9, 3, 7, 2)]
    groups = batches(examples, batch_tokens=10)
    assert sorted(len(e.input_ids) for g in groups for e in g) == [1, 2, 3, 5, 7, 9]
    for g in groups:
        width = max(len(e.input_ids) for e in g)
        assert width * len(g) <= 10 or len(g) == 1


TEXTS = [
    "the happy dog is here",
    "a sad cat",
    "tell me about your day today",
    "the king and the dragon in the castle",
    "yes",
]


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("site", ["resid_post", "resid_mid"])
def test_collect_equals_mean_over_full_forward(tiny_models, model_type, site):
    """Running sums with padding, masks and early stop equal a plain per-text mean of the
    activations at the site, computed independently with hooks on an unbatched full forward."""
    model = load_model(tiny_models[model_type], dtype=torch.float32)
    tokenizer = load_tokenizer(tiny_models[model_type])
    family = family_for(model.config)
    examples = tokenize(tokenizer, TEXTS, max_tokens=64)
    layer = 2
    got = collect(model, family, examples, [(layer, site)], batch_tokens=16, pad_id=tokenizer.pad_token_id)[
        (layer, site)
    ]

    # Independent reference: the residual entering the block (output_hidden_states) plus, for the
    # mid site, the attention output hooked directly; for the post site, the block output.
    block = model.get_submodule(family.blocks)[layer]
    attention = block.attn if model_type == "gpt2" else block.self_attn
    captured = []
    handle = (attention if site == "resid_mid" else block).register_forward_hook(
        lambda m, i, o: captured.append((o[0] if isinstance(o, tuple) else o)[0])
    )
    rows = []
    with torch.no_grad():
        for text in TEXTS:
            ids = tokenizer(text).input_ids
            captured.clear()
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            resid = captured[0] + (out.hidden_states[layer][0] if site == "resid_mid" else 0)
            rows.append(resid[1:].double())  # every position but the first (<bos>)
    handle.remove()
    expected = torch.cat(rows)
    assert got.count == expected.shape[0]
    # Batching with padding changes float32 summation order only: agreement to float32 rounding.
    torch.testing.assert_close(got.mean, expected.mean(0), rtol=1e-5, atol=1e-6)
    assert got.mean_norm == pytest.approx(float(expected.norm(dim=-1).mean()), rel=1e-6)


def test_collect_stops_after_the_deepest_block(tiny_models):
    model = load_model(tiny_models["llama"], dtype=torch.float32)
    tokenizer = load_tokenizer(tiny_models["llama"])
    calls = {"later_block": 0, "head": 0}
    model.model.layers[2].register_forward_hook(lambda *a: calls.__setitem__("later_block", calls["later_block"] + 1))
    model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))
    collect(model, family_for(model.config), tokenize(tokenizer, TEXTS, 64), [(1, "resid_post"), (0, "resid_mid")])
    assert calls == {"later_block": 0, "head": 0}


def test_first_position_and_special_tokens_are_never_counted():
    tokenizer = make_tokenizer()
    (ex,) = tokenize(tokenizer, ["the dog <eos> the cat"], max_tokens=64)
    ids = ex.input_ids
    assert ids[0] == tokenizer.bos_token_id and not ex.counted[0]
    assert not ex.counted[ids.index(tokenizer.eos_token_id)]
    assert ex.n_counted == 4


def test_vector_file_round_trip(tmp_path):
    vs = VectorSet(
        {(3, "resid_post"): torch.arange(4.0), (1, "resid_mid"): torch.ones(4, dtype=torch.float64)}, {"x": 1}
    )
    path = vs.save(tmp_path / "v.safetensors")
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        assert sorted(f.keys()) == ["layer.1.mid", "layer.3"]
        assert f.get_tensor("layer.1.mid").dtype == torch.float32
    back = VectorSet.load(path)
    assert back.meta == {"x": 1}
    assert torch.equal(back.vectors[(3, "resid_post")], torch.arange(4.0))
