"""Every family the table says llama.cpp loads, run there: a tiny baked checkpoint at each exact site, converted by
llama.cpp's own convert_hf_to_gguf.py and loaded by llama.cpp (llama-cpp-python), gives transformers' steered
logits (within ATOL) and greedy tokens; the biases map by name.

The converter is the one in the llama-cpp-python 0.3.36 sdist, which vendors llama.cpp
0c1e570 (convert_hf_to_gguf.py, conversion/, gguf-py/). The ``converter`` fixture fetches it once
(``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36``) into ~/.cache/bake-tests, or
skips saying why when PyPI cannot be reached; it needs ``sentencepiece`` (the test extra) even for a
BPE tokenizer, because the Llama converter imports it before looking for a tokenizer.model.
The tiny models (conftest's ``tiny_config``) use SmolLM2's tokenizer: the converter only accepts BPE
tokenizers whose pre-tokenizer it recognises. All conversions run in one converter process.

The multimodal wrappers the column says llama.cpp runs (test_multimodal's tiny LLaVA and Mistral 3, processor files
included) convert the same way, to a GGUF of their language model.
"""

from __future__ import annotations

import json
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
import transformers
from conftest import save_tiny, tiny_config
from safetensors import safe_open
from test_architectures import EXACT
from test_architectures import _id as _case_id
from test_multimodal import CASES as WRAPPER_CASES
from test_multimodal import save_wrapper_config, wrapper_config
from transformers import AutoConfig, AutoModelForCausalLM

from bake import api
from bake.families.hf import FAMILIES, WRAPPED, family_for
from bake.recipe import VerifySpec
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


LLAMA_CPP_VERSION = "0c1e570"  # the llama.cpp vendored by llama-cpp-python 0.3.36: converter and runtime
TESTED = f"tested (llama.cpp {LLAMA_CPP_VERSION})"
# Token ids of SmolLM2's tokenizer; the first is <|im_start|> (1), a BOS llama.cpp leaves as given.
IDS = [[1, 504, 2734, 1437, 314, 253, 1345], [1, 9519, 30, 1070, 28]]
TOKENS = 6
ATOL = 5e-3  # fp32 weights both sides; llama.cpp keeps its KV cache in float16 (measured gaps: see the report)
# Every exact case of test_architectures whose family the table's llama.cpp column says is tested here. gpt-oss is
# saved by transformers unquantized (gate_up_proj interleaved, [experts, in, out]): the converter transposes and
# splits it itself (its MXFP4 path repacks *_blocks/*_scales instead; the biases take the same path in both).
CASES = {_case_id(c): c for c in EXACT if family_for(tiny_config(c[0], **c[1])).llama_cpp.startswith(TESTED)}
# The multimodal wrappers (tests/test_multimodal.py) the column says llama.cpp runs: (wrapper, text model_type, site).
# The converter writes their language model alone.
WRAPPERS = {
    f"{w}-{t}-{site}": (w, t, site)
    for w, t, site, _, module in WRAPPER_CASES
    if not module and family_for(wrapper_config(w, t)).llama_cpp.startswith(TESTED)
}
# Families the converter cannot convert here, baked or not: model_type -> the error it stops with. (GPT-NeoX: it
# reads rotary_pct from transformers' config, which transformers 5 folds into rope_parameters.)
CONVERTER_FAILS = {"gpt_neox": "KeyError: 'rotary_pct'"}
FAILING = {_case_id(c): c for c in EXACT if c[0] in CONVERTER_FAILS and not c[1] and c[2] == "resid_post"}


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory, smollm2_gguf) -> Path:
    """SmolLM2's BPE tokenizer, read from its GGUF (the converter accepts only BPE pre-tokenizers it knows)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).save_pretrained(folder)
    return folder


# What the converter reads that a config.json saved by transformers 5 lacks, written in as the Hub checkpoints
# have it (gpt2's n_ctx, Pythia's rotary_pct); and its Phi-2 writes the MLP width as 4x hidden, as every Phi
# checkpoint has it.
HUB_KEYS = {
    "gpt2": lambda c: {"n_ctx": c.n_positions},
    "gpt_neox": lambda c: {"rotary_pct": c.rope_parameters["partial_rotary_factor"]},
}
CONVERTER_SIZES = {"phi": {"intermediate_size": 128}}


SMOLLM2_TOKENS = {"vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}


def _with_tokenizer(
    model_type: str, overrides: dict, folder: Path, tokenizer: Path, wrapper: str | None = None
) -> Path:
    """conftest's tiny model of ``model_type`` (inside a tiny ``wrapper``: test_multimodal's, its processor files
    included) with SmolLM2's vocabulary and tokenizer files."""
    sizes = {**overrides, **CONVERTER_SIZES.get(model_type, {}), **SMOLLM2_TOKENS}
    if wrapper:
        config = wrapper_config(wrapper, model_type, **sizes)
        config.image_token_index = SMOLLM2_TOKENS["vocab_size"] - 1  # a word of SmolLM2's stands for image positions
        save_wrapper_config(folder, config)
    else:
        config = tiny_config(model_type, **sizes)
        save_tiny(folder, config)
    written = json.loads((folder / "config.json").read_text())
    written.update(HUB_KEYS.get(model_type, lambda c: {})(config.get_text_config()))
    (folder / "config.json").write_text(json.dumps(written, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer / name, folder / name)
    return folder


CONVERT_ALL = """
import importlib.util, json, sys, traceback
script, jobs = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", script)
convert = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert)
for src, out in jobs:
    sys.argv = [script, src, "--outfile", out, "--outtype", "f32"]
    try:
        convert.main()
        error = None
    except SystemExit as e:
        error = None if not e.code else f"exit {e.code}"
    except Exception as e:
        traceback.print_exc()
        error = f"{type(e).__name__}: {e}"
    print("BAKE-CONVERTED " + json.dumps({"src": src, "error": error}), flush=True)
"""


@pytest.fixture(scope="module")
def converted(converter, bpe_tokenizer, tmp_path_factory, one_thread) -> dict[str, dict]:
    """Every case baked (vectors at blocks 1 and 2), then converted to float32 GGUFs by llama.cpp's converter in
    one process, as its README says to run it (``convert_hf_to_gguf.py MODEL --outfile F --outtype f32``)."""
    root = tmp_path_factory.mktemp("hf2gguf")
    runs: dict[str, dict] = {}
    cases = {key: (t, o, site, None) for key, (t, o, site, _) in {**CASES, **FAILING}.items()}
    cases.update({key: (t, {}, site, w) for key, (w, t, site) in WRAPPERS.items()})
    for key, (model_type, overrides, site, wrapper) in cases.items():
        base = _with_tokenizer(model_type, overrides, root / key / "base", bpe_tokenizer, wrapper)
        hidden = AutoConfig.from_pretrained(base).get_text_config().hidden_size
        g = torch.Generator().manual_seed(1)
        vectors = VectorSet({(layer, site): torch.randn(hidden, generator=g) for layer in (1, 2)})
        api.fold(str(base), vectors, root / key / "baked", verify=VerifySpec(prompts=["hello"], tokens=2))
        runs[key] = {"base": base, "baked": root / key / "baked", "gguf": root / key / "baked.gguf", "vectors": vectors}
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the gguf-py that came with the script
    jobs = [[str(r["baked"]), str(r["gguf"])] for r in runs.values()]
    jobs += [[str(runs[key]["base"]), str(runs[key]["base"]) + ".gguf"] for key in FAILING]
    done = subprocess.run(
        [sys.executable, "-c", CONVERT_ALL, str(converter), json.dumps(jobs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
        check=False,
    )  # a crash is reported per case below, with the converter's stderr
    errors = {
        r["src"]: r["error"]
        for r in (
            json.loads(ln.split(" ", 1)[1]) for ln in done.stdout.splitlines() if ln.startswith("BAKE-CONVERTED ")
        )
    }
    for key, run in runs.items():
        for kind in ("baked", "base") if key in FAILING else ("baked",):
            run[f"{kind}_error"] = errors.get(str(run[kind]), f"converter crashed: {done.stderr[-3000:]}")
    return runs


def _load(path: Path):
    """The checkpoint in stock transformers, as its family's users load it (a wrapper with its auto class)."""
    wrapper = family_for(AutoConfig.from_pretrained(path)).wrapper
    auto = getattr(transformers, wrapper.auto_class) if wrapper else AutoModelForCausalLM
    return auto.from_pretrained(path).eval()


def _hf_logits(path: Path) -> list[np.ndarray]:
    model = _load(path)
    with torch.inference_mode():
        return [model(torch.tensor([x])).logits[0].numpy() for x in IDS]


def _hf_greedy(path: Path) -> list[list[int]]:
    """Greedy continuations, stopping at end of sequence as bake.formats.gguf.llamacpp.greedy does."""
    model = _load(path)
    out = []
    for x in IDS:
        ids = torch.tensor([x])
        with torch.inference_mode():
            for _ in range(TOKENS):
                next_id = model(ids).logits[0, -1].argmax()
                if int(next_id) == model.config.get_text_config().eos_token_id:
                    break
                ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        out.append(ids[0, len(x) :].tolist())
    return out


@pytest.mark.parametrize("key", [*CASES, *WRAPPERS])
def test_converted_checkpoint_runs_the_bake_in_llama_cpp(converted, key):
    """llama.cpp on the float32 conversion matches the baked checkpoint in transformers (logits within ATOL,
    greedy tokens equal), and not the unsteered base (a dropped bias fails)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama-cpp]')")
    from bake.formats.gguf import llamacpp

    run = converted[key]
    assert run["baked_error"] is None, f"convert_hf_to_gguf.py failed on the baked checkpoint: {run['baked_error']}"
    llama = llamacpp.logits(run["gguf"], IDS)
    baked, base = _hf_logits(run["baked"]), _hf_logits(run["base"])
    gap = max(float(np.abs(a - b).max()) for a, b in zip(llama, baked))
    steering = min(float(np.abs(a - b).max()) for a, b in zip(baked, base))
    print(f"{key}: llama.cpp vs transformers steered max |dlogit| {gap:.1e}; steering moves them {steering:.2f}")
    assert gap < ATOL, f"llama.cpp differs from transformers' steered model by {gap} (the steering moves {steering})"
    assert steering > 100 * ATOL, "the steering barely changes the logits: the test could not fail"
    assert llamacpp.greedy(run["gguf"], IDS, TOKENS) == _hf_greedy(run["baked"])


@pytest.mark.parametrize("key", list({w: key for key, (w, _, _) in reversed(WRAPPERS.items())}.values()))
def test_wrapper_converts_to_its_language_model_alone(converted, key):
    """A wrapper's GGUF is its language model: every block, none of the vision tower's or projector's tensors
    (llama.cpp keeps those in a separate mmproj file, which ``--mmproj`` does not write for these tiny wrappers: CLIP
    towers are not among its vision models, and Pixtral's needs image tokens that SmolLM2's tokenizer lacks). One
    case per wrapper: reading a GGUF's metadata (SmolLM2's vocabulary) takes seconds."""
    names = [t.name for t in gguf.GGUFReader(converted[key]["gguf"]).tensors]
    assert not [n for n in names if n.startswith(("v.", "mm."))], names
    assert {n.split(".")[1] for n in names if n.startswith("blk.")} == {"0", "1", "2", "3"}, names


@pytest.mark.parametrize("key", FAILING)
def test_converter_fails_on_the_family_baked_or_not(converted, key):
    """What the table says for GPT-NeoX: the converter stops on it with or without the bake (not bake's doing)."""
    want = CONVERTER_FAILS[FAILING[key][0]]
    assert converted[key]["baked_error"] == want and converted[key]["base_error"] == want, converted[key]


# Per family and site: the llama.cpp tensor and the checkpoint's tensor the vector goes into, and the zero biases the
# flags switch on, which the converter must carry too (llama.cpp allocates them when present). gpt-oss's
# down_proj_bias has one row per expert, and every row carries the vector.
GGUF_BIASES = {
    "llama": {
        "resid_post": ("ffn_down.bias", "mlp.down_proj.bias", ("blk.0.ffn_gate.bias", "blk.0.ffn_up.bias")),
        "resid_mid": ("attn_output.bias", "self_attn.o_proj.bias", tuple(f"blk.3.attn_{x}.bias" for x in "qkv")),
    },
    "gpt_oss": {
        "resid_post": ("ffn_down_exps.bias", "mlp.experts.down_proj_bias", ()),
        "resid_mid": ("attn_output.bias", "self_attn.o_proj.bias", ()),
    },
}


def _safetensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint folder, whichever shard holds it."""
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "np") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


@pytest.mark.parametrize("model_type", GGUF_BIASES)
def test_biases_keep_their_values_under_llama_cpp_names(converted, model_type):
    """bake's biases become llama.cpp's bias tensors value for value: the base's bias plus the vector at the steered
    blocks (1, 2), the base's unchanged at the others, and the zero biases the flags switch on are converted too."""
    for site, (gguf_name, hf_name, zero) in GGUF_BIASES[model_type].items():
        run = converted[_case_id((model_type, {}, site, False))]
        tensors = {t.name: t.data for t in gguf.GGUFReader(run["gguf"]).tensors}  # memory-mapped, read on use
        baked, base = _safetensors(run["baked"]), _safetensors(run["base"])
        for layer in range(4):
            name = f"model.layers.{layer}.{hf_name}"
            got = tensors[f"blk.{layer}.{gguf_name}"]
            assert np.array_equal(got, baked[name]), name
            vector = run["vectors"].vectors.get((layer, site), torch.zeros(got.shape[-1])).numpy()
            assert np.allclose(got - base.get(name, 0), vector, rtol=0, atol=1e-6), name
        for name in zero:
            assert name in tensors and not tensors[name].any(), name


def test_table_says_what_llama_cpp_ran():
    """The llama.cpp column says "tested" exactly for the families run here: no family claims llama.cpp loads
    it from reading the source alone."""
    ran = {family_for(tiny_config(c[0], **c[1])).name for c in CASES.values()}
    ran |= {family_for(wrapper_config(w, t)).name for w, t, _ in WRAPPERS.values()}
    failing = {family_for(tiny_config(c[0], **c[1])).name for c in FAILING.values()}
    for family in FAMILIES + WRAPPED:
        if family.name in ran:
            continue
        if family.name in failing:
            assert "convert_hf_to_gguf.py" in family.llama_cpp and "fails" in family.llama_cpp, family.llama_cpp
        assert not family.llama_cpp.startswith("loads it"), f"{family.name}: {family.llama_cpp!r} but no test runs it"
