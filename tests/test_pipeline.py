"""compute_vectors: each method wired to the right text sets, shared layers adding, background caching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bake
from bake.collection.activations import collect
from bake.collection.texts import tokenize
from bake.families.hf import family_for
from bake.recipe import parse_recipe
from bake.sources.load import load_model, load_tokenizer
from bake.sources.resolve import cache_dir

TARGET = ["the happy dog is here today", "a wonderful bright day", "i love the sun and the tea"]
CORPUS = ["the cat was in the castle", "a ship and a star", "it is a day of rain", "the team and the ball"]


def _recipe(
    model: Path,
    tmp_path: Path,
    steering: str,
    background: str = "background: {corpus: {texts: " + json.dumps(CORPUS) + "}}",
):
    text = f"model: {model}\n{background}\nsteering:\n{steering}"
    return parse_recipe(text, tmp_path)


def _mean(model_dir: Path, texts: list[str], layer: int) -> torch.Tensor:
    """Independent of the pipeline: tokenize and collect directly."""
    model = load_model(model_dir, dtype=torch.float32)
    tok = load_tokenizer(model_dir)
    return collect(model, family_for(model.config), tokenize(tok, texts, 256), [(layer, "resid_post")])[
        (layer, "resid_post")
    ].mean


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_mean_centred_is_target_mean_minus_background_mean(tiny_models, tmp_path, model_type):
    src = tiny_models[model_type]
    recipe = _recipe(
        src, tmp_path, f"  - {{name: joy, layer: 2, coefficient: 3.0, target: {{texts: {json.dumps(TARGET)}}}}}"
    )
    vs = bake.compute_vectors(recipe)
    expected = 3.0 * (_mean(src, TARGET, 2) - _mean(src, CORPUS, 2))
    torch.testing.assert_close(vs.vectors[(2, "resid_post")], expected.float(), rtol=1e-6, atol=1e-6)
    (entry,) = vs.meta["entries"]
    # One token per word; the <bos> each text starts with is not counted.
    words = lambda texts: sum(len(t.split()) for t in texts)  # noqa: E731
    assert entry["counts"] == {
        "target": {"texts": 3, "tokens": words(TARGET)},
        "background": {"texts": 4, "tokens": words(CORPUS)},
    }
    assert entry["norm"] == pytest.approx(float(expected.norm()), rel=1e-6)
    assert entry["relative_norm"] == pytest.approx(entry["norm"] / entry["mean_residual_norm"])


def test_entries_sharing_a_layer_add_up(tiny_models, tmp_path):
    src = tiny_models["llama"]
    a = '  - {name: a, layer: 1, method: mean, coefficient: 0.5, target: {texts: ["the happy dog"]}}\n'
    b = (
        '  - {name: b, layer: 1, method: contrast, positive: {texts: ["i love tea"]}, negative: {texts: ["i hate '
        'rain"]}}\n'
    )
    c = '  - {name: c, layer: 3, method: actadd, positive_prompt: "love love", negative_prompt: "hate hate"}\n'
    both = bake.compute_vectors(_recipe(src, tmp_path, a + b + c)).vectors
    only_a = bake.compute_vectors(_recipe(src, tmp_path, a)).vectors[(1, "resid_post")]
    only_b = bake.compute_vectors(_recipe(src, tmp_path, b)).vectors[(1, "resid_post")]
    torch.testing.assert_close(both[(1, "resid_post")], only_a + only_b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(only_a, 0.5 * _mean(src, ["the happy dog"], 1).float(), rtol=1e-6, atol=1e-6)
    expected_c = _mean(src, ["love love"], 3) - _mean(src, ["hate hate"], 3)
    torch.testing.assert_close(both[(3, "resid_post")], expected_c.float(), rtol=1e-6, atol=1e-6)


def test_model_sampled_background_is_seeded_and_cached(tiny_models, tmp_path, capsys):
    src = tiny_models["gpt2"]
    steering = f"  - {{name: joy, layer: 1, target: {{texts: {json.dumps(TARGET)}}}}}"
    sample = "background: {sample: {sequences: 6, tokens: 10}}"
    first = bake.compute_vectors(_recipe(src, tmp_path, steering, sample))
    err = capsys.readouterr().err
    assert err.count("sampled background: 6 sequences") == 1 and err.count("sampling background: 100%") <= 1, err
    files = list((cache_dir() / "background").glob("*.json"))
    cached = [f for f in files if json.loads(f.read_text())["settings"]["sequences"] == 6]
    assert len(cached) == 1
    sequences = json.loads(cached[0].read_text())["sequences"]
    assert len(sequences) == 6 and all(s[0] == load_tokenizer(src).bos_token_id for s in sequences)
    assert all(2 <= len(s) <= 10 for s in sequences)
    cached[0].write_text(json.dumps({"settings": {}, "sequences": [s[:2] for s in sequences]}))
    second = bake.compute_vectors(_recipe(src, tmp_path, steering, sample))
    assert not torch.equal(first.vectors[(1, "resid_post")], second.vectors[(1, "resid_post")]), "cache was not read"
    cached[0].unlink()
    third = bake.compute_vectors(_recipe(src, tmp_path, steering, sample))
    assert torch.equal(first.vectors[(1, "resid_post")], third.vectors[(1, "resid_post")]), (
        "sampling is not deterministic"
    )
    other_seed = bake.compute_vectors(_recipe(src, tmp_path, steering, sample + "\nseed: 7"))
    assert not torch.equal(first.vectors[(1, "resid_post")], other_seed.vectors[(1, "resid_post")])
    assert first.meta["entries"][0]["data"]["background"]["kind"] == "model-sample"


def test_truncated_collection_equals_full_model_collection(tiny_models):
    """Building only blocks 0..L gives the same activations as the whole model, with fewer weights."""
    src = tiny_models["llama"]
    tok = load_tokenizer(src)
    full = load_model(src, dtype=torch.float32)
    short = load_model(src, dtype=torch.float32, layers=2)
    assert len(short.model.layers) == 2 and len(full.model.layers) == 4
    assert sum(p.numel() for p in short.parameters()) < sum(p.numel() for p in full.parameters())
    examples = tokenize(tok, TARGET + CORPUS, 64)
    points = [(1, "resid_post"), (1, "resid_mid"), (0, "resid_post")]
    a = collect(full, family_for(full.config), examples, points)
    b = collect(short, family_for(short.config), examples, points)
    for p in points:
        assert a[p].count == b[p].count
        assert torch.equal(a[p].total, b[p].total)


def test_truncated_load_holds_back_only_the_expected_load_report(tiny_models, tmp_path):
    """The later blocks' weights are left out on purpose, so transformers' page-long load report is not shown;
    a weight missing from the blocks kept still shows it."""
    import logging
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers.utils import logging as hf_logging

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # the library's default (the CLI, run earlier in this session, silences it)
    try:
        load_model(tiny_models["llama"], dtype=torch.float32, layers=2)
        assert not any("LOAD REPORT" in m for m in seen)
        broken = tmp_path / "broken"
        shutil.copytree(tiny_models["llama"], broken)
        tensors = load_file(broken / "model.safetensors")
        del tensors["model.layers.0.mlp.down_proj.weight"]
        save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
        load_model(broken, dtype=torch.float32, layers=2)
        assert any("LOAD REPORT" in m and "down_proj" in m for m in seen)
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)


def test_two_process_gloo_collection_equals_single_process(tiny_models, tmp_path):
    """torchrun with 2 CPU ranks (gloo) splits the batches and all-reduces the sums: same vector."""
    import os
    import subprocess
    import sys

    from bake.vectorfile import VectorSet

    texts = [
        f"{a} {b} {c}"
        for a in ("the", "a", "my")
        for b in ("happy", "sad", "bright", "dark")
        for c in ("dog", "day", "king")
    ]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {tiny_models['llama']}\nbatch_tokens: 16\nbackground: {{corpus: {{texts: "
        f"{json.dumps(CORPUS * 3)}}}}}\nsteering:\n  - {{name: a, layer: 2, target: {{texts: {json.dumps(texts)}}}}}\n"
        f"  - {{name: b, layer: 1, site: resid_mid, method: mean, target: {{texts: {json.dumps(TARGET)}}}}}\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "bake",
            "vector",
            str(recipe),
            "-o",
            str(tmp_path / "dist.safetensors"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    single = bake.compute_vectors(bake.load_recipe(recipe))
    dist = VectorSet.load(tmp_path / "dist.safetensors")
    assert dist.vectors.keys() == single.vectors.keys()
    for point, v in single.vectors.items():
        torch.testing.assert_close(dist.vectors[point], v, rtol=1e-6, atol=1e-7)
    assert [e["counts"] for e in dist.meta["entries"]] == [e["counts"] for e in single.meta["entries"]]
