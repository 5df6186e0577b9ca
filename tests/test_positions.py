"""``positions``: which tokens of a text a vector is averaged over (all, last, reply), against independent
computations on a tiny model, recorded in the manifest and the card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer

import bake
from bake import manifest as manifests
from bake.collection.measure import measure_vectors
from bake.collection.texts import tokenize
from bake.errors import BakeError
from bake.recipe import parse_recipe
from bake.release import card
from bake.sources.load import load_model, load_tokenizer

TEXTS = ["the happy dog is here", "a sad cat", "tell me about your day today", "yes"]
BACKGROUND = ["the sun and the rain", "a story about a ship"]
LAYER = 1


def _recipe(model: Path, entries: str, tmp_path: Path):
    text = f"model: {model}\nbackground: {{corpus: {json.dumps(BACKGROUND)}}}\nsteering:\n{entries}"
    return parse_recipe(text, tmp_path)


def _hidden(model_path: Path, texts: list[str]) -> list[torch.Tensor]:
    """Each text's residual after block LAYER, [positions, hidden], from a plain unbatched forward."""
    model = load_model(model_path, dtype=torch.float32)
    tokenizer = load_tokenizer(model_path)
    with torch.no_grad():
        return [
            model(input_ids=torch.tensor([tokenizer(t).input_ids]), output_hidden_states=True)
            .hidden_states[LAYER + 1][0]
            .double()
            for t in texts
        ]


def test_last_all_and_default_against_independent_means(tiny_models, tmp_path):
    """``last``: the mean over texts of the hidden state at each text's last token; ``all`` and the default: the
    mean over every position but the first (the attention sink); same texts at different positions stay apart."""
    model = tiny_models["llama"]
    entries = "".join(
        f"  - {{name: {name}, layer: {LAYER}, method: mean, target: {json.dumps(TEXTS)}{extra}}}\n"
        for name, extra in (("last", ", positions: last"), ("all", ", positions: all"), ("default", ""))
    )
    centred = f"background: {{corpus: {json.dumps(BACKGROUND)}, positions: last}}"
    entries += f"  - {{name: fv, layer: {LAYER}, positions: last, target: {json.dumps(TEXTS)}, {centred}}}\n"
    measured = measure_vectors(_recipe(model, entries, tmp_path))
    hidden = _hidden(model, TEXTS)
    expected_last = torch.stack([h[-1] for h in hidden]).mean(0)
    expected_all = torch.cat([h[1:] for h in hidden]).mean(0)
    last, every, default, fv = measured.units
    background_last = torch.stack([h[-1] for h in _hidden(model, BACKGROUND)]).mean(0)
    torch.testing.assert_close(fv, expected_last - background_last, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last, expected_last, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(every, expected_all, rtol=1e-5, atol=1e-6)
    assert torch.equal(default, every)
    assert [e["positions"] for e in measured.entries] == ["last", "all", "all", "last"]
    every_token = sum(len(h) - 1 for h in hidden)
    counts = [e["counts"]["target"]["tokens"] for e in measured.entries]
    assert counts == [len(TEXTS), every_token, every_token, len(TEXTS)]
    assert measured.entries[3]["counts"]["background"]["tokens"] == len(BACKGROUND)


def test_chat_positions_count_the_reply_the_whole_render_or_the_replys_last_token():
    tokenizer = make_tokenizer()
    text = "the dog is happy"
    (reply,) = tokenize(tokenizer, [text], 64, chat=True, chat_prompt="tell me")
    (last,) = tokenize(tokenizer, [text], 64, chat=True, chat_prompt="tell me", positions="last")
    (every,) = tokenize(tokenizer, [text], 64, chat=True, chat_prompt="tell me", positions="all")
    words = [tokenizer.convert_ids_to_tokens(t) for t in reply.input_ids]
    assert [w for w, c in zip(words, reply.counted) if c] == text.split()
    assert [w for w, c in zip(words, last.counted) if c] == ["happy"]
    special = set(tokenizer.all_special_ids)
    assert every.counted == [i > 0 and t not in special for i, t in enumerate(every.input_ids)]
    assert every.n_counted > reply.n_counted


@pytest.mark.parametrize(
    "extra,field,needle",
    [
        (", positions: first", "steering.0.positions", "'last'"),
        (", positions: reply", "steering.0", "chat: true"),
    ],
)
def test_bad_positions_are_one_line_naming_the_field(tmp_path, extra, field, needle):
    with pytest.raises(BakeError) as info:
        parse_recipe(f"model: m\nsteering:\n  - {{name: a, layer: 1, target: [x]{extra}}}\n", tmp_path, "r.yaml")
    msg = str(info.value)
    assert "\n" not in msg and f"{field}: " in msg and needle in msg, msg


def test_manifest_and_card_record_positions_and_old_manifests_still_read(tiny_models, tmp_path):
    recipe = _recipe(
        tiny_models["llama"],
        f"  - {{name: fv, layer: {LAYER}, method: mean-centred, positions: last, target: {json.dumps(TEXTS)}}}\n",
        tmp_path,
    )
    out = tmp_path / "out"
    bake.run(recipe, out)
    manifest = manifests.read(out).as_dict()
    (entry,) = manifest["vectors"]["entries"]
    assert entry["positions"] == "last" and entry["data"]["target"]["positions"] == "last"
    assert entry["counts"]["target"]["tokens"] == len(TEXTS)
    assert "| fv | 1 | resid_post | mean-centred | last token |" in (out / "README.md").read_text()

    del entry["positions"]  # as bake wrote it before the option existed
    (out / "bake.json").write_text(json.dumps(manifest))
    old = manifests.read(out)
    assert "positions" not in old.entries[0]
    assert "| fv | 1 | resid_post | mean-centred | every token |" in card.render(old)
