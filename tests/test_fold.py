"""Folding: what is written (tensors, shards, config, layout) and what is refused.

Equivalence with the hook-steered base, family by family, is in test_architectures.py."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from conftest import save_tiny, tiny_config
from safetensors import safe_open

import bake
from bake.checkpoint import EXTRA_SHARD, INDEX, RENAMED_SINGLE
from bake.errors import BakeError
from bake.families import hf as architectures
from bake.recipe import VerifySpec
from bake.vectorfile import VectorSet

PROBES = ["the happy dog is here", "tell me about your day", "a king and a dragon"]


def _vectors(hidden: int, points: list[tuple[int, str]], scale: float = 1.0) -> VectorSet:
    g = torch.Generator().manual_seed(1)
    return VectorSet({p: scale * torch.randn(hidden, generator=g) for p in points})


def test_llama_fold_writes_flags_zero_biases_and_keeps_the_original_shard(tmp_path, tiny_models):
    src = tiny_models["llama"]
    vectors = _vectors(32, [(2, "resid_post")])
    bake.fold(str(src), vectors, tmp_path / "out")
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["mlp_bias"] is True
    assert (out / RENAMED_SINGLE).read_bytes() == (src / "model.safetensors").read_bytes()
    index = json.loads((out / INDEX).read_text())
    with safe_open(out / EXTRA_SHARD, "pt") as f:
        names = set(f.keys())
        assert names == {
            f"model.layers.{i}.mlp.{p}.bias" for i in range(4) for p in ("gate_proj", "up_proj", "down_proj")
        }
        for name in names:
            assert index["weight_map"][name] == EXTRA_SHARD
            t = f.get_tensor(name)
            if name == "model.layers.2.mlp.down_proj.bias":
                assert torch.equal(t, vectors.vectors[(2, "resid_post")])
            else:
                assert not t.any(), f"{name} should be explicit zeros"
    sizes = sum(
        t.numel() * t.element_size()
        for shard in set(index["weight_map"].values())
        for t in [safe_open(out / shard, "pt").get_tensor(k) for k in safe_open(out / shard, "pt").keys()]
    )
    assert index["metadata"]["total_size"] == sizes
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()


def test_gpt2_adds_to_the_existing_bias_in_float32(tmp_path, tiny_models):
    src = tiny_models["gpt2"]
    vectors = _vectors(32, [(0, "resid_post")])
    bake.fold(str(src), vectors, tmp_path / "out")
    with safe_open(src / "model.safetensors", "pt") as f:
        before = f.get_tensor("transformer.h.0.mlp.c_proj.bias")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        after = f.get_tensor("transformer.h.0.mlp.c_proj.bias")
        untouched = f.get_tensor("transformer.h.1.mlp.c_proj.bias")
    assert torch.equal(after, before + vectors.vectors[(0, "resid_post")])
    with safe_open(src / "model.safetensors", "pt") as f:
        assert torch.equal(untouched, f.get_tensor("transformer.h.1.mlp.c_proj.bias"))
    assert not (tmp_path / "out" / INDEX).exists(), "GPT-2 needs no new tensors, so the single-file layout stays"


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_sharded_source_rewrites_only_what_changes(tmp_path, model_type):
    src = save_tiny(tmp_path / "src", tiny_config(model_type), max_shard_size="20KB")
    shards = sorted(p.name for p in src.glob("model-*.safetensors"))
    assert len(shards) > 3
    bake.fold(str(src), _vectors(32, [(1, "resid_post")]), tmp_path / "out")
    out = tmp_path / "out"
    index = json.loads((out / INDEX).read_text())
    manifest = json.loads((out / "bake.json").read_text())
    rewritten = set(manifest["fold"]["shards_rewritten"])
    for shard in shards:
        if shard not in rewritten:
            assert (out / shard).read_bytes() == (src / shard).read_bytes()
    if model_type == "llama":
        assert rewritten == {EXTRA_SHARD}
    else:
        holder = json.loads((src / INDEX).read_text())["weight_map"]["transformer.h.1.mlp.c_proj.bias"]
        assert rewritten == {holder}
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model*.safetensors")}


@pytest.mark.parametrize("kernel", ["used", "refused", "missing"])
def test_copies_are_byte_identical_with_or_without_copy_file_range(tmp_path, monkeypatch, kernel):
    """The fold copies side files with os.copy_file_range as cp does (shards stream through one hashing pass);
    where the kernel refuses it (EXDEV, ENOSYS) or the platform has none, the streamed copy gives the same bytes."""
    import os

    src = save_tiny(tmp_path / "src", tiny_config("llama"), max_shard_size="20KB")
    calls = []
    if kernel == "missing" or not hasattr(os, "copy_file_range"):
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    else:
        real = os.copy_file_range

        def spy(*args):
            calls.append(args)
            if kernel == "refused":
                raise OSError(18, "Invalid cross-device link")
            return real(*args)

        monkeypatch.setattr(os, "copy_file_range", spy)
    bake.fold(str(src), _vectors(32, [(1, "resid_post")]), tmp_path / "out")
    assert bool(calls) == (kernel != "missing" and sys.platform == "linux")
    for shard in sorted(src.glob("model-*.safetensors")):
        assert (tmp_path / "out" / shard.name).read_bytes() == shard.read_bytes()
    assert (tmp_path / "out" / "config.json").exists()


def test_dtype_cast_writes_every_float_tensor_in_the_new_dtype(tmp_path, tiny_models):
    result = bake.fold(str(tiny_models["llama"]), _vectors(32, [(1, "resid_post")]), tmp_path / "out", dtype="bfloat16")
    assert result.verification["dtype"] == "bfloat16" and result.verification["passed"]
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for shard in out.glob("model*.safetensors"):
        with safe_open(shard, "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_overflowing_fold_is_refused_and_nothing_is_written(tmp_path, tiny_models):
    with pytest.raises(BakeError, match="overflows"):
        bake.fold(
            str(tiny_models["gpt2"]), _vectors(32, [(0, "resid_post")], scale=1e6), tmp_path / "out", dtype="float16"
        )
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_dropped_steering_fails_verification_and_writes_nothing(tmp_path, tiny_models, monkeypatch):
    """If the config flag were not switched on, transformers would drop the bias on load:
    verification must catch it (never ship steering a stock loader silently drops)."""
    llama = next(f for f in architectures.FAMILIES if f.name == "Llama")
    slot = llama.sites["resid_post"]
    broken = dataclasses.replace(slot, flags={})
    monkeypatch.setitem(llama.sites, "resid_post", broken)
    with pytest.raises(BakeError, match="dropped on load"):
        bake.fold(str(tiny_models["llama"]), _vectors(32, [(1, "resid_post")]), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path, tiny_models):
    vectors = _vectors(32, [(1, "resid_post")])
    out = tmp_path / "out"
    bake.fold(str(tiny_models["gpt2"]), vectors, out)
    first = (out / "model.safetensors").read_bytes()
    with pytest.raises(BakeError, match="already exists"):
        bake.fold(str(tiny_models["gpt2"]), _vectors(32, [(2, "resid_post")]), out)
    assert (out / "model.safetensors").read_bytes() == first
    bake.fold(str(tiny_models["gpt2"]), _vectors(32, [(2, "resid_post")]), out, force=True)
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_link_option_hard_links_untouched_shards(tmp_path):
    from bake.formats.hf.fold import fold_checkpoint

    src = save_tiny(tmp_path / "src", tiny_config("llama"), max_shard_size="20KB")
    out = tmp_path / "out"
    out.mkdir()
    record = fold_checkpoint(src, _vectors(32, [(1, "resid_post")]), out, link=True)
    assert record.shards_rewritten == [EXTRA_SHARD]
    for shard in src.glob("model-*.safetensors"):
        assert (out / shard.name).stat().st_ino == shard.stat().st_ino
    assert (out / EXTRA_SHARD).stat().st_nlink == 1


def test_verification_with_steered_blocks_only_still_catches_a_dropped_bias(tmp_path, tiny_models, monkeypatch):
    """scope='steered' builds blocks 0..L only; it passes on a good fold and fails on a dropped bias."""
    vectors = _vectors(32, [(1, "resid_post")], scale=5.0)
    result = bake.fold(str(tiny_models["llama"]), vectors, tmp_path / "ok", verify=VerifySpec(scope="steered"))
    assert result.verification["passed"] and result.verification["scope"] == "blocks 0..1"
    llama = next(f for f in architectures.FAMILIES if f.name == "Llama")
    monkeypatch.setitem(llama.sites, "resid_post", dataclasses.replace(llama.sites["resid_post"], flags={}))
    with pytest.raises(BakeError, match="dropped on load"):
        bake.fold(str(tiny_models["llama"]), vectors, tmp_path / "bad", verify=VerifySpec(scope="steered"))
    assert not (tmp_path / "bad").exists()


def _tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for shard in folder.glob("*.safetensors"):
        out.update(load_file(shard))
    return out


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_streaming_fold_equals_an_in_memory_fold(tmp_path, tiny_models, model_type):
    """The header-level fold writes exactly the tensors that editing a loaded model and
    calling save_pretrained gives."""
    from transformers import AutoModelForCausalLM

    src = tiny_models[model_type]
    vectors = _vectors(32, [(1, "resid_post"), (2, "resid_mid")])
    bake.fold(str(src), vectors, tmp_path / "streamed")

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        if model_type == "gpt2":
            model.transformer.h[1].mlp.c_proj.bias += vectors.vectors[(1, "resid_post")]
            model.transformer.h[2].attn.c_proj.bias += vectors.vectors[(2, "resid_mid")]
        else:
            model.config.mlp_bias = model.config.attention_bias = True
            for layer in model.model.layers:
                for lin in (
                    layer.mlp.gate_proj,
                    layer.mlp.up_proj,
                    layer.mlp.down_proj,
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                    layer.self_attn.o_proj,
                ):
                    lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features))
            model.model.layers[1].mlp.down_proj.bias += vectors.vectors[(1, "resid_post")]
            model.model.layers[2].self_attn.o_proj.bias += vectors.vectors[(2, "resid_mid")]
    model.save_pretrained(tmp_path / "in_memory")
    streamed, in_memory = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "in_memory")
    assert streamed.keys() == in_memory.keys()
    for name, t in in_memory.items():
        assert torch.equal(streamed[name], t), name


def test_interrupted_write_leaves_no_output(tmp_path, tiny_models, monkeypatch):
    """A failure in the middle of writing shards (disk full, Ctrl-C) leaves nothing behind."""
    from bake import checkpoint

    calls = {"n": 0}
    real = checkpoint.write_shard

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "write_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        bake.fold(str(tiny_models["llama"]), _vectors(32, [(1, "resid_post")]), tmp_path / "out", dtype="bfloat16")
    assert calls["n"] == 2
    assert list(tmp_path.iterdir()) == []
