"""Every family in the table: bake at each exact site → reload with stock from_pretrained → equal to
the hook-steered original; families without a slot are refused with the alternatives named."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tokenizer, save_tiny, tiny_config, tree_digest
from transformers import AutoModelForCausalLM

import bake
from bake.errors import BakeError
from bake.recipe import VerifySpec
from bake.vectorfile import VectorSet

PROBES = ["the happy dog is here", "tell me about your day", "a king and a dragon in the castle"]

# Written here independently of bake/families/hf.py: where each family's blocks live, and
# which module's output joins the residual after the attention sublayer.
BLOCKS = {
    "gpt2": "transformer.h",
    "gptj": "transformer.h",
    "falcon": "transformer.h",
    "bloom": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
} | dict.fromkeys(("llava", "mistral3", "gemma3"), "model.language_model.layers")  # multimodal wrappers' text blocks
ATTENTION = {
    "gpt2": "attn",
    "gpt_neox": "attention",
    "falcon": "self_attention",
    "bloom": "self_attention",
    "opt": "self_attn",
    "gemma3": "post_attention_layernorm",  # post-norm: the norm's output joins the residual
}

# (model_type, config overrides, site, relabelled to llama)
EXACT = [
    ("gpt2", {}, "resid_post", False),
    ("gpt2", {}, "resid_mid", False),
    ("gpt_neox", {}, "resid_post", False),
    ("gpt_neox", {"use_parallel_residual": False}, "resid_post", False),
    ("gpt_neox", {"use_parallel_residual": False}, "resid_mid", False),
    ("gptj", {}, "resid_post", False),
    ("opt", {}, "resid_post", False),
    ("opt", {}, "resid_mid", False),
    ("opt", {"do_layer_norm_before": False}, "resid_post", False),
    ("opt", {"do_layer_norm_before": False}, "resid_mid", False),
    ("phi", {}, "resid_post", False),
    ("falcon", {}, "resid_post", False),
    ("falcon", {"parallel_attn": False}, "resid_mid", False),
    ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}, "resid_post", False),
    ("bloom", {}, "resid_post", False),
    ("bloom", {}, "resid_mid", False),
    ("starcoder2", {}, "resid_post", False),
    ("starcoder2", {}, "resid_mid", False),
    ("llama", {}, "resid_post", False),
    ("llama", {}, "resid_mid", False),
    ("granite", {}, "resid_post", False),
    ("granite", {}, "resid_mid", False),
    ("mistral", {}, "resid_post", True),
    ("mistral", {}, "resid_mid", True),
    ("qwen2", {}, "resid_post", True),
    ("qwen2", {}, "resid_mid", True),
    ("phi3", {}, "resid_post", True),
    ("phi3", {}, "resid_mid", True),
    ("qwen3", {}, "resid_mid", False),
    ("gemma", {}, "resid_mid", False),
    ("qwen3_moe", {}, "resid_mid", False),
    ("olmoe", {}, "resid_mid", False),
    ("deepseek_v2", {}, "resid_post", False),  # layer 1 dense (mlp.down_proj), layer 3 MoE (shared experts)
    ("deepseek_v2", {}, "resid_mid", False),
    ("deepseek_v2", {"q_lora_rank": 16}, "resid_mid", False),
    ("deepseek_v3", {}, "resid_mid", False),
    ("llama4_text", {}, "resid_mid", False),
    ("gpt_oss", {}, "resid_post", False),  # every expert's down_proj_bias
    ("gpt_oss", {}, "resid_mid", False),
]
# gpt-oss computes its router's softmax weights in the model's dtype: in bf16 they sum to 1 only to within ~2^-8,
# so the vector on every expert's bias arrives scaled by 1 +- 0.004 (exact to 1e-5 in fp32).
BF16_ATOL = {("gpt_oss", "resid_post"): 0.25}
# Written for vLLM's Transformers backend: vLLM's own classes for these build o_proj (or the MLPs) without a bias.
VIA_VLLM_BACKEND = {"qwen3": "TransformersForCausalLM", "gemma": "TransformersForCausalLM"} | {
    t: "TransformersMoEForCausalLM" for t in ("qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "llama4_text")
}


def _hook_target(model, model_type: str, config, layer: int, site: str):
    """(module, scale): the residual joins at this module's output; the sublayer output is scaled by ``scale``."""
    block = model.get_submodule(BLOCKS.get(model_type, "model.layers"))[layer]
    if site == "resid_post":
        return block, 1.0
    if model_type == "opt" and not config.do_layer_norm_before:
        return block.self_attn_layer_norm, 1.0  # post-LN: the LayerNorm output is the residual
    scale = getattr(config, "residual_multiplier", 1.0) if model_type == "granite" else 1.0
    return block.get_submodule(ATTENTION.get(model_type, "self_attn")), scale


def hooked_logits(model, model_type, vectors: VectorSet, ids: torch.Tensor, **inputs) -> torch.Tensor:
    handles = []
    for (layer, site), v in vectors.vectors.items():
        module, scale = _hook_target(model, model_type, model.config, layer, site)

        def hook(_m, _i, out, v=v / scale):
            if isinstance(out, tuple):
                return (out[0] + v.to(out[0].dtype),) + out[1:]
            return out + v.to(out.dtype)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(input_ids=ids, **inputs).logits.float()
    finally:
        for h in handles:
            h.remove()


def _id(case) -> str:
    model_type, overrides, site, _ = case
    return "-".join([model_type, *(f"{k}={v}" for k, v in overrides.items()), site])


@pytest.mark.parametrize("case", EXACT, ids=_id)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.1)], ids=["fp32", "bf16"])
def test_family_bakes_exactly(tmp_path, case, dtype, atol):
    model_type, overrides, site, relabelled = case
    if dtype == torch.bfloat16:
        atol = BF16_ATOL.get((model_type, site), atol)
    config = tiny_config(model_type, **overrides)
    src = save_tiny(tmp_path / "src", config, dtype=dtype)
    before = tree_digest(src)
    g = torch.Generator().manual_seed(3)
    vectors = VectorSet({(1, site): 3 * torch.randn(32, generator=g), (3, site): 3 * torch.randn(32, generator=g)})
    result = bake.fold(str(src), vectors, tmp_path / "out", verify=VerifySpec(prompts=PROBES, tokens=6))
    assert result.verification["passed"], result.verification
    assert tree_digest(src) == before

    baked = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # stock, no remote code
    original = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    assert next(baked.parameters()).dtype == dtype
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    where = (tmp_path / "out" / "README.md").read_text().split("## Where the steering loads")[1].split("##")[0]
    assert "silently drops" not in where, where
    # vLLM's own Qwen3/Gemma classes build o_proj without a bias: the label sends vLLM to its Transformers backend
    if model_type in VIA_VLLM_BACKEND:
        assert written["architectures"] == [VIA_VLLM_BACKEND[model_type]], written
    else:
        assert not written["architectures"][0].startswith("Transformers"), written
    if relabelled:
        assert type(baked).__name__ == "LlamaForCausalLM" and written["model_type"] == "llama"
        assert result.manifest.fold.relabel["from"] == model_type
        card = (tmp_path / "out" / "README.md").read_text()
        assert "## Architecture relabelled" in card and f"`{model_type}` model" in card and "`LlamaForCausalLM`" in card
    else:
        assert type(baked) is type(original)
    assert_steered_like_hooks(baked, original, model_type, vectors, atol, dtype)


def assert_steered_like_hooks(
    baked: torch.nn.Module,
    original: torch.nn.Module,
    model_type: str,
    vectors: VectorSet,
    atol: float,
    dtype: torch.dtype,
) -> None:
    """Logits equal the hook-steered original's (and differ from the unsteered); greedy tokens identical, but for a
    bf16 near-tie (within 2 * atol) where hook and bias round differently."""
    tok = make_tokenizer()
    for prompt in PROBES:
        ids = torch.tensor([tok(prompt).input_ids])
        with torch.no_grad():
            got = baked(input_ids=ids).logits.float()
            plain = original(input_ids=ids).logits.float()
        want = hooked_logits(original, model_type, vectors, ids)
        assert (got - want).abs().max() <= atol
        assert (got - plain).abs().max() > 5 * atol, "the steering is missing from the reloaded model"
    for prompt in PROBES:
        ids = torch.tensor([tok(prompt).input_ids])
        greedy = baked.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)[0].tolist()
        ref = ids
        for _ in range(6):
            logits = hooked_logits(original, model_type, vectors, ref)[0, -1]
            choice = int(logits.argmax())
            if choice != greedy[ref.shape[1]]:
                assert dtype == torch.bfloat16 and logits[choice] - logits[greedy[ref.shape[1]]] <= 2 * atol
                break
            ref = torch.cat([ref, torch.tensor([[choice]])], dim=1)


REFUSED = [
    ("gemma2", {}, "resid_post", ["Gemma 2", "no exact bias slot", "--allow-remote-code"]),
    ("gemma3_text", {}, "resid_mid", ["Gemma 3", "no exact bias slot", "--allow-remote-code"]),
    ("olmo2", {}, "resid_post", ["OLMo 2", "no exact bias slot"]),
    ("qwen3", {}, "resid_post", ["Qwen3", "use site 'resid_mid'"]),
    ("gemma", {}, "resid_post", ["Gemma", "use site 'resid_mid'"]),
    ("gpt_neox", {}, "resid_mid", ["GPT-NeoX", "use site 'resid_post'"]),
    ("gptj", {}, "resid_mid", ["GPT-J", "use site 'resid_post'"]),
    ("phi", {}, "resid_mid", ["Phi", "use site 'resid_post'"]),
    ("falcon", {}, "resid_mid", ["Falcon", "use site 'resid_post'"]),
    ("mistral", {"sliding_window": 8}, "resid_post", ["Mistral", "LlamaForCausalLM", "sliding_window 8"]),
    (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0},
        "resid_post",
        ["Qwen2", "sliding"],
    ),
    ("phi3", {"partial_rotary_factor": 0.5}, "resid_post", ["Phi-3", "partial_rotary_factor"]),
    ("mixtral", {}, "resid_post", ["Mixtral", "no exact bias slot", "no bias", "--allow-remote-code"]),
    ("mixtral", {}, "resid_mid", ["Mixtral", "no exact bias slot", "o_proj", "--allow-remote-code"]),
    ("qwen2_moe", {}, "resid_post", ["Qwen2-MoE", "no exact bias slot", "sigmoid gate", "--allow-remote-code"]),
    ("qwen2_moe", {}, "resid_mid", ["Qwen2-MoE", "no exact bias slot", "o_proj"]),
    ("qwen3_moe", {}, "resid_post", ["Qwen3-MoE", "use site 'resid_mid'", "--allow-remote-code"]),
    ("olmoe", {}, "resid_post", ["OLMoE", "use site 'resid_mid'"]),
    ("deepseek_v3", {}, "resid_post", ["DeepSeek-V3", "use site 'resid_mid'", "sum to 1"]),
    ("llama4_text", {}, "resid_post", ["Llama 4", "use site 'resid_mid'", "sum to 1"]),
]


@pytest.mark.parametrize("model_type,overrides,site,words", REFUSED, ids=lambda x: x if isinstance(x, str) else "")
def test_family_without_exact_slot_is_refused(tmp_path, model_type, overrides, site, words):
    src = save_tiny(tmp_path / "src", tiny_config(model_type, **overrides))
    before = tree_digest(src)
    with pytest.raises(BakeError) as err:
        bake.fold(str(src), VectorSet({(1, site): torch.ones(32)}), tmp_path / "out")
    for word in words:
        assert word in str(err.value), str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
    assert tree_digest(src) == before


def test_phi3_split_reproduces_the_fused_weights(tmp_path):
    """The relabelled q/k/v and gate/up weights concatenate back to the fused originals exactly."""
    from safetensors import safe_open

    src = save_tiny(tmp_path / "src", tiny_config("phi3"))
    bake.fold(str(src), VectorSet({(2, "resid_post"): torch.ones(32)}), tmp_path / "out")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]

    def get(name):
        with safe_open(out / index[name], "pt") as f:
            return f.get_tensor(name)

    with safe_open(src / "model.safetensors", "pt") as f:
        for layer in range(4):
            p = f"model.layers.{layer}"
            assert torch.equal(
                f.get_tensor(f"{p}.self_attn.qkv_proj.weight"),
                torch.cat([get(f"{p}.self_attn.{x}_proj.weight") for x in "qkv"]),
            )
            assert torch.equal(
                f.get_tensor(f"{p}.mlp.gate_up_proj.weight"),
                torch.cat([get(f"{p}.mlp.gate_proj.weight"), get(f"{p}.mlp.up_proj.weight")]),
            )
            assert f"{p}.self_attn.qkv_proj.weight" not in index


def test_docs_carry_the_table_generated_from_the_data():
    from pathlib import Path

    from bake.families.hf import portability_table

    page = (Path(__file__).resolve().parents[1] / "docs" / "architectures.md").read_text()
    assert portability_table() in page, (
        "docs/architectures.md's table is stale: paste bake.families.hf.portability_table()"
    )
