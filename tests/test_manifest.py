"""bake inspect checks the weights on disk against the manifest: a tampered bias or config is reported."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny, tiny_config
from safetensors.torch import load_file, save_file

import bake
import bake.manifest
from bake import api
from bake.checkpoint import read_header
from bake.cli import main
from bake.errors import BakeError
from bake.vectorfile import VectorSet

DATA = Path(__file__).parent / "data"


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


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("link", [False, True])
def test_every_shard_is_recorded_with_the_sha256_of_its_bytes_on_disk(tmp_path, tiny_models, link):
    """Hashed while written (copied, patched or new shards) or, hard-linked, read once: the same digests as
    hashlib over the files afterwards, for every .safetensors file of the output and no other."""
    src = save_tiny(tmp_path / "src", tiny_config("llama"), max_shard_size="20KB")
    g = torch.Generator().manual_seed(5)
    bake.fold(str(src), VectorSet({(1, "resid_post"): torch.randn(32, generator=g)}), tmp_path / "out", link=link)
    out = tmp_path / "out"
    shards = json.loads((out / "bake.json").read_text())["fold"]["shards"]
    on_disk = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(shards) == on_disk and len(on_disk) > 2
    for name, record in shards.items():
        assert record == {"sha256": _sha256(out / name), "size": (out / name).stat().st_size}, name


def test_gpt2_patched_shard_is_recorded_as_patched(baked):
    """A native-bias fold patches bytes into the copy: the digest is of the patched file, not the source's."""
    out = baked("gpt2")
    shards = bake.manifest.read(out).fold.shards
    assert shards["model.safetensors"].sha256 == _sha256(out / "model.safetensors")


def _tamper_weight(out) -> tuple[str, str]:
    """Flip a byte of a weight that is not a folded bias (the first shard's first non-bias tensor)."""
    manifest = json.loads((out / "bake.json").read_text())
    biases = {b["tensor"] for b in manifest["fold"]["biases"]}
    for shard in sorted(out.glob("*.safetensors")):
        info = read_header(shard)[0]
        name = next((n for n in sorted(info) if n not in biases and not n.endswith(".bias")), None)
        if name:
            data = bytearray(shard.read_bytes())
            data[info[name].start] ^= 0x01
            shard.write_bytes(bytes(data))
            return shard.name, name
    raise AssertionError("no non-bias weight")


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_tampered_non_bias_weight_is_named_by_inspect_and_refused_by_unbake(baked, tmp_path, model_type):
    out = baked(model_type)
    shard, tensor = _tamper_weight(out)
    result = _inspect(out)
    assert result.exit_code == 1, result.output
    assert "DO NOT match" in result.output and f"{shard} differs from the file baked" in result.output
    as_json = _inspect(out, "--json")
    assert as_json.exit_code == 1
    verdict = json.loads(as_json.output)
    assert verdict["matches_manifest"] is False and any(shard in p for p in verdict["problems"])
    assert verdict["unverified"] == []
    unbaked = CliRunner().invoke(main, ["unbake", str(out), "-o", str(tmp_path / "base")])
    assert unbaked.exit_code == 1 and shard in unbaked.output, unbaked.output
    assert not (tmp_path / "base").exists()


def test_a_shard_bake_did_not_write_is_reported(baked):
    out = baked("llama")
    save_file({"x": torch.zeros(2)}, out / "model-extra.safetensors")
    result = _inspect(out)
    assert result.exit_code == 1 and "model-extra.safetensors is not a shard bake wrote" in result.output


def test_a_bake_without_file_hashes_says_so_and_still_checks_the_biases(baked, tmp_path):
    """A manifest from before the hashes (no fold.shards): inspect passes on the biases but says what it could
    not check; a tampered bias is still caught."""
    out = baked("llama")
    manifest = json.loads((out / "bake.json").read_text())
    del manifest["fold"]["shards"]
    (out / "bake.json").write_text(json.dumps(manifest, indent=2) + "\n")
    result = _inspect(out)
    assert result.exit_code == 0, result.output
    assert "NOTE: file hashes not recorded (baked by bake" in result.output
    verdict = json.loads(_inspect(out, "--json").output)
    assert verdict["matches_manifest"] is True and "file hashes not recorded" in verdict["unverified"][0]
    unbaked = CliRunner().invoke(main, ["unbake", str(out), "-o", str(tmp_path / "base")])
    assert unbaked.exit_code == 0 and "file hashes not recorded" in unbaked.output, unbaked.output


@pytest.mark.parametrize("name", sorted(p.name for p in (DATA / "manifests-0.1.0").glob("*.json")))
def test_a_manifest_written_before_the_typed_model_reads_and_round_trips_byte_for_byte(tmp_path, name):
    """bake.json files baked by bake 0.1.0 before the typed manifest (a recipe with preview and eval, a bake on top
    of it, a relabel, a constant-bias module): read as the model, written back unchanged."""
    text = (DATA / "manifests-0.1.0" / name).read_text()
    (tmp_path / "bake.json").write_text(text)
    manifest = bake.manifest.read(tmp_path)
    assert isinstance(manifest, bake.manifest.Manifest) and manifest.fold.shards is None
    assert bake.manifest.dumps(manifest) == text
    assert manifest.as_dict() == json.loads(text)


def test_an_unknown_top_level_field_is_still_refused(tmp_path):
    data = json.loads((DATA / "manifests-0.1.0" / "recipe.json").read_text())
    (tmp_path / "bake.json").write_text(json.dumps({**data, "surprise": 1}))
    with pytest.raises(BakeError, match="surprise: Extra inputs are not permitted"):
        bake.manifest.read(tmp_path)


def test_read_manifest_returns_the_model_and_its_dict(baked):
    out = baked("gpt2")
    manifest = api.read_manifest(str(out))
    assert manifest.fold.family == "GPT-2" and manifest.base.spec
    assert manifest.as_dict() == json.loads((out / "bake.json").read_text())
