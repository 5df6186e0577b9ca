"""MoE families: the constant-bias module where no stock bias exists, and gpt-oss in its published MXFP4 layout.

Exact stock slots (Qwen3-MoE, OLMoE, DeepSeek-V2/V3 and Llama 4 at ``resid_mid``, DeepSeek-V2 and gpt-oss at
``resid_post``) and the one-line refusals are cases of tests/test_architectures.py; this file covers what that
table-driven test cannot: a bake mixing a stock bias with the module, and a checkpoint whose experts are MXFP4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny, tiny_config, tree_digest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_architectures import PROBES, assert_steered_like_hooks

import bake
from bake.manifest import check
from bake.recipe import VerifySpec
from bake.sources.load import load_model
from bake.vectorfile import VectorSet

pytestmark = pytest.mark.usefixtures("one_thread")


def _vectors(points: list[tuple[int, str]]) -> VectorSet:
    g = torch.Generator().manual_seed(5)
    return VectorSet({p: 3 * torch.randn(32, generator=g) for p in points})


# (model_type, points): each family's sites without a stock slot, beside a stock one where the family has it.
MODULE = [
    ("mixtral", [(1, "resid_mid"), (3, "resid_post")]),
    ("qwen2_moe", [(1, "resid_mid"), (3, "resid_post")]),
    ("qwen3_moe", [(1, "resid_mid"), (3, "resid_post")]),
    ("olmoe", [(1, "resid_mid"), (3, "resid_post")]),
    ("deepseek_v3", [(1, "resid_mid"), (3, "resid_post")]),
    ("llama4_text", [(1, "resid_mid"), (3, "resid_post")]),
]


@pytest.mark.parametrize("model_type,points", MODULE, ids=[m for m, _ in MODULE])
def test_moe_without_a_slot_bakes_into_the_module(tmp_path, model_type, points):
    src = save_tiny(tmp_path / "src", tiny_config(model_type))
    before = tree_digest(src)
    vectors = _vectors(points)
    result = bake.fold(
        str(src), vectors, tmp_path / "out", verify=VerifySpec(prompts=PROBES, tokens=5), allow_remote_code=True
    )
    assert result.verification["passed"], result.verification
    assert tree_digest(src) == before
    records = {b.site: b for b in result.manifest.fold.biases}
    assert getattr(records["resid_post"], "remote_code", False) is True  # no MoE family here has a post-block bias
    stock_mid = model_type not in ("mixtral", "qwen2_moe")  # their o_proj has no bias flag
    assert (records["resid_mid"].tensor == "model.layers.1.self_attn.o_proj.bias") == stock_mid
    baked = load_model(tmp_path / "out")  # checks the module is bake's own, then trust_remote_code=True
    assert type(baked).__name__.startswith("BakeSteered")
    original = load_model(src)
    assert_steered_like_hooks(baked, original, model_type, vectors, 1e-4, torch.float32)


def _as_mxfp4(src: Path, out: Path) -> Path:
    """``src`` rewritten in the layout of openai/gpt-oss-*: expert weights as MXFP4 ``<proj>_blocks`` (uint8,
    two FP4 values a byte, 32 a block) and ``<proj>_scales`` (uint8 exponents), biases bf16, and the
    ``quantization_config`` transformers' Mxfp4HfQuantizer reads. Random blocks stand in for quantized weights:
    the fold must leave them byte for byte, and transformers dequantizes them the same way for base and bake."""
    out.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    for name in [n for n in tensors if n.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]:
        experts, rows_in, rows_out = tensors.pop(name).shape  # transformers' [experts, in, out]
        groups = (experts, rows_out, rows_in // 32)
        tensors[f"{name}_blocks"] = torch.randint(0, 256, (*groups, 16), dtype=torch.uint8, generator=g)
        tensors[f"{name}_scales"] = torch.randint(124, 127, groups, dtype=torch.uint8, generator=g)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's shards (not bake/'s own files)."""
    found = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            found.update({k: f.get_tensor(k) for k in f.keys()})
    return found


def test_gpt_oss_mxfp4_folds_by_rewriting_only_biases(tmp_path):
    """A gpt-oss checkpoint in its published layout bakes both sites without dequantizing an expert: every
    ``*_blocks``/``*_scales`` tensor is copied bit for bit, only o_proj and expert down biases change (each
    expert's row by the same vector), unbake restores the source bit for bit, and the baked model, dequantized by
    stock transformers, steers like hooks."""
    bf16 = save_tiny(tmp_path / "bf16", tiny_config("gpt_oss"), dtype=torch.bfloat16)
    src = _as_mxfp4(bf16, tmp_path / "src")
    before = tree_digest(src)
    vectors = _vectors([(1, "resid_mid"), (1, "resid_post"), (3, "resid_post")])
    result = bake.fold(str(src), vectors, tmp_path / "out", verify=VerifySpec(prompts=PROBES, tokens=5))
    assert result.verification["passed"], result.verification
    assert tree_digest(src) == before
    old, new = _tensors(src), _tensors(tmp_path / "out")
    assert old.keys() == new.keys()
    changed = {k for k in old if old[k].dtype != new[k].dtype or not torch.equal(old[k], new[k])}
    want = {
        "model.layers.1.self_attn.o_proj.bias",
        "model.layers.1.mlp.experts.down_proj_bias",
        "model.layers.3.mlp.experts.down_proj_bias",
    }
    assert changed == want
    assert sum(k.endswith(("_blocks", "_scales")) and new[k].dtype == torch.uint8 for k in new) == 16
    for layer in (1, 3):
        name = f"model.layers.{layer}.mlp.experts.down_proj_bias"
        exact = old[name].float() + vectors.vectors[(layer, "resid_post")]
        assert torch.equal(new[name], exact.to(torch.bfloat16))  # every expert's row, the same vector
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert config["architectures"] == ["GptOssForCausalLM"]
    assert check(tmp_path / "out", result.manifest) == []  # the manifest check reads per-expert rows too
    bake.unbake(tmp_path / "out", tmp_path / "restored")
    assert tree_digest(tmp_path / "restored") == before
    baked, original = load_model(tmp_path / "out"), load_model(src)  # both dequantized to bf16 on CPU
    # bf16, and the router's softmax weights sum to 1 only to bf16 precision (tests/test_architectures.py)
    assert_steered_like_hooks(baked, original, "gpt_oss", vectors, 0.25, torch.bfloat16)
