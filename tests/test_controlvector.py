"""Importing repeng / llama.cpp control-vector GGUFs (``bake import-cv``) and baking them.

The files are written here with ``gguf.GGUFWriter`` in the layout repeng's
``export_gguf`` and llama-cvector-generator use. The layer convention is checked
against an independent re-implementation of what llama.cpp does with such a file
(common_control_vector_load + llama_adapter_cvec, see bake/formats/gguf/controlvector.py), not
against bake's own hooks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from conftest import tree_digest

from bake.cli import main
from bake.errors import BakeError
from bake.formats.gguf.controlvector import read_control_vector
from bake.vectorfile import VectorSet

HIDDEN = 32
N_LAYER = 4
PROMPTS = ["the happy dog is very happy today", "tell me about your day"]


def invoke(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, (result.output, result.exception)
    assert "Traceback" not in result.output


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [ln for ln in result.output.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was written"
    if out.parent.exists():
        assert sorted(p.name for p in out.parent.iterdir()) == [], "files left beside the output"


def write_cv(
    path: Path,
    directions: dict,
    *,
    arch: str = "controlvector",
    model_hint: str | None = "llama",
    layer_count: int | None = None,
) -> Path:
    """A control-vector GGUF as repeng's export_gguf writes it: {name or N: array}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    if model_hint is not None:
        writer.add_string(f"{arch}.model_hint", model_hint)
    writer.add_uint32(f"{arch}.layer_count", len(directions) if layer_count is None else layer_count)
    for key, value in directions.items():
        writer.add_tensor(key if isinstance(key, str) else f"direction.{key}", np.asarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_directions(layers, seed: int, size: int = HIDDEN, scale: float = 1.0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (scale * rng.standard_normal(size)).astype(np.float32) for n in layers}


# --- what llama.cpp does with the files, re-implemented from its source ------------------------------


def llamacpp_layer_tensors(files: list[tuple[Path, float]], n_layer: int) -> dict[int, torch.Tensor]:
    """{il: vector added to block il's output}: common_control_vector_load_one / _load (flat buffer,
    direction.N at offset n_embd*(N-1), ``dst += src * strength``, files summed), then
    llama_adapter_cvec::apply (tensors[il] = buffer[n_embd*(il-1):], il = 1..n_layer-1) and tensor_for with
    the default --control-vector-layer-range 1..n_layer."""
    n_embd, buffer = -1, np.zeros(0, dtype=np.float32)
    for path, strength in files:
        reader = gguf.GGUFReader(str(path))
        for t in reader.tensors:
            n = int(t.name.split(".", 1)[1])
            src = np.asarray(t.data, dtype=np.float32).reshape(-1)
            n_embd = src.size
            if buffer.size < n_embd * n:
                buffer = np.concatenate([buffer, np.zeros(n_embd * n - buffer.size, dtype=np.float32)])
            buffer[n_embd * (n - 1) : n_embd * n] += src * np.float32(strength)
    layer_start, layer_end = 1, n_layer
    out = {}
    for il in range(1, n_layer):
        off = n_embd * (il - 1)
        if off + n_embd <= buffer.size and layer_start <= il <= layer_end:
            out[il] = torch.from_numpy(buffer[off : off + n_embd].copy())
    return out


def blocks(model) -> torch.nn.ModuleList:
    return model.model.layers if hasattr(model, "model") else model.transformer.h


def logits_with_block_output_hooks(model, tokenizer, additions: dict[int, torch.Tensor]) -> torch.Tensor:
    """Logits with ``additions[il]`` added to the output of block il (llama.cpp's ``l_out``)."""

    def adder(v):
        def hook(_module, _inputs, output):
            if isinstance(output, tuple):
                return (output[0] + v,) + tuple(output[1:])
            return output + v

        return hook

    handles = [blocks(model)[il].register_forward_hook(adder(v)) for il, v in additions.items()]
    try:
        return logits(model, tokenizer)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def logits(model, tokenizer) -> torch.Tensor:
    return torch.cat([model(**tokenizer(p, return_tensors="pt")).logits[0] for p in PROMPTS])


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


# --- (a) direction.N -> layer.N, scaled -------------------------------------------------------------


def test_import_maps_direction_n_to_layer_n_scaled(tmp_path):
    dirs = random_directions([1, 3], seed=1)
    cv = write_cv(tmp_path / "happy.gguf", dirs, model_hint="llama")
    out = tmp_path / "happy.safetensors"
    result = invoke("import-cv", cv, "-o", out, "--scale", "0.5")
    assert_ok(result)
    assert "layer.1" in result.output and "layer.3" in result.output and f"wrote {out}" in result.output

    vs = VectorSet.load(out)
    assert set(vs.vectors) == {(1, "resid_post"), (3, "resid_post")}
    for n, d in dirs.items():
        assert torch.equal(vs.vectors[(n, "resid_post")], torch.from_numpy(d * np.float32(0.5))), n
    [info] = vs.meta["control_vectors"]
    assert info["file"] == "happy.gguf"
    assert info["sha256"] == hashlib.sha256(cv.read_bytes()).hexdigest()
    assert info["model_hint"] == "llama" and info["scale"] == 0.5 and info["layer_count"] == 2
    assert info["directions"] == [1, 3]
    assert vs.meta["model_hint"] == "llama" and vs.meta["hidden_size"] == HIDDEN
    assert "direction.N -> layer.N" in vs.meta["convention"]


def test_api_default_scale_and_negative_scale(tmp_path):
    dirs = random_directions([2], seed=2)
    cv = write_cv(tmp_path / "a.gguf", dirs)
    assert torch.equal(read_control_vector(cv).vectors[(2, "resid_post")], torch.from_numpy(dirs[2]))
    out = tmp_path / "neg.safetensors"
    assert_ok(invoke("import-cv", cv, "-o", out, "--scale", "-2"))
    assert torch.equal(VectorSet.load(out).vectors[(2, "resid_post")], torch.from_numpy(dirs[2] * np.float32(-2)))


def test_f16_and_trailing_unit_dimension_are_accepted(tmp_path):
    """ggml counts dimensions like n_dims (a [32, 1] tensor is 1-D); F16 is widened to float32."""
    d = random_directions([1], seed=3)[1]
    cv = write_cv(tmp_path / "a.gguf", {1: d.astype(np.float16), 2: d.reshape(1, HIDDEN)})
    vs = read_control_vector(cv)
    assert torch.equal(vs.vectors[(1, "resid_post")], torch.from_numpy(d.astype(np.float16).astype(np.float32)))
    assert torch.equal(vs.vectors[(2, "resid_post")], torch.from_numpy(d))


# --- (b) the convention, behaviourally: baked checkpoint == llama.cpp's application ---------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_baked_control_vector_matches_llamacpp_application(tiny_models, tmp_path, model_type):
    cv = write_cv(tmp_path / "cv.gguf", random_directions([1, 2], seed=4, scale=2.0), model_hint=model_type)
    vec = tmp_path / "cv.safetensors"
    assert_ok(invoke("import-cv", cv, "-o", vec, "--scale", "0.75"))
    out = tmp_path / "baked"
    assert_ok(invoke("fold", tiny_models[model_type], vec, "-o", out))

    baked, tokenizer = load(out)
    base, _ = load(tiny_models[model_type])
    reference = llamacpp_layer_tensors([(cv, 0.75)], N_LAYER)
    assert sorted(reference) == [1, 2]
    expected = logits_with_block_output_hooks(base, tokenizer, reference)
    got = logits(baked, tokenizer)
    assert (got - expected).abs().max().item() < 1e-5

    # The check can fail: the steering is strong, and one block off (direction.N read as hidden_states[N],
    # the output of block N-1) gives different logits.
    assert (got - logits(base, tokenizer)).abs().max().item() > 0.1
    shifted = logits_with_block_output_hooks(base, tokenizer, {il - 1: v for il, v in reference.items()})
    assert (got - shifted).abs().max().item() > 0.1


# --- (c) several files add ---------------------------------------------------------------------------


def test_two_files_add_with_per_file_scales(tmp_path, tiny_models):
    a = random_directions([1, 2], seed=5)
    b = random_directions([2, 3], seed=6)
    fa, fb = write_cv(tmp_path / "a.gguf", a), write_cv(tmp_path / "b.gguf", b)
    out = tmp_path / "ab.safetensors"
    assert_ok(invoke("import-cv", fa, fb, "-o", out, "--scale", "1", "--scale", "-0.5"))
    vs = VectorSet.load(out)
    assert set(vs.vectors) == {(1, "resid_post"), (2, "resid_post"), (3, "resid_post")}
    torch.testing.assert_close(vs.vectors[(1, "resid_post")], torch.from_numpy(a[1]), rtol=0, atol=1e-6)
    torch.testing.assert_close(vs.vectors[(2, "resid_post")], torch.from_numpy(a[2] - 0.5 * b[2]), rtol=0, atol=1e-6)
    torch.testing.assert_close(vs.vectors[(3, "resid_post")], torch.from_numpy(-0.5 * b[3]), rtol=0, atol=1e-6)
    assert [f["file"] for f in vs.meta["control_vectors"]] == ["a.gguf", "b.gguf"]
    assert [f["scale"] for f in vs.meta["control_vectors"]] == [1.0, -0.5]

    # One --scale applies to every file; the result equals llama.cpp's sum of both files.
    both = tmp_path / "both.safetensors"
    assert_ok(invoke("import-cv", fa, fb, "-o", both, "--scale", "0.5"))
    reference = llamacpp_layer_tensors([(fa, 0.5), (fb, 0.5)], N_LAYER)
    got = VectorSet.load(both).vectors
    assert sorted(layer for layer, _ in got) == sorted(reference)
    for il, v in reference.items():
        torch.testing.assert_close(got[(il, "resid_post")], v, rtol=0, atol=1e-6)


def test_same_layer_twice_in_one_file_adds(tmp_path):
    """llama.cpp: 'allows multiple directions for same layer in same file' (direction.2 and direction.02)."""
    d = random_directions([1, 2], seed=7)
    cv = write_cv(tmp_path / "a.gguf", {"direction.2": d[1], "direction.02": d[2]})
    torch.testing.assert_close(read_control_vector(cv).vectors[(2, "resid_post")], torch.from_numpy(d[1] + d[2]))


# --- (d) bad input: one line, nothing written --------------------------------------------------------


def _bad_file(case: str, tmp_path: Path) -> tuple[Path, list[str]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    d = random_directions([1], seed=8)[1]
    if case == "model gguf":
        return write_cv(tmp_path / "model.gguf", {"token_embd.weight": d}, arch="llama"), [
            "'llama'",
            "not a control vector",
        ]
    if case == "not gguf":
        path = tmp_path / "notes.gguf"
        path.write_text("hello, not a gguf\n" * 10)
        return path, ["not a readable GGUF"]
    if case == "missing":
        return tmp_path / "nope.gguf", ["nope.gguf", "not found"]
    if case == "layer 0":
        return write_cv(tmp_path / "zero.gguf", {0: d, 1: d}), ["direction.0", "llama.cpp refuses"]
    if case == "bad name":
        return write_cv(tmp_path / "name.gguf", {"direction.x": d}), ["'direction.x'", "direction.N"]
    if case == "other tensor":
        return write_cv(tmp_path / "other.gguf", {1: d, "output.weight": d}), ["'output.weight'"]
    if case == "2-D":
        return write_cv(tmp_path / "mat.gguf", {1: np.ones((2, HIDDEN), np.float32)}), ["direction.1", "1-D"]
    if case == "not float":
        return write_cv(tmp_path / "int.gguf", {1: np.ones(HIDDEN, np.int32)}), ["direction.1", "I32"]
    if case == "sizes differ":
        return write_cv(tmp_path / "sizes.gguf", {1: d, 2: d[:16]}), ["direction.2", "16 values"]
    if case == "nan":
        bad = d.copy()
        bad[3] = np.nan
        return write_cv(tmp_path / "nan.gguf", {1: bad}), ["direction.1", "NaN"]
    if case == "empty":
        return write_cv(tmp_path / "empty.gguf", {}), ["no direction.N"]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "model gguf",
        "not gguf",
        "missing",
        "layer 0",
        "bad name",
        "other tensor",
        "2-D",
        "not float",
        "sizes differ",
        "nan",
        "empty",
    ],
)
def test_bad_control_vector_files(tmp_path, case):
    path, words = _bad_file(case, tmp_path / "in")
    out = tmp_path / "out" / "v.safetensors"
    line = one_line_error(invoke("import-cv", path, "-o", out))
    for w in words:
        assert w in line, (w, line)
    assert_nothing_written(out)
    with pytest.raises(BakeError):
        read_control_vector(path)


def test_files_of_different_hidden_sizes_do_not_add(tmp_path):
    fa = write_cv(tmp_path / "a.gguf", random_directions([1], seed=9))
    fb = write_cv(tmp_path / "b.gguf", random_directions([1], seed=9, size=16))
    out = tmp_path / "out" / "v.safetensors"
    line = one_line_error(invoke("import-cv", fa, fb, "-o", out))
    assert "size 16" in line and "a.gguf" in line
    assert_nothing_written(out)


@pytest.mark.parametrize(
    "scales, words",
    [(["1", "2", "3"], ["3 scales for 2 files"]), (["0"], ["scale 0", "zero"]), (["inf"], ["non-finite"])],
)
def test_bad_scales(tmp_path, scales, words):
    fa = write_cv(tmp_path / "a.gguf", random_directions([1], seed=10))
    fb = write_cv(tmp_path / "b.gguf", random_directions([1], seed=11))
    out = tmp_path / "out" / "v.safetensors"
    line = one_line_error(invoke("import-cv", fa, fb, "-o", out, *[a for s in scales for a in ("--scale", s)]))
    for w in words:
        assert w in line, (w, line)
    assert_nothing_written(out)


def test_existing_output_needs_force(tmp_path):
    cv = write_cv(tmp_path / "a.gguf", random_directions([1], seed=12))
    out = tmp_path / "v.safetensors"
    out.write_bytes(b"keep me")
    line = one_line_error(invoke("import-cv", cv, "-o", out))
    assert "already exists" in line and "--force" in line
    assert out.read_bytes() == b"keep me"
    # --force replaces only a vector file bake wrote, never someone else's file.
    assert "not an output bake wrote" in one_line_error(invoke("import-cv", cv, "-o", out, "--force"))
    assert out.read_bytes() == b"keep me"
    out.unlink()
    VectorSet({(3, "resid_post"): torch.ones(32)}).save(out)
    assert_ok(invoke("import-cv", cv, "-o", out, "--force"))
    assert set(VectorSet.load(out).vectors) == {(1, "resid_post")}


@pytest.mark.parametrize("case", ["layer out of range", "hidden size"])
def test_fold_refuses_vectors_that_do_not_fit_the_model(tiny_models, tmp_path, case):
    """direction.4 on a 4-block model (llama.cpp would drop it silently) and a 16-wide vector for a 32-wide model:
    import succeeds (the file alone cannot know), fold refuses in one line and writes nothing."""
    if case == "layer out of range":
        dirs, words = random_directions([1, N_LAYER], seed=13), ["layer 4", "0..3"]
    else:
        dirs, words = random_directions([1], seed=13, size=16), ["size 16", "hidden size is 32"]
    vec = tmp_path / "v.safetensors"
    assert_ok(invoke("import-cv", write_cv(tmp_path / "cv.gguf", dirs), "-o", vec))
    before = tree_digest(tiny_models["llama"])
    out = tmp_path / "o" / "baked"
    line = one_line_error(invoke("fold", tiny_models["llama"], vec, "-o", out))
    for w in words:
        assert w in line, (w, line)
    assert_nothing_written(out)
    assert tree_digest(tiny_models["llama"]) == before


def test_import_cv_help_has_an_example():
    result = invoke("import-cv", "--help")
    assert_ok(result)
    assert "Example" in result.output and "bake fold" in result.output


def test_manifest_of_a_baked_control_vector_keeps_its_provenance(tiny_models, tmp_path):
    cv = write_cv(tmp_path / "cv.gguf", random_directions([2], seed=14))
    vec = tmp_path / "v.safetensors"
    assert_ok(invoke("import-cv", cv, "-o", vec))
    out = tmp_path / "baked"
    assert_ok(invoke("fold", tiny_models["llama"], vec, "-o", out))
    manifest = json.loads((out / "bake.json").read_text())
    assert manifest["vectors"]["control_vectors"][0]["sha256"] == hashlib.sha256(cv.read_bytes()).hexdigest()
    assert [b["vector"] for b in manifest["fold"]["biases"]] == ["layer.2"]
    assert_ok(invoke("inspect", out))
