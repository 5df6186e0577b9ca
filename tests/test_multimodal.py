"""Multimodal wrappers (LLaVA, Mistral Small 3, Gemma 3): bake steers the language model inside, the vision tower
and the processor files stay as they were, and the output loads with the wrapper's stock class (Gemma 3's with
its constant-bias module) equal to the hook-steered original. Tiny random wrappers built here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from conftest import make_tokenizer, tiny_config, tree_digest
from safetensors import safe_open
from test_architectures import PROBES, assert_steered_like_hooks, hooked_logits

import bake
from bake.cli import main
from bake.errors import BakeError
from bake.families.hf import family_for
from bake.recipe import VerifySpec, parse_recipe
from bake.vectorfile import VectorSet

_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16)
VISION = {
    "llava": dict(_VISION, model_type="clip_vision_model", patch_size=8),
    "mistral3": dict(_VISION, model_type="pixtral", patch_size=8, head_dim=8),
    "gemma3": dict(_VISION, model_type="siglip_vision_model", patch_size=8),
}
CLASS = {
    "llava": "LlavaForConditionalGeneration",
    "mistral3": "Mistral3ForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
}
# (wrapper model_type, text model_type, site, the text model is relabelled to llama, needs the module)
CASES = [
    ("llava", "llama", "resid_post", False, False),
    ("llava", "llama", "resid_mid", False, False),
    ("llava", "qwen2", "resid_post", True, False),
    ("llava", "qwen2", "resid_mid", True, False),
    ("mistral3", "mistral", "resid_post", True, False),
    ("mistral3", "mistral", "resid_mid", True, False),
    ("mistral3", "llama", "resid_post", False, False),  # as bake writes a baked Mistral 3
    ("gemma3", "gemma3_text", "resid_post", False, True),
    ("gemma3", "gemma3_text", "resid_mid", False, True),
]
# The image's special tokens each wrapper's processor expects in the tokenizer (added after the test vocabulary, and
# tokenizer attributes, which Gemma 3's processor reads); ``image_token`` is the one each image position holds.
IMAGE_TOKENS = {
    "llava": {"image_token": "<image>"},
    "mistral3": {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"},
    "gemma3": {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
}
# Image positions a 16x16 image fills (LLaVA: 2x2 patches, CLS dropped; Gemma 3: mm_tokens_per_image). Mistral 3's
# Pixtral tower is not run on an image here.
IMAGE_POSITIONS = {"llava": 4, "gemma3": 4}
# The processor files as the wrapper's stock processor writes them for a 16x16 image of 8x8 patches. Mistral 3's
# PixtralProcessor needs torchvision to be built (transformers 5), so its files are written as it would write them.
PROCESSOR_FILES = {
    "mistral3": {
        "processor_config.json": {
            "processor_class": "PixtralProcessor",
            "patch_size": 8,
            "spatial_merge_size": 2,
            **IMAGE_TOKENS["mistral3"],
            "image_processor": {
                "image_processor_type": "PixtralImageProcessor",
                "size": {"longest_edge": 16},
                "patch_size": 8,
                "do_resize": True,
                "do_rescale": True,
                "do_normalize": True,
                "do_convert_rgb": True,
                "rescale_factor": 1 / 255,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
            },
        }
    }
}


def wrapper_tokenizer(model_type: str):
    """The test tokenizer with the wrapper's image tokens added as special tokens."""
    return make_tokenizer(named=IMAGE_TOKENS[model_type])


def image_token(model_type: str) -> int:
    """The token id of one image position in the wrapper's tiny models."""
    return wrapper_tokenizer(model_type).convert_tokens_to_ids(IMAGE_TOKENS[model_type]["image_token"])


def wrapper_config(model_type: str, text_type: str, **text_overrides):
    """A tiny wrapper config around conftest's tiny text config (overrides win), its vocabulary the wrapper
    tokenizer's."""
    tok = wrapper_tokenizer(model_type)
    text = tiny_config(text_type, **{"vocab_size": len(tok), **text_overrides})
    config = transformers.AutoConfig.for_model(
        model_type, text_config=text.to_dict(), vision_config=VISION[model_type], mm_tokens_per_image=4
    )
    for name, token in IMAGE_TOKENS[model_type].items():  # the ids the wrapper's config has a key for
        key = f"{name.removesuffix('_token')}_token_index"
        if hasattr(config, key):
            setattr(config, key, tok.convert_tokens_to_ids(token))
    return config


def _processor(model_type: str, tok):
    """The wrapper's stock processor for 16x16 images (None for Mistral 3: see PROCESSOR_FILES)."""
    if model_type == "llava":  # CLIP's CLS position is dropped by the "default" feature strategy: 4 positions
        images = transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
        return transformers.LlavaProcessor(
            images, tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1
        )
    if model_type == "gemma3":
        images = transformers.Gemma3ImageProcessor(size={"height": 16, "width": 16})
        return transformers.Gemma3Processor(images, tok, image_seq_length=4)
    return None


def save_wrapper_config(path: Path, config) -> Path:
    """A tiny random wrapper of ``config`` (weights larger than default init, as conftest.save_tiny), with its
    tokenizer and processor files."""
    model_type = config.model_type
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.eval().save_pretrained(path)
    tok = wrapper_tokenizer(model_type)
    processor = _processor(model_type, tok)
    (processor or tok).save_pretrained(path)
    for name, content in PROCESSOR_FILES.get(model_type, {}).items():
        (path / name).write_text(json.dumps(content, indent=2) + "\n")
    return path


def save_wrapper(path: Path, model_type: str, text_type: str, **text_overrides) -> Path:
    """A tiny random wrapper around conftest's tiny text model (see save_wrapper_config)."""
    return save_wrapper_config(path, wrapper_config(model_type, text_type, **text_overrides))


def processor_files(path: Path) -> list[str]:
    """The processor's files a wrapper folder holds (they must be copied as they are)."""
    return sorted(p.name for p in path.glob("*processor*.json")) + sorted(p.name for p in path.glob("chat_template*"))


def tensors(path: Path) -> dict[str, bytes]:
    """Every tensor of a folder's safetensors shards, as its raw bytes (with dtype and shape)."""
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name).contiguous()
                out[name] = (str(t.dtype), tuple(t.shape), t.view(-1).view(torch.uint8).numpy().tobytes())
    return out


def _vectors(site: str) -> VectorSet:
    g = torch.Generator().manual_seed(3)
    return VectorSet({(1, site): 3 * torch.randn(32, generator=g), (3, site): 3 * torch.randn(32, generator=g)})


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_wrapper_bakes_its_language_model_exactly(tmp_path, case):
    model_type, text_type, site, relabelled, module = case
    src = save_wrapper(tmp_path / "src", model_type, text_type)
    before, source_tensors = tree_digest(src), tensors(src)
    vectors = _vectors(site)
    out = tmp_path / "out"
    result = bake.fold(str(src), vectors, out, verify=VerifySpec(prompts=PROBES, tokens=6), allow_remote_code=module)
    assert result.verification["passed"] and result.verification["max_abs_logit_diff"] <= 1e-5, result.verification
    assert tree_digest(src) == before

    # the wrapper's stock class (Gemma 3: its constant-bias module subclassing it), every tensor loaded
    auto = transformers.AutoModelForCausalLM if module else getattr(transformers, CLASS[model_type])
    baked, info = auto.from_pretrained(out, trust_remote_code=module, output_loading_info=True)
    baked.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(baked).__name__ == ("BakeSteered" if module else "") + CLASS[model_type]
    assert CLASS[model_type] in [c.__name__ for c in type(baked).__mro__]

    # only the text config changed (and the module's entries at the top): flags and relabel inside text_config
    old, new = (json.loads((p / "config.json").read_text()) for p in (src, out))
    module_keys = {"architectures", "auto_map", "bake_steering"} if module else set()
    assert {k: v for k, v in new.items() if k not in {"text_config"} | module_keys} == {
        k: v for k, v in old.items() if k not in {"text_config"} | module_keys
    }
    assert new["vision_config"] == old["vision_config"]
    assert new["text_config"]["model_type"] == ("llama" if relabelled else text_type)
    if not module:
        assert new["text_config"][{"resid_post": "mlp_bias", "resid_mid": "attention_bias"}[site]] is True

    # every source tensor is in the output byte for byte, the vision tower's and projector's among them; the
    # text blocks only gain biases (the vectors, or zeros beside them)
    baked_tensors = tensors(out)
    vision = [n for n in source_tensors if n.startswith(("vision_tower.", "multi_modal_projector."))]
    assert len(vision) > 5
    for name, data in source_tensors.items():
        assert baked_tensors.get(name) == data, name
    assert all(n.endswith(".bias") for n in set(baked_tensors) - set(source_tensors))
    assert processor_files(src), "the tiny wrapper has no processor files"
    for name in processor_files(src):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()

    # the model card names the wrapper's loader and task, and what vLLM and llama.cpp do with it (the table's row)
    card = (out / "README.md").read_text()
    family = family_for(transformers.AutoConfig.from_pretrained(src))
    assert "pipeline_tag: image-text-to-text" in card and family.vllm in card and family.llama_cpp in card
    loader = "`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`"
    assert f"reloaded from disk with {loader if module else f'plain `{CLASS[model_type]}.from_pretrained`'}" in card
    assert ("written as `model_type: llama` inside the stock" in card) == relabelled

    original = getattr(transformers, CLASS[model_type]).from_pretrained(src).eval()
    # logits and greedy tokens equal the original's steered by hooks on its text blocks (tests/test_architectures.py)
    assert_steered_like_hooks(baked, original, model_type, vectors, 1e-5, torch.float32)

    if model_type in IMAGE_POSITIONS:  # an image through the baked wrapper: the text model is steered the same
        tok = make_tokenizer()
        image = [image_token(model_type)] * IMAGE_POSITIONS[model_type]
        ids = torch.tensor([[tok.bos_token_id] + image + tok("a dog").input_ids])
        pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            got, blind = (baked(input_ids=ids, **p).logits for p in ({"pixel_values": pixels}, {}))
        assert (got - hooked_logits(original, model_type, vectors, ids, pixel_values=pixels)).abs().max() <= 1e-5
        assert (got - blind).abs().max() > 1e-2, "the image did not reach the language model"

    bake.unbake(out, tmp_path / "restored")  # the undo data restores the wrapper bit for bit
    assert tree_digest(tmp_path / "restored") == before


def test_measured_vector_is_the_text_models_mean_difference(tmp_path):
    """bake measures on text through the wrapper: the vector equals the difference of mean hidden states that the
    stock wrapper reports (output_hidden_states) after block 1, bos uncounted."""
    src = save_wrapper(tmp_path / "src", "llava", "llama")
    target, background = ["the happy dog is here today", "a wonderful bright day"], ["the cat in the castle", "rain"]
    recipe = parse_recipe(
        f"model: {src}\nbackground: {{corpus: {{texts: {json.dumps(background)}}}}}\nsteering:\n"
        f"  - {{name: joy, layer: 1, coefficient: 2.0, target: {{texts: {json.dumps(target)}}}}}",
        tmp_path,
    )
    got = bake.compute_vectors(recipe).vectors[(1, "resid_post")]
    model, tok = transformers.LlavaForConditionalGeneration.from_pretrained(src).eval(), make_tokenizer()

    def mean(texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            with torch.no_grad():
                hidden = model(input_ids=torch.tensor([tok(text).input_ids]), output_hidden_states=True)
            rows.append(hidden.hidden_states[2][0, 1:].double())  # after block 1, without the <bos> position
        return torch.cat(rows).mean(0)

    torch.testing.assert_close(got.double(), 2.0 * (mean(target) - mean(background)), rtol=1e-5, atol=1e-5)


def _one_line_refusal(src: Path, out: Path, site: str = "resid_post") -> str:
    before = tree_digest(src)
    with pytest.raises(BakeError) as err:
        bake.fold(str(src), _vectors(site), out)
    assert "\n" not in str(err.value)
    assert not out.exists() and tree_digest(src) == before
    return str(err.value)


def test_unsupported_wrapper_is_one_line(tmp_path):
    src = save_wrapper(tmp_path / "src", "llava", "llama")
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"])
    (src / "config.json").write_text(json.dumps(config))
    message = _one_line_refusal(src, tmp_path / "out")
    for word in ("'llava_next'", "multimodal wrapper", "'llama' language model", "supported wrappers", "mistral3"):
        assert word in message, message
    vectors = tmp_path / "v.safetensors"
    _vectors("resid_post").save(vectors)
    run = CliRunner().invoke(main, ["fold", str(src), str(vectors), "-o", str(tmp_path / "cli-out")])
    assert run.exit_code == 1 and run.output == f"Error: {message}\n", run.output


@pytest.mark.parametrize(
    "model_type,text_type,overrides,site,words",
    [
        ("gemma3", "gemma3_text", {}, "resid_mid", ["Gemma 3 multimodal (Gemma 3)", "no exact bias slot", "--allow"]),
        ("llava", "gemma", {}, "resid_mid", ["LLaVA ('llava') around a Gemma language model is not supported"]),
        ("mistral3", "mistral", {"sliding_window": 8}, "resid_post", ["LlamaForCausalLM", "sliding_window 8"]),
    ],
    ids=["gemma3-no-slot", "llava-gemma", "mistral3-sliding"],
)
def test_wrapper_without_exact_slot_is_refused(tmp_path, model_type, text_type, overrides, site, words):
    src = save_wrapper(tmp_path / "src", model_type, text_type, **overrides)
    message = _one_line_refusal(src, tmp_path / "out", site)
    for word in words:
        assert word in message, message


def test_llava_saved_by_older_transformers_names(tmp_path):
    """Checkpoints written by transformers 4.5x name the text blocks ``model.language_model.layers.N``: found too."""
    from safetensors.torch import load_file, save_file

    src = save_wrapper(tmp_path / "src", "llava", "llama")
    state = load_file(src / "model.safetensors")
    renamed = {k.replace("language_model.model.", "model.language_model.", 1): v for k, v in state.items()}
    save_file(renamed, src / "model.safetensors", metadata={"format": "pt"})
    result = bake.fold(str(src), _vectors("resid_post"), tmp_path / "out", verify=VerifySpec(prompts=PROBES))
    assert result.verification["passed"], result.verification
    assert {b.tensor for b in result.manifest.fold.biases} == {
        f"model.language_model.layers.{i}.mlp.down_proj.bias" for i in (1, 3)
    }


@pytest.mark.parametrize("model_type,text_type", [("llava", "llama"), ("mistral3", "mistral")])
def test_streaming_collection_and_verification_find_the_wrapper_tensors(tmp_path, model_type, text_type):
    """Block-by-block measurement reads the text blocks under the wrapper's checkpoint names (equal to the in-memory
    vector), block-by-block verification passes, and a baked wrapper (Mistral 3's text model now `llama`) bakes
    again on top."""
    src = save_wrapper(tmp_path / "src", model_type, text_type)
    text = 'background: {corpus: {texts: ["the cat in the castle", "rain"]}}\nsteering:\n'
    text += '  - {name: joy, layer: 2, coefficient: 2.0, target: {texts: ["the happy dog", "a wonderful day"]}}'
    vectors = {
        how: bake.compute_vectors(parse_recipe(f"model: {src}\ncollection: {how}\n{text}", tmp_path))
        for how in ("streaming", "memory")
    }
    torch.testing.assert_close(vectors["streaming"].vectors, vectors["memory"].vectors, rtol=1e-6, atol=1e-6)
    result = bake.fold(str(src), vectors["memory"], tmp_path / "out", collection="streaming")
    assert result.verification["streamed"] and result.verification["passed"], result.verification
    again = bake.fold(str(tmp_path / "out"), _vectors("resid_post"), tmp_path / "again")
    assert again.verification["passed"] and len(again.manifest.history) == 1, again.verification
