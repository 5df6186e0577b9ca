"""A baked Hugging Face checkpoint converts with llama.cpp's own convert_hf_to_gguf.py: the biases map by name.

The converter is the one in the llama-cpp-python 0.3.36 sdist, which vendors llama.cpp
0c1e570 (convert_hf_to_gguf.py, conversion/, gguf-py/). The ``converter`` fixture fetches it once
(``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36``) into ~/.cache/bake-tests, or
skips saying why when PyPI cannot be reached; it needs ``sentencepiece`` (the test extra) even for a
BPE tokenizer, because the Llama converter imports it before looking for a tokenizer.model.
The tiny Llama uses SmolLM2's tokenizer: the converter only accepts BPE tokenizers whose
pre-tokenizer it recognises.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from bake import api
from bake.vectorfile import VectorSet

SDIST_ROOT = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


SDIST = "llama_cpp_python-0.3.36.tar.gz"


def llama_cpp_sdist() -> Path:
    """llama-cpp-python's sdist, downloaded once into a cache outside the repository (pip's own cache helps too)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bake-tests"
    if not (cache / SDIST).is_file():
        argv = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            "llama-cpp-python==0.3.36",
            "-d",
            str(cache),
        ]
        fetched = subprocess.run(argv, capture_output=True, text=True)
        if fetched.returncode != 0 or not (cache / SDIST).is_file():
            why = (fetched.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"could not download llama-cpp-python 0.3.36's sdist for its convert_hf_to_gguf.py ({why})")
    return cache / SDIST


@pytest.fixture(scope="module")
def converter(tmp_path_factory) -> Path:
    sdist = llama_cpp_sdist()
    pytest.importorskip("sentencepiece", reason="convert_hf_to_gguf.py imports sentencepiece: pip install -e '.[test]'")
    dest = tmp_path_factory.mktemp("llama.cpp")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(tuple(SDIST_ROOT + p for p in CONVERTER_PARTS))]
        tar.extractall(dest, members=members, filter="data")
    script = dest / SDIST_ROOT / "convert_hf_to_gguf.py"
    assert script.is_file(), "the sdist no longer ships convert_hf_to_gguf.py"
    return script


@pytest.fixture(scope="module")
def baked_llama(tmp_path_factory, smollm2) -> dict:
    """A tiny random Llama with SmolLM2's tokenizer, baked at both sites."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2
    root = tmp_path_factory.mktemp("hf2gguf")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(root / "base")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer / name, root / "base" / name)
    torch.manual_seed(1)
    vectors = VectorSet({(1, "resid_post"): torch.randn(32), (2, "resid_mid"): torch.randn(32)})
    api.fold(str(root / "base"), vectors, root / "baked")
    return {"base": root / "base", "baked": root / "baked", "root": root}


@pytest.fixture(scope="module")
def converted(converter, baked_llama) -> Path:
    """The baked checkpoint converted to a float32 GGUF by llama.cpp's converter, as its README says to run it."""
    out = baked_llama["root"] / "baked.gguf"
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the gguf-py that came with the script
    done = subprocess.run(
        [sys.executable, str(converter), str(baked_llama["baked"]), "--outfile", str(out), "--outtype", "f32"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_biases_keep_their_values_under_llama_cpp_names(converted, baked_llama):
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(converted).tensors}
    with safe_open(baked_llama["baked"] / "model-bake-steering.safetensors", "np") as f:
        assert np.array_equal(tensors["blk.1.ffn_down.bias"], f.get_tensor("model.layers.1.mlp.down_proj.bias"))
        assert np.array_equal(tensors["blk.2.attn_output.bias"], f.get_tensor("model.layers.2.self_attn.o_proj.bias"))
    assert tensors["blk.1.ffn_down.bias"].any() and tensors["blk.2.attn_output.bias"].any()
    # the zero biases the flags switch on are converted too (llama.cpp allocates them when present)
    for name in ("blk.0.ffn_down.bias", "blk.0.ffn_gate.bias", "blk.3.attn_q.bias", "blk.3.attn_output.bias"):
        assert name in tensors and not tensors[name].any(), name


def test_converted_file_runs_the_bake_in_llama_cpp(converted, baked_llama):
    """llama.cpp on the float32 conversion matches the baked checkpoint in transformers, and not the unsteered one."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama-cpp]')")
    from transformers import AutoModelForCausalLM

    from bake.formats.gguf import llamacpp

    ids = [[1, 504, 2734, 1437, 314, 253, 1345], [1, 9519, 30, 1070, 28]]
    llama = llamacpp.logits(converted, ids)
    logits = {}
    for kind in ("baked", "base"):
        model = AutoModelForCausalLM.from_pretrained(baked_llama[kind])
        with torch.inference_mode():
            logits[kind] = [model(torch.tensor([x])).logits[0].numpy() for x in ids]
    baked, base = logits["baked"], logits["base"]
    gap = max(float(np.abs(a - b).max()) for a, b in zip(llama, baked))
    assert gap < 5e-3, gap  # float32 weights; llama.cpp keeps its KV cache in float16 (measured 8e-4)
    assert min(float(np.abs(a - b).max()) for a, b in zip(llama, base)) > 100 * gap
