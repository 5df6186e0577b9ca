"""bake inspect checks the weights on disk against the manifest: a tampered bias or config is reported."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import bake
from bake.cli import main
from bake.vectorfile import VectorSet


@pytest.fixture
def baked(tmp_path, tiny_models):
    def make(model_type: str):
        g = torch.Generator().manual_seed(5)
        vectors = VectorSet(
            {(1, "resid_post"): torch.randn(32, generator=g), (2, "resid_mid"): torch.randn(32, generator=g)}
        )
        out = tmp_path / model_type
        bake.fold(str(tiny_models[model_type]), vectors, out)
        return out

    return make


def _inspect(out, *flags: str):
    return CliRunner().invoke(main, ["inspect", str(out), *flags])


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_untouched_checkpoint_matches_its_manifest(baked, model_type):
    out = baked(model_type)
    result = _inspect(out)
    assert result.exit_code == 0, result.output
    assert "weights: match the manifest" in result.output
    verdict = json.loads(_inspect(out, "--json").output)
    assert verdict["matches_manifest"] is True and verdict["problems"] == []
    assert verdict["manifest"] == json.loads((out / "bake.json").read_text())


@pytest.mark.parametrize(
    "model_type,shard", [("gpt2", "model.safetensors"), ("llama", "model-bake-steering.safetensors")]
)
def test_tampered_bias_is_reported(baked, model_type, shard):
    out = baked(model_type)
    tensors = load_file(out / shard)
    name = next(n for n in tensors if n.endswith(".1.mlp.c_proj.bias") or n.endswith(".1.mlp.down_proj.bias"))
    tensors[name] = tensors[name].clone()
    tensors[name][0] += 0.5
    save_file(tensors, out / shard, metadata={"format": "pt"})
    result = _inspect(out)
    assert result.exit_code == 1
    assert "DO NOT match" in result.output and name in result.output
    as_json = _inspect(out, "--json")
    assert as_json.exit_code == 1, as_json.output
    verdict = json.loads(as_json.output)
    assert verdict["matches_manifest"] is False and any(name in p for p in verdict["problems"])


def test_config_flag_removed_is_reported(baked):
    out = baked("llama")
    config = json.loads((out / "config.json").read_text())
    config["mlp_bias"] = False
    (out / "config.json").write_text(json.dumps(config))
    result = _inspect(out)
    assert result.exit_code == 1
    assert "mlp_bias" in result.output and "drop the steering" in result.output
