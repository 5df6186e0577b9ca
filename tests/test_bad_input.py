"""A catalogue of bad input, each case run through the real ``bake`` command (click's CliRunner).

Every case asserts the house rule end to end: the exit code (1 bad input, 2 usage), exactly one line on
stderr (progress bars aside) naming the problem, nothing at or beside the target (no output, no staging
leftovers), every source file byte for byte unchanged, and no pickle ever unpickled (the pickle weights
planted below write a marker file when loaded).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_tokenizer, tree_digest
from safetensors.torch import save_file

from bake.cli import main
from bake.vectorfile import VectorSet

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET = ["the happy dog is very happy today", "what a wonderful bright day", "i love the sun and the tea"]
# Progress, not errors: tqdm bars and the one line that says a background was sampled and cached.
_PROGRESS = re.compile(r"\d+%\||\d+it \[|it/s\]|s/it\]|^sampled background: ")


class _Payload:
    """Unpickling this creates ``marker``: proof that something loaded the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@dataclass
class World:
    """Inputs shared by every case (built once per module): tiny models, vector files, a baked folder."""

    root: Path
    gpt2: Path
    llama: Path
    vec: Path
    baked: Path
    marker: Path

    def pickle_folder(self, dst: Path, weights: str = "pytorch_model.bin") -> Path:
        """A model folder (config, tokenizer) whose only weights are a pickle that would write the marker."""
        dst.mkdir(parents=True)
        shutil.copy(self.gpt2 / "config.json", dst / "config.json")
        make_tokenizer().save_pretrained(dst)
        (dst / weights).write_bytes(pickle.dumps(_Payload(self.marker)))
        return dst


def _tiny_gguf(path: Path, arch: str = "llama", tensor: str = "token_embd.weight") -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(4)
    writer.add_tensor(tensor, np.linspace(-1, 1, 8 * 32, dtype=np.float32).reshape(8, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def invoke(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def world(tiny_models, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    vec = VectorSet({(1, "resid_post"): torch.linspace(-1, 1, 32)}).save(root / "v.safetensors")
    result = invoke("fold", tiny_models["gpt2"], vec, "-o", root / "baked")
    assert result.exit_code == 0, result.output
    return World(root, tiny_models["gpt2"], tiny_models["llama"], vec, root / "baked", root / "PWNED")


def test_the_planted_pickle_is_live(world, tmp_path):
    """The payload really writes its marker when unpickled, so the cases below that plant it can fail."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


# --- the catalogue ------------------------------------------------------------------------------------
# Each case builds its inputs under ``d`` (a fresh folder) and returns the command line, with "OUT" for the
# target (a path in an otherwise empty folder), and the words the error line must contain.


@dataclass
class Case:
    args: list
    words: list[str]
    code: int = 1


CASES: dict[str, Callable[[World, Path], Case]] = {}


def case(name: str):
    def register(fn: Callable[[World, Path], Case]) -> Callable[[World, Path], Case]:
        assert name not in CASES, name
        CASES[name] = fn
        return fn

    return register


def recipe(
    d: Path,
    model: Path | str,
    *,
    layer: str = "1",
    target: str = json.dumps(TARGET),
    extra: str = "",
    entry: str = "",
    name: str = "r.yaml",
) -> Path:
    path = d / name
    path.write_text(
        f"model: {model}\nbackground: {{sample: {{sequences: 4, tokens: 8}}}}\npreview: {{prompts: []}}\n"
        f"verify: {{tokens: 3}}\n{extra}steering:\n  - name: happy\n    layer: {layer}\n"
        f"    target: {target}\n{entry}"
    )
    return path


def vector_file(d: Path, tensors: dict[str, torch.Tensor], meta: str | None = "{}") -> Path:
    path = d / "vec.safetensors"
    save_file(tensors, path, metadata=None if meta is None else {"bake": meta})
    return path


def _ones(n: int = 32) -> torch.Tensor:
    return torch.linspace(-1, 1, n)


# Usage errors: one line, exit 2.
for _name, _args, _words in [
    ("usage: bad --dtype", ["fold", "M", "V", "-o", "OUT", "--dtype", "bfloat17"], ["--dtype", "bfloat17"]),
    ("usage: missing argument", ["fold", "M"], ["Missing argument", "VECTORS"]),
    ("usage: unknown option", ["fold", "M", "V", "-o", "OUT", "--bogus"], ["No such option", "--bogus"]),
    ("usage: unknown command", ["frobnicate"], ["No such command", "frobnicate"]),
    ("usage: --tokens 0", ["generate", "M", "hi", "--tokens", "0"], ["--tokens"]),
    ("usage: --tokens not a number", ["generate", "M", "hi", "--tokens", "many"], ["--tokens", "many"]),
    ("usage: --atol negative", ["verify", "M", "B", "V", "--atol", "-1"], ["--atol"]),
    ("usage: --atol nan", ["verify", "M", "B", "V", "--atol", "nan"], ["--atol"]),
    ("usage: --verify-scope", ["fold", "M", "V", "-o", "OUT", "--verify-scope", "half"], ["--verify-scope"]),
    ("usage: --format", ["run", "R", "-o", "OUT", "--format", "onnx"], ["--format", "onnx"]),
    ("usage: --layers yes", ["sweep", "R", "-o", "OUT", "--layers", "yes"], ["--layers", "yes"]),
    ("usage: --layers 1.5", ["sweep", "R", "-o", "OUT", "--layers", "1,1.5"], ["--layers"]),
    ("usage: --coefficients nan", ["sweep", "R", "-o", "OUT", "--coefficients", "1,nan"], ["--coefficients"]),
    ("usage: run with recipe and --from-manifest", ["run", "R", "--from-manifest", "B", "-o", "OUT"], ["one of them"]),
    ("usage: --from-manifest without -o", ["run", "--from-manifest", "B"], ["-o OUT"]),
    ("usage: eval of a missing folder", ["eval", "NOPE"], ["nope", "does not exist"]),
    ("usage: unbake without -o", ["unbake", "B"], ["Missing option", "-o"]),
    ("usage: import-cv without files", ["import-cv", "-o", "OUT"], ["Missing argument", "FILES"]),
    ("usage: --max-kl 0", ["compare", "R", "-o", "OUT", "--max-kl", "0"], ["--max-kl"]),
]:

    def _usage(w: World, d: Path, _args=_args, _words=_words) -> Case:
        names = {"M": w.gpt2, "V": w.vec, "B": w.baked, "R": recipe(d, w.gpt2), "NOPE": d / "nope"}
        return Case([names.get(a, a) for a in _args], _words, code=2)

    case(_name)(_usage)


# Recipes: run and vector refuse them in one line, before any work.
for _name, _kw, _words in [
    ("recipe: layer yes", dict(layer="yes"), ["steering.0.layer", "yes/no"]),
    ("recipe: layer no", dict(layer="no"), ["steering.0.layer", "yes/no"]),
    ("recipe: layer a word", dict(layer="two"), ["steering.0.layer"]),
    ("recipe: layer 99", dict(layer="99"), ["steering.0.layer", "99", "0..3"]),
    ("recipe: negative layer", dict(layer="-1"), ["steering.0.layer"]),
    ("recipe: layer a list", dict(layer="[1, 2]"), ["steering.0.layer"]),
    ("recipe: coefficient yes", dict(entry="    coefficient: yes\n"), ["coefficient", "yes/no"]),
    ("recipe: coefficient nan", dict(entry="    coefficient: .nan\n"), ["coefficient", "finite"]),
    ("recipe: coefficient inf", dict(entry="    coefficient: .inf\n"), ["coefficient", "finite"]),
    ("recipe: coefficient a word", dict(entry="    coefficient: strong\n"), ["coefficient", "strong"]),
    ("recipe: unknown field", dict(entry="    layr: 2\n"), ["steering.0.layr", "unknown field"]),
    ("recipe: unknown top-level field", dict(extra="dtpye: float32\n"), ["dtpye", "unknown field"]),
    ("recipe: unknown method", dict(entry="    method: mean-centered\n"), ["steering.0.method"]),
    ("recipe: seed yes", dict(extra="seed: yes\n"), ["seed", "yes/no"]),
    ("recipe: max_tokens 1", dict(extra="max_tokens: 1\n"), ["max_tokens"]),
    ("recipe: bad dtype", dict(extra="dtype: float8\n"), ["dtype", "bfloat16"]),
    ("recipe: max_kl inf", dict(extra="evaluate: {max_kl: .inf}\n"), ["evaluate.max_kl", "finite"]),
    (
        "recipe: coefficients with a bool",
        dict(extra="evaluate: {coefficients: [1, true]}\n"),
        ["evaluate.coefficients.1"],
    ),
    ("recipe: evaluate tokens yes", dict(extra="evaluate: {tokens: yes}\n"), ["evaluate.tokens", "yes/no"]),
    ("recipe: gguf output from a folder", dict(extra="output_format: gguf\n"), ["output_format", ".gguf"]),
    ("recipe: missing data file", dict(target="data/missing.txt"), ["missing.txt", "not found"]),
    ("recipe: data file of another kind", dict(target="data/texts.pdf"), ["texts.pdf", ".txt"]),
    ("recipe: jsonl without field", dict(target="data/t.jsonl"), ["field"]),
    ("recipe: target of unknown words", dict(target='["xyzzy plugh"]'), ["target", "no tokens"]),
]:

    def _recipe(w: World, d: Path, _kw=_kw, _words=_words) -> Case:
        return Case(["run", recipe(d, w.llama, **_kw), "-o", "OUT"], _words)

    case(_name)(_recipe)


@case("recipe: empty target file")
def _(w, d):
    (d / "empty.txt").write_text("\n\n")
    return Case(["vector", recipe(d, w.llama, target="empty.txt"), "-o", "OUT"], ["target", "no tokens"])


@case("recipe: missing file")
def _(w, d):
    return Case(["run", d / "nope.yaml", "-o", "OUT"], ["nope.yaml", "not found"])


@case("recipe: invalid YAML")
def _(w, d):
    (d / "r.yaml").write_text(f"model: {w.llama}\nsteering: [\n  - {{name: a\n")
    return Case(["run", d / "r.yaml", "-o", "OUT"], ["not valid YAML"])


@case("recipe: not a mapping")
def _(w, d):
    (d / "r.yaml").write_text("- model\n- steering\n")
    return Case(["vector", d / "r.yaml", "-o", "OUT"], ["YAML mapping"])


@case("recipe: key twice")
def _(w, d):
    (d / "r.yaml").write_text(f"model: {w.llama}\nmodel: {w.gpt2}\nsteering: []\n")
    return Case(["run", d / "r.yaml", "-o", "OUT"], ["'model' appears twice"])


@case("recipe: not UTF-8")
def _(w, d):
    (d / "r.yaml").write_bytes(b"model: \xff\xfe\n")
    return Case(["run", d / "r.yaml", "-o", "OUT"], ["r.yaml", "cannot be read"])


@case("recipe: repeated steering names")
def _(w, d):
    path = recipe(d, w.llama, entry=f"  - name: happy\n    layer: 2\n    target: {json.dumps(TARGET)}\n")
    return Case(["run", path, "-o", "OUT"], ["unique", "happy"])


@case("recipe: no output")
def _(w, d):
    return Case(["run", recipe(d, w.llama)], ["-o OUT"])


@case("recipe: model folder without config.json")
def _(w, d):
    (d / "model").mkdir()
    return Case(["run", recipe(d, d / "model"), "-o", "OUT"], ["config.json"])


@case("recipe: sweep with layer yes")
def _(w, d):
    return Case(["sweep", recipe(d, w.llama, layer="yes"), "-o", "OUT"], ["steering.0.layer", "yes/no"])


for _name, _extra in [("recipe: coefficient 1e30", ""), ("recipe: coefficient 1e30 in bfloat16", "dtype: bfloat16\n")]:

    def _huge(w: World, d: Path, _extra=_extra) -> Case:
        path = recipe(d, w.llama, extra=_extra, entry="    coefficient: 1.0e+30\n")
        return Case(
            ["run", path, "-o", "OUT"], ["verification FAILED", "lower the coefficient of steering 'happy' (1e+30)"]
        )

    case(_name)(_huge)


# Vector files: fold refuses them before any fold or verification runs.
for _name, _tensors, _meta, _words in [
    ("vectors: NaN", {"layer.1": torch.tensor([1.0] * 31 + [float("nan")])}, "{}", ["NaN", "layer.1"]),
    ("vectors: inf", {"layer.2.mid": torch.tensor([float("-inf")] + [0.0] * 31)}, "{}", ["inf", "layer.2.mid"]),
    ("vectors: bad tensor name", {"layers.1": _ones()}, "{}", ["layers.1", "layer.<L>"]),
    ("vectors: hidden size 16", {"layer.1": _ones(16)}, "{}", ["16", "32", "hidden size"]),
    ("vectors: layer out of range", {"layer.4": _ones()}, "{}", ["layer 4", "0..3"]),
    ("vectors: layer.2 and layer.02", {"layer.2": _ones(), "layer.02": _ones()}, "{}", ["layer.02 and layer.2"]),
    ("vectors: metadata a JSON list", {"layer.1": _ones()}, "[1, 2]", ["'bake' metadata", "list", "not an object"]),
    ("vectors: metadata JSON null", {"layer.1": _ones()}, "null", ["'bake' metadata", "not an object"]),
    ("vectors: metadata not JSON", {"layer.1": _ones()}, "{oops", ["not a readable safetensors vector file"]),
    ("vectors: a 2-D tensor", {"layer.1": torch.ones(2, 32)}, "{}", ["layer.1", "1-D float"]),
    ("vectors: integers", {"layer.1": torch.ones(32, dtype=torch.int32)}, "{}", ["layer.1", "1-D float"]),
    ("vectors: no tensors", {}, "{}", ["holds no vectors"]),
    ("vectors: sizes differ", {"layer.1": _ones(), "layer.2": _ones(16)}, "{}", ["different sizes"]),
]:

    def _vectors(w: World, d: Path, _tensors=_tensors, _meta=_meta, _words=_words) -> Case:
        return Case(["fold", w.llama, vector_file(d, _tensors, _meta), "-o", "OUT"], _words)

    case(_name)(_vectors)


@case("vectors: missing file")
def _(w, d):
    return Case(["fold", w.llama, d / "nope.safetensors", "-o", "OUT"], ["nope.safetensors", "not found"])


@case("vectors: not safetensors")
def _(w, d):
    (d / "v.safetensors").write_text("hello")
    return Case(["fold", w.gpt2, d / "v.safetensors", "-o", "OUT"], ["safetensors"])


@case("vectors: huge vector folded")
def _(w, d):
    return Case(
        ["fold", w.llama, vector_file(d, {"layer.1": _ones() * 1e29}), "-o", "OUT"],
        ["verification FAILED", "layer.1", "mean residual norm", "lower the coefficient"],
    )


@case("vectors: huge vector folded in bfloat16")
def _(w, d):
    return Case(
        ["fold", w.gpt2, vector_file(d, {"layer.1": _ones() * 1e29}), "-o", "OUT", "--dtype", "bfloat16"],
        ["verification FAILED", "layer.1", "lower the coefficient"],
    )


@case("vectors: verify with a vector file for another model")
def _(w, d):
    return Case(["verify", w.gpt2, w.baked, vector_file(d, {"layer.1": _ones(16)})], ["16", "hidden size"])


# Models: missing, not Hugging Face, pickles, unknown architectures, truncated weights.
@case("model: missing folder")
def _(w, d):
    return Case(["fold", d / "no-model", w.vec, "-o", "OUT"], ["no-model", "not found"])


@case("model: not a Hub id")
def _(w, d):
    return Case(["generate", "a/b/c", "hi"], ["'a/b/c'", "not found"])


@case("model: folder without config.json")
def _(w, d):
    (d / "m").mkdir()
    return Case(["fold", d / "m", w.vec, "-o", "OUT"], ["config.json"])


@case("model: config.json not JSON")
def _(w, d):
    shutil.copytree(w.gpt2, d / "m")
    (d / "m" / "config.json").write_text("{model_type")
    return Case(["generate", d / "m", "hi"], ["config.json"])


for _name, _command, _weights in [
    ("pickle: fold", "fold", "pytorch_model.bin"),
    ("pickle: generate", "generate", "model.pt"),
    ("pickle: verify base", "verify", "pytorch_model.bin"),
    ("pickle: verify baked", "verify-baked", "pytorch_model.bin"),
    ("pickle: run", "run", "model.ckpt"),
    ("pickle: vector", "vector", "weights.pth"),
    ("pickle: sweep", "sweep", "pytorch_model.bin"),
    ("pickle: compare", "compare", "pytorch_model.bin"),
    ("pickle: eval", "eval", "pytorch_model.bin"),
]:

    def _pickle(w: World, d: Path, _command=_command, _weights=_weights) -> Case:
        m = w.pickle_folder(d / "m", _weights)
        args = {
            "fold": ["fold", m, w.vec, "-o", "OUT"],
            "generate": ["generate", m, "hi"],
            "verify": ["verify", m, w.baked, w.vec],
            "verify-baked": ["verify", w.gpt2, m, w.vec],
            "eval": ["eval", m],
        }.get(_command) or [_command, recipe(d, m), "-o", "OUT"]
        if _command == "eval":  # a bake.json pointing at a real base: only the pickle stands in the way
            shutil.copy(w.baked / "bake.json", m / "bake.json")
        return Case(args, ["pickle", _weights])

    case(_name)(_pickle)


@case("pickle: config names pickle weights")
def _(w, d):
    shutil.copytree(w.gpt2, d / "m")
    config = json.loads((d / "m" / "config.json").read_text())
    (d / "m" / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    (d / "m" / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(w.marker)))
    return Case(["generate", d / "m", "hi"], ["transformers_weights", "adapter_model.bin", "pickles"])


for _name, _command in [
    ("model: unknown model_type (fold)", "fold"),
    ("model: unknown model_type (generate)", "generate"),
]:

    def _unknown_type(w: World, d: Path, _command=_command) -> Case:
        shutil.copytree(w.gpt2, d / "m")
        config = json.loads((d / "m" / "config.json").read_text())
        (d / "m" / "config.json").write_text(json.dumps({**config, "model_type": "nosuchmodel"}))
        args = ["fold", d / "m", w.vec, "-o", "OUT"] if _command == "fold" else ["generate", d / "m", "hi"]
        return Case(args, ["nosuchmodel", "unknown to transformers"])

    case(_name)(_unknown_type)


for _name, _extra in [
    ("model: truncated shard", []),
    ("model: truncated shard, --dtype bfloat16", ["--dtype", "bfloat16"]),
]:

    def _truncated(w: World, d: Path, _extra=_extra) -> Case:
        shutil.copytree(w.llama, d / "m")
        _truncate(d / "m" / "model.safetensors", 0.6)
        return Case(["fold", d / "m", w.vec, "-o", "OUT", *_extra], ["model.safetensors", "truncated", "tensor"])

    case(_name)(_truncated)


@case("model: shard shorter than its header length")
def _(w, d):
    shutil.copytree(w.llama, d / "m")
    (d / "m" / "model.safetensors").write_bytes(b"\x10\x00\x00")
    return Case(["fold", d / "m", w.vec, "-o", "OUT"], ["model.safetensors", "not a readable safetensors"])


@case("model: shard header claims more bytes than its shape")
def _(w, d):
    shutil.copytree(w.gpt2, d / "m")
    path = d / "m" / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [1]
    blob = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(blob) == n
    path.write_bytes(raw[:8] + blob + raw[8 + n :])
    return Case(["fold", d / "m", w.vec, "-o", "OUT"], [name, "do not fit F32 shape"])


@case("model: tampered steered weights (unbake)")
def _(w, d):
    from bake.checkpoint import Checkpoint

    shutil.copytree(w.baked, d / "b")
    tensor = json.loads((d / "b" / "bake.json").read_text())["fold"]["biases"][0]["tensor"]
    info = Checkpoint.open(d / "b").find(tensor)
    raw = bytearray(info.file.read_bytes())
    raw[info.start + 1] ^= 0x40
    info.file.write_bytes(bytes(raw))
    return Case(["unbake", d / "b", "-o", "OUT"], ["changed after baking"])


@case("model: truncated baked shard (unbake)")
def _(w, d):
    shutil.copytree(w.baked, d / "b")
    _truncate(d / "b" / "model.safetensors", 0.8)
    return Case(["unbake", d / "b", "-o", "OUT"], ["model.safetensors", "truncated"])


@case("gguf: truncated GGUF model (generate)")
def _(w, d):
    return Case(["generate", _truncate(_tiny_gguf(d / "m.gguf")), "hi"], ["m.gguf", "not a readable GGUF"])


@case("gguf: truncated GGUF model (fold)")
def _(w, d):
    return Case(["fold", _truncate(_tiny_gguf(d / "m.gguf")), w.vec, "-o", "OUT"], ["m.gguf", "not a readable GGUF"])


@case("gguf: truncated GGUF model (run)")
def _(w, d):
    model = _truncate(_tiny_gguf(d / "m.gguf"))
    return Case(["run", recipe(d, model), "-o", "OUT"], ["m.gguf", "not a readable GGUF"])


@case("gguf: missing GGUF model")
def _(w, d):
    return Case(["generate", d / "nope.gguf", "hi"], ["nope.gguf", "not found"])


@case("gguf: truncated control vector")
def _(w, d):
    cv = _truncate(_tiny_gguf(d / "cv.gguf", "controlvector", "direction.1"), 0.7)
    return Case(["import-cv", cv, "-o", "OUT"], ["cv.gguf", "not a readable GGUF"])


@case("gguf: control vector that is a model")
def _(w, d):
    return Case(["import-cv", _tiny_gguf(d / "m.gguf"), "-o", "OUT"], ["not a control vector"])


# Baked folders: inspect, unbake, push, eval.
@case("inspect: no bake.json")
def _(w, d):
    (d / "ckpt").mkdir()
    return Case(["inspect", d / "ckpt"], ["no bake.json"])


@case("inspect: bake.json not JSON")
def _(w, d):
    (d / "ckpt").mkdir()
    (d / "ckpt" / "bake.json").write_text('{"base": ')
    return Case(["inspect", d / "ckpt"], ["not valid JSON"])


@case("unbake: not a baked folder")
def _(w, d):
    return Case(["unbake", w.gpt2, "-o", "OUT"], ["bake.json"])


@case("push: no Hub token")
def _(w, d):
    return Case(["push", w.baked, "alice/tiny"], ["no Hugging Face token", "hf auth login"])


@case("push: bad repository id")
def _(w, d):
    return Case(["push", w.baked, "not an id"], ["not a Hub repository id"])


@case("eval: folder that is not baked")
def _(w, d):
    return Case(["eval", w.gpt2], ["bake.json"])


@case("eval: missing prompt file")
def _(w, d):
    return Case(["eval", w.baked, "--prompts", d / "missing.txt"], ["--prompts", "missing.txt"], code=2)


@case("output: exists without --force")
def _(w, d):
    return Case(["fold", w.gpt2, w.vec, "-o", "EXISTING"], ["already exists", "--force"])


def _stderr_lines(text: str) -> list[str]:
    """stderr without progress bars (tqdm redraws with carriage returns)."""
    return [ln for ln in re.split(r"[\r\n]+", text) if ln.strip() and not _PROGRESS.search(ln)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(world, tmp_path, monkeypatch, name):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token either
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = tmp_path / "in"
    d.mkdir()
    spec = CASES[name](world, d)
    outs = tmp_path / "outs"
    outs.mkdir()
    (outs / "EXISTING").mkdir()
    (outs / "EXISTING" / "keep.txt").write_text("mine")
    target = outs / ("target.safetensors" if spec.args[0] in ("vector", "import-cv") else "target")
    args = [target if a == "OUT" else outs / "EXISTING" if a == "EXISTING" else a for a in spec.args]
    sources = {p: tree_digest(p) for p in (world.root, world.gpt2, world.llama, d)}
    listing = sorted(p.name for p in outs.iterdir())
    existing = tree_digest(outs / "EXISTING")

    result = CliRunner().invoke(main, [str(a) for a in args])

    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == spec.code, (result.exit_code, result.stderr, result.stdout)
    lines = _stderr_lines(result.stderr)
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith("Error: "), lines[0]
    for word in spec.words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert "Traceback" not in result.output
    assert not target.exists(), f"{target} was written"
    assert sorted(p.name for p in outs.iterdir()) == listing, "something was left beside the target"
    assert tree_digest(outs / "EXISTING") == existing
    assert {p: tree_digest(p) for p in sources} == sources, "a source file changed"
    assert not world.marker.exists(), "a pickle was loaded"


def test_a_shard_truncated_after_its_header_was_read_ends_the_copy(world, tmp_path):
    """The copy and read loops stop at end of file with the file and tensor named (they used to spin forever
    on the empty reads of a file that shrank, or was short from the start, under a header that was trusted)."""
    from bake.checkpoint import Checkpoint
    from bake.errors import BakeError

    shutil.copytree(world.llama, tmp_path / "m")
    ckpt = Checkpoint.open(tmp_path / "m")
    info = max(ckpt.shards["model.safetensors"].values(), key=lambda i: i.end)
    _truncate(info.file, 0.9)
    for action in (lambda: info.copy_to(open(tmp_path / "copy", "wb")), info.read):
        with pytest.raises(BakeError, match=rf"model.safetensors' is truncated: tensor {re.escape(info.name)} "):
            action()


@pytest.mark.parametrize(
    "args,code,words",
    [
        (["fold", "m", "v.safetensors", "-o", "out", "--dtype", "bfloat17"], 2, ["--dtype", "bfloat17", "--help"]),
        (["fold", "no-model", "no-vectors.safetensors", "-o", "out"], 1, ["no-vectors.safetensors", "not found"]),
    ],
)
def test_a_real_process_prints_one_line_and_exits_with_its_code(tmp_path, args, code, words):
    """The exit codes and the single stderr line as a shell sees them (python -m bake), not only through CliRunner."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "bake", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert done.returncode == code, done.stderr
    lines = _stderr_lines(done.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    assert all(word in lines[0] for word in words), lines[0]
    assert done.stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 60, len(CASES)
