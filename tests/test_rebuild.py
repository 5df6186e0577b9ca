"""bake run --from-manifest: the manifest holds all it takes to rebuild the checkpoint bit for bit."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from conftest import tree_digest

from bake.cli import main

TEXTS = ["the happy dog is here", "a wonderful day of sun", "i love tea and coffee today", "what a great game"]


def _bake(tmp_path, model, background: str):
    data = tmp_path / "recipe" / "data"
    data.mkdir(parents=True)
    (data / "target.txt").write_text("\n".join(TEXTS) + "\n")
    (data / "neutral.txt").write_text("the weather is here\nthe ship and the star\ntell me about the king\n")
    recipe = tmp_path / "recipe" / "r.yaml"
    recipe.write_text(
        f"model: {model}\nbackground: {background}\nverify: {{tokens: 4}}\n"
        "steering:\n  - {name: happy, layer: 2, coefficient: 1.5, target: data/target.txt}\n"
        "  - {name: mid, layer: 1, site: resid_mid, target: data/target.txt}\n"
    )
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "first")])
    assert result.exit_code == 0, result.output
    return tmp_path / "first", data


@pytest.mark.parametrize("background", ["{sample: {sequences: 6, tokens: 10}}", "{corpus: data/neutral.txt}"])
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_rebuild_from_manifest_is_bit_identical(tmp_path, tiny_models, one_thread, monkeypatch, model_type, background):
    first, _ = _bake(tmp_path, tiny_models[model_type], background)
    # An empty cache of its own, so the background is sampled again, from the seed (the session's cache, which
    # holds the dequantized real models, stays).
    monkeypatch.setenv("BAKE_CACHE", str(tmp_path / "empty-cache"))
    result = CliRunner().invoke(
        main, ["run", "--from-manifest", str(first / "bake.json"), "-o", str(tmp_path / "again")]
    )
    assert result.exit_code == 0, result.output
    assert "bit-identical to the original" in result.output
    a, b = tree_digest(first), tree_digest(tmp_path / "again")
    assert a.pop("bake.json") != "" and b.pop("bake.json") != ""
    assert a == b


def test_rebuild_refuses_changed_data(tmp_path, tiny_models, one_thread):
    first, data = _bake(tmp_path, tiny_models["llama"], "{corpus: data/neutral.txt}")
    (data / "target.txt").write_text("\n".join(TEXTS[:-1]) + "\n")
    result = CliRunner().invoke(main, ["run", "--from-manifest", str(first), "-o", str(tmp_path / "again")])
    assert result.exit_code == 1
    assert "'happy': its target texts changed since the bake" in result.output
    assert not (tmp_path / "again").exists()


def test_rebuild_of_a_vector_file_bake_points_to_bake_fold(tmp_path, tiny_models):
    import torch

    import bake
    from bake.vectorfile import VectorSet

    bake.fold(
        str(tiny_models["gpt2"]),
        VectorSet({(1, "resid_post"): torch.randn(32, generator=torch.Generator().manual_seed(0))}),
        tmp_path / "folded",
    )
    result = CliRunner().invoke(
        main, ["run", "--from-manifest", str(tmp_path / "folded"), "-o", str(tmp_path / "again")]
    )
    assert result.exit_code == 1 and "rebuild it with" in result.output and "bake fold" in result.output


def test_run_needs_exactly_one_of_recipe_and_manifest(tmp_path):
    result = CliRunner().invoke(main, ["run", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--from-manifest" in result.output
