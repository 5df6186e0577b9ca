"""ActAdd's prompts and empty text sets (issue #17): a tokenizer that adds no BOS (SmolLM2's, GPT-2's) puts a
prompt's first word at the uncounted first position, so a one-word prompt measured nothing. ActAdd prompts now get
the start token in front; a set with nothing to average is one line before anything slow, a partly empty one a note.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import tree_digest
from test_cli import assert_nothing_written, assert_one_line_error

from bake.cli import main
from bake.collection import measure
from bake.collection.measure import measure_vectors
from bake.recipe import parse_recipe
from bake.sources.load import load_model, load_tokenizer

LAYER = 1


def _recipe(model: Path, entry: str, tmp_path: Path, background: str = '{corpus: ["the sun and the rain"]}'):
    return parse_recipe(f"model: {model}\nbackground: {background}\nsteering:\n  - {entry}\n", tmp_path)


def _mean_after_first(model_path: Path, ids: list[int]) -> torch.Tensor:
    """The mean residual after block LAYER over every position but the first, from a plain forward of ``ids``."""
    model = load_model(model_path, dtype=torch.float32)
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYER + 1][0]
    return hidden[1:].double().mean(0)


@pytest.mark.parametrize(
    "positive,negative", [("love", "hate"), ("love the sun", "hate the rain"), ("love", "hate the dark night")]
)
def test_actadd_without_bos_measures_every_word_after_the_start_token(tiny_no_bos, tmp_path, positive, negative):
    """The reproduction: on a tokenizer that adds no BOS, ActAdd of one-word prompts was refused ("no tokens").
    Now the vector is μ(positive) − μ(negative) over every word, each prompt read after the start token, as a plain
    forward of [<bos>, words...] computes it."""
    tokenizer = load_tokenizer(tiny_no_bos)
    assert tokenizer("love").input_ids == [tokenizer.convert_tokens_to_ids("love")], "the tokenizer adds a BOS"
    entry = f"{{name: a, layer: {LAYER}, method: actadd, positive_prompt: {positive}, negative_prompt: {negative}}}"
    measured = measure_vectors(_recipe(tiny_no_bos, entry, tmp_path))
    bos = tokenizer.bos_token_id
    pos, neg = ([bos, *tokenizer(t).input_ids] for t in (positive, negative))
    expected = _mean_after_first(tiny_no_bos, pos) - _mean_after_first(tiny_no_bos, neg)
    torch.testing.assert_close(measured.units[0].double(), expected, rtol=1e-5, atol=1e-6)
    counts = measured.entries[0]["counts"]
    assert [counts[r]["tokens"] for r in ("positive", "negative")] == [len(positive.split()), len(negative.split())]


def test_actadd_with_bos_adds_no_second_start_token(tiny_models, tmp_path):
    """A tokenizer that already starts with BOS is left alone: the vector is over the tokenizer's own ids."""
    model = tiny_models["llama"]
    tokenizer = load_tokenizer(model)
    entry = f"{{name: a, layer: {LAYER}, method: actadd, positive_prompt: love the sun, negative_prompt: hate}}"
    measured = measure_vectors(_recipe(model, entry, tmp_path))
    pos, neg = (tokenizer(t).input_ids for t in ("love the sun", "hate"))
    assert pos[0] == neg[0] == tokenizer.bos_token_id
    expected = _mean_after_first(model, pos) - _mean_after_first(model, neg)
    torch.testing.assert_close(measured.units[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_partly_empty_target_is_noted_and_left_out_of_the_mean(tiny_no_bos, tmp_path, capsys):
    """A text with no position to average ("happy" alone, at the sink) is left out, with a note naming it; the
    mean is the other texts' own."""
    texts = ["happy dog is here", "happy", "a good day"]
    entry = f"{{name: m, layer: {LAYER}, method: mean, target: {json.dumps(texts)}}}"
    measured = measure_vectors(_recipe(tiny_no_bos, entry, tmp_path))
    tokenizer = load_tokenizer(tiny_no_bos)
    model = load_model(tiny_no_bos, dtype=torch.float32)
    with torch.no_grad():
        hidden = [
            model(input_ids=torch.tensor([tokenizer(t).input_ids]), output_hidden_states=True)
            .hidden_states[LAYER + 1][0][1:]
            .double()
            for t in (texts[0], texts[2])
        ]
    torch.testing.assert_close(measured.units[0].double(), torch.cat(hidden).mean(0), rtol=1e-5, atol=1e-6)
    err = capsys.readouterr().err
    assert "steering.0 (m).target: 1 of 3 texts have no tokens to average" in err and "'happy'" in err, err


def test_empty_target_is_refused_before_the_background_is_sampled(tiny_no_bos, tmp_path, monkeypatch):
    """Sampling a background takes minutes on a real model: a target with nothing to average stops first."""

    def sampled(*args, **kwargs):
        raise AssertionError("the background was sampled before the empty target was refused")

    monkeypatch.setattr(measure, "sample_background", sampled)
    entry = f"{{name: m, layer: {LAYER}, target: [happy, good]}}"
    recipe = _recipe(tiny_no_bos, entry, tmp_path, background="{sample: {sequences: 4, tokens: 8}}")
    with pytest.raises(measure.BakeError) as info:
        measure_vectors(recipe)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("steering.0 (m).target: no tokens to average"), msg
    assert "two or more tokens" in msg, msg


@pytest.mark.parametrize("command", ["vector", "run"])
def test_actadd_prompt_of_unknown_words_is_one_line_naming_the_field(tiny_models, tmp_path, command):
    """Through the CLI: one line naming steering.0.negative_prompt and why, exit 1, nothing written."""
    model = tiny_models["llama"]
    before = tree_digest(model)
    recipe = tmp_path / "r.yaml"
    entry = f"{{name: a, layer: {LAYER}, method: actadd, positive_prompt: love, negative_prompt: xyzzy plugh}}"
    recipe.write_text(f"model: {model}\nsteering:\n  - {entry}\n")
    out = tmp_path / "outs" / ("v.safetensors" if command == "vector" else "baked")
    err = assert_one_line_error(CliRunner().invoke(main, [command, str(recipe), "-o", str(out)]))
    assert "steering.0 (a).negative_prompt: no tokens to average" in err and "<unk>" in err, err
    assert_nothing_written(out)
    assert tree_digest(model) == before
