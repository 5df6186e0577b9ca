"""The ``bake`` command end to end, through click's CliRunner, on tiny models saved on disk."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from conftest import make_tokenizer, save_tiny, tiny_config, tree_digest
from safetensors.torch import save_file

from bake.cli import main
from bake.vectorfile import VectorSet

PROMPT = "tell me about your day"
TARGET = ["the happy dog is very happy today", "what a wonderful bright day", "i love the sun and the tea"]
COMMANDS = ["run", "vector", "fold", "verify", "inspect", "generate"]


def invoke(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def write_recipe(
    folder: Path,
    model: Path,
    *,
    name: str = "r.yaml",
    layer: int = 1,
    target: str = json.dumps(TARGET),
    extra: str = "",
    entry_extra: str = "",
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = (
        f"model: {model}\n"
        "background: {sample: {sequences: 8, tokens: 12}}\n"
        f"preview: {{prompts: [{json.dumps(PROMPT)}], tokens: 5}}\n"
        "verify: {tokens: 5}\n"
        f"{extra}"
        "steering:\n"
        "  - name: happy\n"
        f"    layer: {layer}\n"
        f"    target: {target}\n"
        f"{entry_extra}"
    )
    path = folder / name
    path.write_text(text)
    return path


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, (result.output, result.exception)
    assert "Traceback" not in result.output


def assert_one_line_error(result: Result) -> str:
    """Exit code != 0 and exactly one line of output, 'Error: ...'; returns that line.

    click's own usage errors (bad option values) put its usage and help hint above that line.
    """
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln and not ln.startswith(("Usage: ", "Try '"))]
    assert len(lines) == 1, f"expected one line, got: {result.output!r}"
    assert lines[0].startswith("Error: "), lines[0]
    return lines[0]


def assert_nothing_written(out: Path) -> None:
    """No output, and nothing else beside it either (no stray staging folders or temporary files)."""
    assert not out.exists(), f"{out} was written"
    stray = sorted(p.name for p in out.parent.glob(".*tmp*")) if out.parent.exists() else []
    assert not stray, f"stray temporary files beside the output: {stray}"
    leftovers = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    assert not leftovers, f"files left beside the output: {leftovers}"


def front_matter(readme: str) -> dict:
    m = re.match(r"\A---\n(.*?)\n---\n", readme, re.S)
    assert m, "README.md has no YAML front-matter"
    return yaml.safe_load(m[1])


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {
        k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict().items()
    }


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bigcode_model(tmp_path_factory) -> Path:
    """A tiny model of a family bake does not know at all."""
    from transformers import GPTBigCodeConfig

    tok = make_tokenizer()
    config = GPTBigCodeConfig(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=4,
        n_head=4,
        n_positions=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return save_tiny(tmp_path_factory.mktemp("bigcode") / "bigcode", config)


@pytest.fixture(scope="module")
def gemma2_model(tmp_path_factory) -> Path:
    """A tiny model of a family with no stock bias slot (post-norms around every sublayer)."""
    return save_tiny(tmp_path_factory.mktemp("gemma2") / "gemma2", tiny_config("gemma2"))


# --- bake run -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type,base_model_id", [("llama", None), ("gpt2", "openai-community/gpt2")])
def test_run_writes_a_verified_checkpoint(tiny_models, tmp_path, model_type, base_model_id):
    src = tiny_models[model_type]
    before = tree_digest(src)
    extra = f"base_model_id: {base_model_id}\n" if base_model_id else ""
    recipe = write_recipe(tmp_path, src, extra=extra)
    out = tmp_path / "outs" / "baked"

    result = invoke("run", recipe, "-o", out)
    assert_ok(result)

    for name in ("config.json", "bake.json", "README.md", "bake/vectors.safetensors"):
        assert (out / name).is_file(), name
    assert tree_digest(src) == before, "the source model was modified"
    assert sorted(p.name for p in out.parent.iterdir()) == ["baked"], "stray files beside the output"

    # Printed: the vector table, the verification line, base vs steered preview, where it wrote.
    manifest = json.loads((out / "bake.json").read_text())
    assert "verification PASSED" in result.output
    assert re.search(r"^happy\s+1\s+resid_post\s+mean-centred", result.output, re.M)
    assert f"> {PROMPT}" in result.output
    assert re.search(r"^base\s+\| steered$", result.output, re.M)
    [preview] = manifest["preview"]
    assert preview["prompt"] == PROMPT
    assert preview["base"] in result.output and preview["steered"] in result.output
    assert f"wrote {out}" in result.output

    # The manifest: recipe verbatim, verification passed, provenance.
    assert manifest["recipe"]["text"] == recipe.read_text()
    assert manifest["verification"]["passed"] is True
    assert manifest["base"]["base_model_id"] == base_model_id
    [entry] = manifest["vectors"]["entries"]
    assert (entry["name"], entry["layer"], entry["site"], entry["method"]) == ("happy", 1, "resid_post", "mean-centred")
    assert entry["counts"]["target"] == {"texts": 3, "tokens": sum(len(t.split()) for t in TARGET)}

    # The model card: Hub front-matter with base_model only when given.
    meta = front_matter((out / "README.md").read_text())
    assert {"steering", "bake"} <= set(meta["tags"])
    assert meta["library_name"] == "transformers"
    if base_model_id:
        assert meta["base_model"] == base_model_id
    else:
        assert "base_model" not in meta

    # The vector file reloads, and the checkpoint carries exactly it as a bias, nothing else changed.
    vectors = VectorSet.load(out / "bake" / "vectors.safetensors")
    assert list(vectors.vectors) == [(1, "resid_post")]
    v = vectors.vectors[(1, "resid_post")]
    assert v.shape == (32,) and torch.isfinite(v).all() and float(v.norm()) > 0
    assert entry["norm"] == pytest.approx(float(v.norm()), rel=1e-5)
    [bias] = manifest["fold"]["biases"]
    base_sd, baked_sd = state_dict(src), state_dict(out)
    torch.testing.assert_close(baked_sd[bias["tensor"]], base_sd.get(bias["tensor"], torch.zeros(32)) + v)
    for name, t in base_sd.items():
        if name != bias["tensor"]:
            torch.testing.assert_close(baked_sd[name], t, rtol=0, atol=0)


def test_run_output_from_recipe_relative_to_recipe(tiny_models, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "recipes", tiny_models["llama"], extra="output: ../outs/from-recipe\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert_ok(invoke("run", recipe))
    assert (tmp_path / "outs" / "from-recipe" / "bake.json").is_file()
    assert not any((tmp_path / "elsewhere").iterdir())


# --- vector, fold, verify, inspect, generate ----------------------------------------------------------


def test_vector_fold_verify_inspect_generate(tiny_models, tmp_path):
    src = tiny_models["llama"]
    before = tree_digest(src)
    recipe = write_recipe(tmp_path, src)
    vec = tmp_path / "vectors" / "happy.safetensors"

    result = invoke("vector", recipe, "-o", vec)
    assert_ok(result)
    assert re.search(r"^happy\s+1\s+resid_post", result.output, re.M) and f"wrote {vec}" in result.output
    vectors = VectorSet.load(vec)
    assert list(vectors.vectors) == [(1, "resid_post")] and vectors.hidden_size == 32
    assert vectors.meta["entries"][0]["name"] == "happy"
    assert [p.name for p in vec.parent.iterdir()] == ["happy.safetensors"], "temporary file left beside the vector file"

    # An existing vector file is not replaced without --force.
    stamp = vec.read_bytes()
    err = assert_one_line_error(invoke("vector", recipe, "-o", vec))
    assert "already exists" in err and "--force" in err
    assert vec.read_bytes() == stamp

    out = tmp_path / "outs" / "baked"
    result = invoke("fold", src, vec, "-o", out)
    assert_ok(result)
    assert "verification PASSED" in result.output and f"wrote {out}" in result.output
    for name in ("config.json", "bake.json", "README.md", "bake/vectors.safetensors"):
        assert (out / name).is_file(), name
    shipped = VectorSet.load(out / "bake" / "vectors.safetensors")
    torch.testing.assert_close(shipped.vectors[(1, "resid_post")], vectors.vectors[(1, "resid_post")], rtol=0, atol=0)
    assert "base_model" not in front_matter((out / "README.md").read_text())

    result = invoke("verify", src, out, vec)
    assert_ok(result)
    assert result.output.strip().splitlines()[-1].startswith("verification PASSED")

    # verify can fail: the checkpoint does not match other vectors.
    wrong = tmp_path / "vectors" / "wrong.safetensors"
    VectorSet({(1, "resid_post"): 3 * vectors.vectors[(1, "resid_post")]}).save(wrong)
    result = invoke("verify", src, out, wrong)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().startswith("verification FAILED")

    result = invoke("inspect", out)
    assert_ok(result)
    assert re.search(r"^happy\s+1\s+resid_post", result.output, re.M)
    assert "layer.1 -> model.layers.1.mlp.down_proj.bias" in result.output
    assert "verification PASSED" in result.output

    result = invoke("inspect", out, "--json")
    assert_ok(result)
    verdict = json.loads(result.output)
    assert verdict["matches_manifest"] is True
    manifest = verdict["manifest"]
    assert manifest == json.loads((out / "bake.json").read_text())
    assert manifest["vectors"]["entries"][0]["name"] == "happy"
    assert manifest["fold"]["biases"][0]["tensor"] == "model.layers.1.mlp.down_proj.bias"

    alone = invoke("generate", out, "tell me", "--tokens", 3)
    assert_ok(alone)
    steered = alone.output.strip()
    assert 1 <= len(steered.split()) <= 3  # word-level tokenizer: one word per token
    base = invoke("generate", src, "tell me", "--tokens", 3)
    assert_ok(base)
    result = invoke("generate", out, "tell me", "--tokens", 3, "--compare", src)
    assert_ok(result)
    lines = result.output.splitlines()
    assert lines[0] == "> tell me"
    assert re.match(rf"^{re.escape(str(src))}\s+\| {re.escape(str(out))}$", lines[1])
    assert re.match(rf"^{re.escape(base.output.strip())}\s+\| {re.escape(steered)}$", lines[2])

    assert tree_digest(src) == before


def test_fold_base_model_id_goes_to_the_card(tiny_models, tmp_path):
    vec = VectorSet({(2, "resid_post"): torch.linspace(-1, 1, 32)}).save(tmp_path / "v.safetensors")
    out = tmp_path / "out"
    assert_ok(invoke("fold", tiny_models["gpt2"], vec, "-o", out, "--base-model-id", "openai-community/gpt2"))
    assert front_matter((out / "README.md").read_text())["base_model"] == "openai-community/gpt2"
    assert json.loads((out / "bake.json").read_text())["base"]["base_model_id"] == "openai-community/gpt2"


@pytest.mark.parametrize("command", [None] + COMMANDS)
def test_help(command):
    result = invoke(*([command] if command else []), "--help")
    assert_ok(result)
    assert "Example" in result.output and "Usage:" in result.output


# --- bad input: one line, nothing written, source untouched ------------------------------------------


def _recipe_case(case: str, tmp_path: Path, models: dict[str, Path]) -> tuple[Path, Path, list[str]]:
    """(recipe path, model used, words the error must contain) for each bad recipe."""
    llama = models["llama"]
    data = tmp_path / "data"
    data.mkdir()
    if case == "missing recipe":
        return tmp_path / "nope.yaml", llama, ["nope.yaml", "not found"]
    if case == "missing data file":
        return write_recipe(tmp_path, llama, target="data/missing.txt"), llama, ["missing.txt", "not found", "target"]
    if case == "invalid yaml":
        path = tmp_path / "r.yaml"
        path.write_text(f"model: {llama}\nsteering: [\n  - {{name: a\n")
        return path, llama, ["not valid YAML"]
    if case == "unknown field":
        return write_recipe(tmp_path, llama, entry_extra="    layr: 2\n"), llama, ["steering.0.layr", "unknown field"]
    if case == "unknown top-level field":
        return write_recipe(tmp_path, llama, extra="dtpye: float32\n"), llama, ["dtpye", "unknown field"]
    if case == "unknown method":
        return write_recipe(tmp_path, llama, entry_extra="    method: mean-centered\n"), llama, ["steering.0.method"]
    if case == "empty target file":
        (data / "empty.txt").write_text("\n\n")
        return write_recipe(tmp_path, llama, target="data/empty.txt"), llama, ["target", "no tokens"]
    if case == "target of unknown words":
        return write_recipe(tmp_path, llama, target='["xyzzy plugh"]'), llama, ["target", "no tokens"]
    if case == "one-word target without bos":
        return write_recipe(tmp_path, models["nobos"], target='["happy"]'), models["nobos"], ["target", "no tokens"]
    if case == "layer 4":
        return write_recipe(tmp_path, llama, layer=4), llama, ["steering.0.layer", "4", "0..3"]
    if case == "layer 99":
        return write_recipe(tmp_path, models["gpt2"], layer=99), models["gpt2"], ["steering.0.layer", "99", "0..3"]
    if case == "negative layer":
        return write_recipe(tmp_path, llama, layer=-1), llama, ["steering.0.layer"]
    if case == "unsupported architecture":
        return write_recipe(tmp_path, models["bigcode"]), models["bigcode"], ["gpt_bigcode", "gpt2", "llama"]
    raise ValueError(case)


RECIPE_CASES = [
    "missing recipe",
    "missing data file",
    "invalid yaml",
    "unknown field",
    "unknown top-level field",
    "unknown method",
    "empty target file",
    "target of unknown words",
    "one-word target without bos",
    "layer 4",
    "layer 99",
    "negative layer",
    "unsupported architecture",
]


@pytest.mark.parametrize("command", ["run", "vector"])
@pytest.mark.parametrize("case", RECIPE_CASES)
def test_bad_recipe_is_refused(tiny_models, bigcode_model, tiny_no_bos, tmp_path, case, command):
    models = {**tiny_models, "bigcode": bigcode_model, "nobos": tiny_no_bos}
    recipe, model, words = _recipe_case(case, tmp_path, models)
    before = tree_digest(model)
    out = tmp_path / "outs" / ("baked" if command == "run" else "v.safetensors")

    err = assert_one_line_error(invoke(command, recipe, "-o", out))
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    assert_nothing_written(out)
    assert tree_digest(model) == before


def test_run_without_output_is_refused(tiny_models, tmp_path):
    recipe = write_recipe(tmp_path, tiny_models["llama"])
    before = sorted(p.name for p in tmp_path.iterdir())
    err = assert_one_line_error(invoke("run", recipe))
    assert "output" in err and "-o" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("command", ["run", "fold"])
def test_existing_output_needs_force(tiny_models, tmp_path, command):
    src = tiny_models["gpt2"]
    before = tree_digest(src)
    recipe = write_recipe(tmp_path, src)
    vec = VectorSet({(1, "resid_post"): torch.linspace(-1, 1, 32)}).save(tmp_path / "v.safetensors")
    args = ("run", recipe) if command == "run" else ("fold", src, vec)
    out = tmp_path / "outs" / "baked"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    existing = tree_digest(out)

    err = assert_one_line_error(invoke(*args, "-o", out))
    assert "already exists" in err and "--force" in err
    assert tree_digest(out) == existing
    assert sorted(p.name for p in out.parent.iterdir()) == ["baked"]

    # --force replaces only an output bake wrote (one with a bake.json), never someone else's folder.
    assert "not an output bake wrote" in assert_one_line_error(invoke(*args, "-o", out, "--force"))
    assert tree_digest(out) == existing
    shutil.rmtree(out)
    assert_ok(invoke(*args, "-o", out))
    (out / "keep.txt").write_text("mine")
    existing = tree_digest(out)

    # --force with input that fails leaves the existing folder as it was.
    bad = write_recipe(tmp_path, src, name="bad.yaml", layer=99)
    bad_vec = VectorSet({(9, "resid_post"): torch.ones(32)}).save(tmp_path / "bad.safetensors")
    bad_args = ("run", bad) if command == "run" else ("fold", src, bad_vec)
    assert "0..3" in assert_one_line_error(invoke(*bad_args, "-o", out, "--force"))
    assert tree_digest(out) == existing
    assert sorted(p.name for p in out.parent.iterdir()) == ["baked"]

    # --force replaces it.
    assert_ok(invoke(*args, "-o", out, "--force"))
    assert not (out / "keep.txt").exists()
    assert (out / "config.json").is_file() and (out / "bake.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["baked"]
    assert tree_digest(src) == before


def _bad_vector(case: str, folder: Path) -> tuple[Path, list[str]]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{case.replace(' ', '-')}.safetensors"
    if case == "hidden size 16":
        VectorSet({(1, "resid_post"): torch.ones(16)}).save(path)
        return path, ["16", "32", "hidden size"]
    if case == "nan":
        save_file({"layer.1": torch.tensor([1.0] * 31 + [float("nan")])}, path)
        return path, ["NaN", "layer.1"]
    if case == "inf":
        save_file({"layer.2.mid": torch.tensor([float("-inf")] + [0.0] * 31)}, path)
        return path, ["inf", "layer.2.mid"]
    if case == "layer out of range":
        VectorSet({(4, "resid_post"): torch.ones(32)}).save(path)
        return path, ["layer 4", "0..3"]
    if case == "missing":
        return folder / "nope.safetensors", ["nope.safetensors", "not found"]
    if case == "not safetensors":
        path.write_text("hello")
        return path, ["safetensors"]
    if case == "bad tensor name":
        save_file({"layers.1": torch.ones(32)}, path)
        return path, ["layers.1"]
    raise ValueError(case)


VECTOR_CASES = ["hidden size 16", "nan", "inf", "layer out of range", "missing", "not safetensors", "bad tensor name"]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("case", VECTOR_CASES)
def test_fold_bad_vector_file_is_refused(tiny_models, tmp_path, case, model_type):
    src = tiny_models[model_type]
    before = tree_digest(src)
    vec, words = _bad_vector(case, tmp_path / "vectors")
    out = tmp_path / "outs" / "baked"
    err = assert_one_line_error(invoke("fold", src, vec, "-o", out))
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    assert_nothing_written(out)
    assert tree_digest(src) == before


@pytest.mark.parametrize(
    "model,words",
    [
        ("bigcode", ["'gpt_bigcode'", "gpt2", "llama"]),
        ("gemma2", ["Gemma 2", "no exact bias slot", "--allow-remote-code"]),
    ],
)
def test_fold_into_unsupported_architecture_is_refused(bigcode_model, gemma2_model, tmp_path, model, words):
    src = {"bigcode": bigcode_model, "gemma2": gemma2_model}[model]
    before = tree_digest(src)
    vec = VectorSet({(1, "resid_post"): torch.ones(32)}).save(tmp_path / "v.safetensors")
    out = tmp_path / "outs" / "baked"
    err = assert_one_line_error(invoke("fold", src, vec, "-o", out))
    for word in words:
        assert word in err, err
    assert_nothing_written(out)
    assert tree_digest(src) == before


def test_run_on_a_family_without_slot_is_refused_before_any_work(gemma2_model, tmp_path):
    """The refusal comes before collecting anything, and names the way out."""
    recipe = write_recipe(tmp_path, gemma2_model)
    out = tmp_path / "outs" / "baked"
    err = assert_one_line_error(invoke("run", recipe, "-o", out))
    assert "Gemma 2" in err and "--allow-remote-code" in err
    assert_nothing_written(out)


def test_fold_missing_model_is_refused(tmp_path):
    vec = VectorSet({(1, "resid_post"): torch.ones(32)}).save(tmp_path / "v.safetensors")
    out = tmp_path / "outs" / "baked"
    err = assert_one_line_error(invoke("fold", tmp_path / "no-model", vec, "-o", out))
    assert "no-model" in err and "not found" in err
    assert_nothing_written(out)


@pytest.fixture(scope="module")
def baked_gpt2(tiny_models, tmp_path_factory) -> tuple[Path, Path]:
    """(output folder, vector file) of one fold of the tiny GPT-2, shared by the read-only checks below."""
    root = tmp_path_factory.mktemp("baked")
    vec = VectorSet({(1, "resid_post"): torch.linspace(-1, 1, 32)}).save(root / "v.safetensors")
    result = invoke("fold", tiny_models["gpt2"], vec, "-o", root / "out")
    assert_ok(result)
    return root / "out", vec


@pytest.mark.parametrize(
    "case",
    [
        "hidden size 16",
        "layer out of range",
        "nan",
        "missing",
    ],
)
def test_verify_bad_vector_file_is_refused(tiny_models, baked_gpt2, tmp_path, case):
    out, _ = baked_gpt2
    before = tree_digest(out)
    vec, words = _bad_vector(case, tmp_path)
    err = assert_one_line_error(invoke("verify", tiny_models["gpt2"], out, vec))
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    assert tree_digest(out) == before


def test_inspect_fold_of_a_bare_vector_file(baked_gpt2):
    """A vector file not written by `bake vector` has no entries metadata; inspect still shows the fold."""
    out, _ = baked_gpt2
    result = invoke("inspect", out)
    assert_ok(result)
    assert "layer.1 -> transformer.h.1.mlp.c_proj.bias" in result.output
    assert "(GPT-2 family)" in result.output and "verification PASSED" in result.output


@pytest.mark.parametrize("atol", ["-1", "0", "nan"])
def test_verify_bad_tolerance_is_refused(tiny_models, baked_gpt2, atol):
    out, vec = baked_gpt2
    err = assert_one_line_error(invoke("verify", tiny_models["gpt2"], out, vec, "--atol", atol))
    assert "--atol" in err


def test_verify_with_unsupported_base_is_refused(bigcode_model, baked_gpt2):
    out, vec = baked_gpt2
    err = assert_one_line_error(invoke("verify", bigcode_model, out, vec))
    assert "gpt_bigcode" in err


@pytest.mark.parametrize("tokens", ["0", "-2"])
def test_generate_bad_token_count_is_refused(baked_gpt2, tokens):
    out, _ = baked_gpt2
    assert "--tokens" in assert_one_line_error(invoke("generate", out, "tell me", "--tokens", tokens))


def test_generate_missing_model_is_refused(tmp_path):
    assert "not found" in assert_one_line_error(invoke("generate", tmp_path / "nope", "tell me", "--tokens", 2))


@pytest.mark.parametrize(
    "content,needle",
    [
        (None, "no bake.json"),
        ('{"base": ', "not valid JSON"),
        ("{}", "bake.json"),
        ("[1, 2]", "bake.json"),
        ('{"base": {"spec": "x"}, "fold": {"family": "GPT-2"}}', "bake.json"),
    ],
)
def test_inspect_bad_manifest_is_refused(tmp_path, content, needle):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    if content is not None:
        (folder / "bake.json").write_text(content)
    assert needle in assert_one_line_error(invoke("inspect", folder))
