"""unbake gives back the exact source: every file bit-identical, for native-bias, Llama-family,
sharded, relabelled and constant-bias-module checkpoints, one layer of stacked bakes at a time."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny, tiny_config, tree_digest
from safetensors.torch import load_file, save_file

import bake
from bake.cli import main
from bake.errors import BakeError
from bake.vectorfile import VectorSet


def _vectors(seed: int, points=((1, "resid_post"), (2, "resid_mid"))) -> VectorSet:
    g = torch.Generator().manual_seed(seed)
    return VectorSet({p: torch.randn(32, generator=g) for p in points})


def _unbake_cli(path, out, *extra):
    result = CliRunner().invoke(main, ["unbake", str(path), "-o", str(out), *extra])
    return result


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_unbake_is_bit_exact(tmp_path, tiny_models, model_type):
    src = tiny_models[model_type]
    before = tree_digest(src)
    bake.fold(str(src), _vectors(3), tmp_path / "baked")
    result = _unbake_cli(tmp_path / "baked", tmp_path / "base")
    assert result.exit_code == 0, result.output
    assert tree_digest(tmp_path / "base") == before
    assert tree_digest(src) == before


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_unbake_of_a_sharded_checkpoint_restores_every_shard(tmp_path, model_type):
    src = save_tiny(tmp_path / "src", tiny_config(model_type), max_shard_size="20KB")
    bake.fold(str(src), _vectors(4), tmp_path / "baked")
    bake.unbake(tmp_path / "baked", tmp_path / "base")
    assert tree_digest(tmp_path / "base") == tree_digest(src)


def test_patched_shard_differs_from_the_source_only_in_the_folded_bias(tmp_path, tiny_models):
    """A native-bias fold overwrites bytes in place: header and every other byte stay the source's."""
    src = tiny_models["gpt2"]
    bake.fold(str(src), _vectors(5, [(1, "resid_post")]), tmp_path / "baked")
    a, b = (src / "model.safetensors").read_bytes(), (tmp_path / "baked" / "model.safetensors").read_bytes()
    assert len(a) == len(b)
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    from bake.checkpoint import read_header

    info = read_header(src / "model.safetensors")[0]["transformer.h.1.mlp.c_proj.bias"]
    assert diff and info.start <= diff[0] and diff[-1] < info.end


def test_unbake_undoes_a_relabel_and_a_split(tmp_path, one_thread):
    """Phi-3 is written as Llama with qkv_proj and gate_up_proj split: unbake joins them again."""
    src = save_tiny(tmp_path / "src", tiny_config("phi3"))
    bake.fold(str(src), _vectors(6), tmp_path / "baked")
    assert json.loads((tmp_path / "baked" / "config.json").read_text())["model_type"] == "llama"
    bake.unbake(tmp_path / "baked", tmp_path / "base")
    assert tree_digest(tmp_path / "base") == tree_digest(src)


def test_unbake_removes_a_constant_bias_module(tmp_path, one_thread):
    src = save_tiny(tmp_path / "src", tiny_config("gemma2"))
    bake.fold(str(src), _vectors(7, [(1, "resid_post")]), tmp_path / "baked", allow_remote_code=True)
    assert (tmp_path / "baked" / "modeling_bake.py").is_file()
    bake.unbake(tmp_path / "baked", tmp_path / "base")
    assert tree_digest(tmp_path / "base") == tree_digest(src)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_stacked_bakes_keep_history_and_unbake_one_layer_at_a_time(tmp_path, tiny_models, model_type):
    src = tiny_models[model_type]
    first, second = _vectors(8), _vectors(9, [(1, "resid_post"), (3, "resid_post")])
    bake.fold(str(src), first, tmp_path / "one")
    result = bake.fold(str(tmp_path / "one"), second, tmp_path / "two")
    history = result.manifest.history
    assert len(history) == 1 and history[0].base.spec == str(src)
    assert "history" not in history[0].as_dict()
    # The second layer adds to the first: the bias at layer 1 carries both vectors.
    tensors = {}
    for shard in (tmp_path / "two").glob("*.safetensors"):
        tensors.update(load_file(shard))
    base_tensors = {}
    for shard in src.glob("*.safetensors"):
        base_tensors.update(load_file(shard))
    name = "transformer.h.1.mlp.c_proj.bias" if model_type == "gpt2" else "model.layers.1.mlp.down_proj.bias"
    original = base_tensors.get(name, torch.zeros(32))
    expected = (original + first.vectors[(1, "resid_post")]) + second.vectors[(1, "resid_post")]
    assert torch.equal(tensors[name], expected)
    inspect = CliRunner().invoke(main, ["inspect", str(tmp_path / "two")])
    assert inspect.exit_code == 0, inspect.output

    restored = bake.unbake(tmp_path / "two", tmp_path / "back-to-one")
    assert restored is not None and restored.history == []
    assert tree_digest(tmp_path / "back-to-one") == tree_digest(tmp_path / "one")
    assert bake.unbake(tmp_path / "back-to-one", tmp_path / "back-to-base") is None
    assert tree_digest(tmp_path / "back-to-base") == tree_digest(src)


def test_a_bake_on_top_at_a_new_site_keeps_the_tensors_the_first_one_added(tmp_path, tiny_models):
    """The first bake put Llama's new MLP biases in its extra shard; the second adds attention biases, which go to
    a shard of their own: writing them over the first's lost those (verification failed, nothing was written)."""
    src = tiny_models["llama"]
    first, second = _vectors(8, [(1, "resid_post")]), _vectors(9, [(2, "resid_mid")])
    bake.fold(str(src), first, tmp_path / "one")
    before = tree_digest(tmp_path / "one")
    result = bake.fold(str(tmp_path / "one"), second, tmp_path / "two")
    assert result.verification["passed"], result.verification
    index = json.loads((tmp_path / "two" / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in set(index.values()):
        tensors.update(load_file(tmp_path / "two" / shard))
    assert set(tensors) == set(index)
    assert torch.equal(tensors["model.layers.1.mlp.down_proj.bias"], first.vectors[(1, "resid_post")])
    assert torch.equal(tensors["model.layers.2.self_attn.o_proj.bias"], second.vectors[(2, "resid_mid")])
    assert index["model.layers.1.mlp.down_proj.bias"] != index["model.layers.2.self_attn.o_proj.bias"]
    assert tree_digest(tmp_path / "one") == before
    assert bake.unbake(tmp_path / "two", tmp_path / "back-to-one") is not None
    assert tree_digest(tmp_path / "back-to-one") == before


def test_unbake_refuses_a_tampered_checkpoint_and_writes_nothing(tmp_path, tiny_models):
    bake.fold(str(tiny_models["gpt2"]), _vectors(10), tmp_path / "baked")
    shard = tmp_path / "baked" / "model.safetensors"
    tensors = load_file(shard)
    tensors["transformer.h.1.mlp.c_proj.bias"] += 1.0
    save_file(tensors, shard, metadata={"format": "pt"})
    result = _unbake_cli(tmp_path / "baked", tmp_path / "base")
    assert result.exit_code == 1
    assert "changed after baking" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "base").exists()


def test_unbake_refuses_a_cast_checkpoint(tmp_path, tiny_models):
    bake.fold(str(tiny_models["llama"]), _vectors(11), tmp_path / "baked", dtype="bfloat16")
    with pytest.raises(BakeError, match="cast to another dtype"):
        bake.unbake(tmp_path / "baked", tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_unbake_of_a_model_that_was_never_baked_is_a_one_line_error(tmp_path, tiny_models):
    result = _unbake_cli(tiny_models["llama"], tmp_path / "base")
    assert result.exit_code == 1 and "has no bake.json" in result.output
    assert not (tmp_path / "base").exists()
