"""Background sampling engines: llama.cpp's samples are seeded and reproducible, the manifest names the engine that
made them, and a rebuild samples with that engine or is refused in one line."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tree_digest

from bake import manifest as manifests
from bake.cli import main
from bake.collection import sampling
from bake.collection.texts import sample_engine
from bake.errors import BakeError

needs_llama_cpp = pytest.mark.skipif(not sampling.available(), reason="llama-cpp-python is not installed")


def _recipe(tmp_path, model: str, background: str = "{sample: {sequences: 6, tokens: 10}}"):
    (tmp_path / "target.txt").write_text("the happy dog is here\na wonderful day of sun\ni love tea today\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {model}\nbackground: {background}\nverify: {{tokens: 4}}\npreview: {{prompts: [Hi], tokens: 4}}\n"
        "steering:\n  - {name: happy, layer: 1, coefficient: 1.5, target: target.txt}\n"
    )
    return recipe


def _engines(folder) -> list[dict]:
    manifest = json.loads((folder / "bake.json").read_text())
    return [e["data"]["background"]["engine"] for e in manifest["vectors"]["entries"]]


@needs_llama_cpp
def test_llama_cpp_samples_are_seeded_and_thread_independent(smollm2_gguf, monkeypatch):
    """The thread count is chosen by timing the first steps (1 then all cores here), switching mid-sequence: the
    samples are those of one thread throughout, and of 1 then 3 threads."""
    with monkeypatch.context() as one_core:
        one_core.setattr(sampling.os, "sched_getaffinity", lambda pid: {0})
        first = sampling.sample(smollm2_gguf, 1, {2}, 3, 8, 1.0, 0)
    assert sampling.sample(smollm2_gguf, 1, {2}, 3, 8, 1.0, 0) == first
    monkeypatch.setattr(sampling.os, "sched_getaffinity", lambda pid: {0, 1, 2})  # trials of 1 and 3 threads
    assert sampling.sample(smollm2_gguf, 1, {2}, 3, 8, 1.0, 0) == first
    other = sampling.sample(smollm2_gguf, 1, {2}, 3, 8, 1.0, 1)
    assert other != first and all(s[0] == 1 and 1 < len(s) <= 8 for s in first + other)
    assert len({tuple(s) for s in first}) == 3  # each sequence draws from its own generator


@needs_llama_cpp
def test_llama_cpp_sampler_is_plain_temperature_sampling(smollm2_gguf, monkeypatch):
    """The draw is softmax(logits / T) inverted at each sequence's own uniform, checked on fixed logits."""
    import llama_cpp

    logits = np.array([[0.0, 1.0, 2.0, -1.0]], dtype=np.float32)
    monkeypatch.setattr(
        llama_cpp,
        "llama_get_logits",
        lambda ctx: logits.ctypes.data_as(llama_cpp.ctypes.POINTER(llama_cpp.ctypes.c_float)),
    )
    monkeypatch.setattr(llama_cpp, "llama_vocab_n_tokens", lambda vocab: 4)
    got = sampling.sample(smollm2_gguf, 3, set(), 1, 4, 0.5, 7)
    rng = np.random.default_rng([7, 0])
    p = np.exp(logits[0].astype(np.float64) / 0.5)
    cdf = np.cumsum(p / p.sum())
    assert got == [[3] + [int(np.searchsorted(cdf, rng.random(), side="right")) for _ in range(3)]]


def test_transformers_engine_is_recorded_and_a_recorded_llama_cpp_engine_is_needed(tmp_path, tiny_models, one_thread):
    recipe = _recipe(tmp_path, tiny_models["llama"])
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "first")])
    assert result.exit_code == 0, result.output
    assert _engines(tmp_path / "first") == [
        {"name": "transformers", "version": manifests.package_versions("transformers")["transformers"]}
    ]
    manifest_path = tmp_path / "first" / "bake.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["vectors"]["entries"][0]["data"]["background"]["engine"]["name"] = "llama.cpp"
    manifest_path.write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["run", "--from-manifest", str(tmp_path / "first"), "-o", str(tmp_path / "b")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: the background was sampled with llama.cpp, but the base is not a GGUF file here: "
        f"{sampling.INSTALL} to reproduce the same samples"
    ]
    assert not (tmp_path / "b").exists()


def test_engine_choice(monkeypatch, tmp_path):
    """transformers unless the recipe asks: the default keeps every sampled background (and figure) as it was."""
    gguf = tmp_path / "m.gguf"
    monkeypatch.setattr(sampling, "available", lambda: True)
    assert sample_engine(gguf) == "transformers" and sample_engine(gguf, requested="llama.cpp") == "llama.cpp"
    assert (
        sample_engine(gguf, requested="auto") == "llama.cpp" and sample_engine(None, requested="auto") == "transformers"
    )
    assert sample_engine(gguf, "transformers", "llama.cpp") == "transformers"  # a rebuild keeps the recorded engine
    monkeypatch.setattr(sampling, "available", lambda: False)
    assert sample_engine(gguf, requested="auto") == "transformers"
    with pytest.raises(BakeError, match="sampled with llama.cpp, but llama-cpp-python is not installed"):
        sample_engine(gguf, "llama.cpp")
    with pytest.raises(BakeError, match="^background.sample.engine: llama.cpp, but llama-cpp-python is not installed"):
        sample_engine(gguf, requested="llama.cpp")


def test_manifest_engine_record_is_checked():
    entry = {"data": {"background": {"kind": "model-sample", "engine": {"name": "vllm", "version": "1"}}}}
    with pytest.raises(BakeError, match="engine"):
        manifests.sample_engine([entry], "bake.json")
    del entry["data"]["background"]["engine"]  # a bake from before the choice: transformers sampled it
    assert manifests.sample_engine([entry], "bake.json") == "transformers"
    assert manifests.sample_engine([], "bake.json") is None


@pytest.mark.slow
@needs_llama_cpp
def test_rebuild_resamples_with_llama_cpp(tmp_path, smollm2_gguf, one_thread):
    """The real GGUF end to end: llama.cpp samples, the manifest says so, the rebuild resamples bit for bit."""
    recipe = _recipe(tmp_path, str(smollm2_gguf), "{sample: {sequences: 4, tokens: 8, engine: llama.cpp}}")
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "first")])
    assert result.exit_code == 0, result.output
    assert [e["name"] for e in _engines(tmp_path / "first")] == ["llama.cpp"]
    shutil.rmtree(os.environ["BAKE_CACHE"] + "/background")  # sampled again, from the seed
    result = CliRunner().invoke(main, ["run", "--from-manifest", str(tmp_path / "first"), "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    a, b = tree_digest(tmp_path / "first"), tree_digest(tmp_path / "b")
    assert a.pop("bake.json") and b.pop("bake.json") and a == b


def test_gguf_licence_is_kept_beside_the_dequantized_folder(tmp_path):
    """A warm run reads the licence from the cache, not by parsing the GGUF's metadata again."""
    import gguf

    from bake.sources.resolve import _gguf_license

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.license", "mit")
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    target = tmp_path / "cache" / "gguf" / "abc"
    assert _gguf_license(path, target) == "mit"
    path.unlink()  # nothing left to parse: the second answer comes from the kept record
    assert _gguf_license(path, target) == "mit"
    assert json.loads((target.parent / "abc.license.json").read_text()) == {"license": "mit"}
