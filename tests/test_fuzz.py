"""Property-based fuzzing of everything bake parses from disk: recipes, safetensors headers, GGUF headers.

Each property feeds generated input to the parser and requires that it either succeeds or raises a one-line
``BakeError`` (never another exception), and that nothing is written anywhere but the input itself. The run is
derandomized (the same examples every time) and bounded; ``BAKE_FUZZ_EXAMPLES=5000`` runs a longer fuzz.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from bake.errors import BakeError

EXAMPLES = int(os.environ.get("BAKE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    derandomize=True,
    deadline=None,
    max_examples=EXAMPLES,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@contextmanager
def sandbox() -> Iterator[Path]:
    """An empty folder that is also the working directory; afterwards it holds only what the example put there."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(cwd)


def refused_in_one_line(fn: Callable[[], Any]) -> None:
    """``fn`` succeeds or raises a BakeError whose message is one line; any other exception fails the property."""
    try:
        fn()
    except BakeError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# --- recipes ------------------------------------------------------------------------------------------

VALID = {
    "model": "some/model",
    "background": {"sample": {"sequences": 4, "tokens": 8}},
    "steering": [{"name": "happy", "layer": 1, "target": ["a happy text"], "coefficient": 2.0}],
    "evaluate": {"max_kl": 0.5, "coefficients": [0.5, 1.0]},
}


def _options(annotation: Any) -> tuple:
    """The alternatives of a union annotation (``X | None``), or the annotation itself, each without ``Annotated``."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return tuple(
        typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a
        for a in (typing.get_args(annotation) if union else (annotation,))
    )


def _submodels(annotation: Any) -> Iterator[tuple[type[BaseModel], bool]]:
    """The pydantic models a field holds, each with whether it holds a list of them."""
    for arg in _options(annotation):
        listed = typing.get_origin(arg) is list
        inner = typing.get_args(arg)[0] if listed else arg
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            yield inner, listed


def _schema_paths(model: type[BaseModel], prefix: tuple = ()) -> list[tuple]:
    """Every field path of the recipe schema (lists entered at index 0), from the pydantic models themselves."""
    paths = []
    for name, info in model.model_fields.items():
        path = prefix + (name,)
        paths.append(path)
        for sub, listed in _submodels(info.annotation):
            paths += _schema_paths(sub, path + ((0,) if listed else ()))
    return paths


def _recipe_paths() -> list[tuple]:
    from bake.recipe import Recipe

    return _schema_paths(Recipe)


JUNK = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(),
        st.text(max_size=20),
        st.sampled_from(["auto", "yes", "no", "..", "/etc/passwd", "x.txt", "x.jsonl", "mean", "resid_mid"]),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)


def _put(doc: Any, path: tuple, value: Any) -> Any:
    """``doc`` with ``value`` at ``path``, creating mappings and lists on the way."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(head, int):
        items = list(doc) if isinstance(doc, list) else []
        items = items or [{}]
        items[0] = _put(items[0], rest, value)
        return items
    mapping = dict(doc) if isinstance(doc, dict) else {}
    mapping[head] = _put(mapping.get(head), rest, value)
    return mapping


@st.composite
def recipe_documents(draw) -> str:
    doc: Any = json.loads(json.dumps(VALID))
    for path in draw(st.lists(st.sampled_from(_recipe_paths()), min_size=1, max_size=3)):
        doc = _put(doc, path, draw(JUNK))
    return yaml.safe_dump(doc, allow_unicode=True)


@FUZZ
@given(recipe_documents())
def test_recipe_documents_with_wrong_types_and_values(text):
    from bake.recipe import parse_recipe

    with sandbox() as tmp:
        refused_in_one_line(lambda: parse_recipe(text, tmp))
        assert listing(tmp) == []


@FUZZ
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_recipe_text_of_any_kind(text):
    from bake.recipe import load_recipe

    with sandbox() as tmp:
        (tmp / "r.yaml").write_text(text, encoding="utf-8", errors="surrogateescape")
        refused_in_one_line(lambda: load_recipe(tmp / "r.yaml"))
        assert listing(tmp) == ["r.yaml"]


# --- safetensors headers --------------------------------------------------------------------------------

DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "X9", ""]


def _entry() -> st.SearchStrategy:
    size = st.integers(-2, 6)
    sane = st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(DTYPES),
            "shape": st.lists(size, max_size=3),
            "data_offsets": st.lists(st.integers(-4, 200), min_size=2, max_size=2),
        }
    )
    return st.one_of(sane, JUNK)


@st.composite
def safetensors_files(draw) -> bytes:
    """A header of random entries over random data, or a valid file cut short or with a corrupted byte."""
    kind = draw(st.sampled_from(["random", "truncated", "flipped", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "random":
        header = draw(st.dictionaries(st.text(max_size=6), _entry(), max_size=4))
        if draw(st.booleans()):
            header["__metadata__"] = draw(JUNK)
        blob = json.dumps(header).encode()
        length = draw(st.one_of(st.just(len(blob)), st.integers(0, 2**64 - 1)))
        return struct.pack("<Q", length) + blob + draw(st.binary(max_size=256))
    import torch
    from safetensors.torch import save

    valid = save({"layer.1": torch.linspace(-1, 1, 8), "layer.2.mid": torch.ones(8)}, metadata={"bake": "{}"})
    if kind == "truncated":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    at = draw(st.integers(0, len(valid) - 1))
    return valid[:at] + bytes([valid[at] ^ draw(st.integers(1, 255))]) + valid[at + 1 :]


@FUZZ
@given(safetensors_files())
def test_safetensors_headers_random_and_truncated(data):
    from bake.checkpoint import Checkpoint, read_header
    from bake.vectorfile import VectorSet

    with sandbox() as tmp:
        (tmp / "model.safetensors").write_bytes(data)
        (tmp / "config.json").write_text("{}")

        def read_everything() -> None:
            infos, _ = read_header(tmp / "model.safetensors")
            for info in infos.values():
                info.read()

        refused_in_one_line(read_everything)
        refused_in_one_line(lambda: Checkpoint.open(tmp))
        refused_in_one_line(lambda: VectorSet.load(tmp / "model.safetensors"))
        assert listing(tmp) == ["config.json", "model.safetensors"]


# --- GGUF headers ---------------------------------------------------------------------------------------


def _valid_gguf(arch: str) -> bytes:
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.gguf"
        writer = gguf.GGUFWriter(str(path), arch)
        writer.add_uint32(f"{arch}.layer_count", 2)
        writer.add_string("general.license", "mit")
        for i in (1, 2):
            writer.add_tensor(f"direction.{i}", np.linspace(-1, 1, 16, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


@st.composite
def gguf_files(draw) -> bytes:
    """A valid control-vector or model GGUF cut short, corrupted at one byte, or random bytes after the magic."""
    pytest.importorskip("gguf", reason="the GGUF readers need the gguf package (pip install 'bake[gguf]')")
    valid = _valid_gguf(draw(st.sampled_from(["controlvector", "llama"])))
    kind = draw(st.sampled_from(["truncated", "flipped", "random"]))
    if kind == "truncated":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "random":
        return b"GGUF" + struct.pack("<I", 3) + draw(st.binary(max_size=128))
    at = draw(st.integers(0, min(len(valid) - 1, 400)))  # the header: counts, keys, types, tensor infos
    return valid[:at] + bytes([valid[at] ^ draw(st.integers(1, 255))]) + valid[at + 1 :]


@FUZZ
@given(gguf_files())
def test_gguf_headers_random_and_truncated(data):
    from bake.formats.gguf import export
    from bake.formats.gguf.controlvector import read_control_vector
    from bake.gguffile import read_gguf

    with sandbox() as tmp:
        (tmp / "x.gguf").write_bytes(data)
        refused_in_one_line(lambda: read_gguf(tmp / "x.gguf"))
        refused_in_one_line(lambda: read_control_vector([tmp / "x.gguf"]))
        refused_in_one_line(lambda: export.read_manifest(tmp / "x.gguf"))
        assert listing(tmp) == ["x.gguf"]


def _number_paths() -> list[tuple]:
    """Schema paths of every integer or float field (a bool there was once read as 1 or 0)."""
    from bake.recipe import Recipe

    def leaf(path: tuple) -> Any:
        model: Any = Recipe
        for step in path[:-1]:
            if not isinstance(step, int):
                model = next(sub for sub, _ in _submodels(model.model_fields[step].annotation))
        return model.model_fields[path[-1]].annotation

    auto = typing.Literal["auto"]  # a number or "auto": layer, coefficient
    return [p for p in _recipe_paths() if set(_options(leaf(p))) - {type(None), auto} <= {int, float}]


@pytest.mark.parametrize("path", _number_paths(), ids=lambda p: ".".join(map(str, p)))
@pytest.mark.parametrize("value", [True, False])
def test_a_yes_no_value_is_refused_wherever_a_number_is_meant(path, value):
    from bake.recipe import parse_recipe

    with pytest.raises(BakeError) as e:
        parse_recipe(yaml.safe_dump(_put(json.loads(json.dumps(VALID)), path, value)), Path("."))
    assert ".".join(map(str, path)) in str(e.value) and "yes/no" in str(e.value), str(e.value)


def test_the_schema_walk_finds_the_number_fields():
    """The parametrization above is only as good as the walk: it must reach nested and listed models."""
    found = {".".join(map(str, p)) for p in _number_paths()}
    assert {
        "seed",
        "steering.0.layer",
        "steering.0.coefficient",
        "background.sample.tokens",
        "evaluate.max_kl",
        "verify.atol",
        "steering.0.target.limit",
    } <= found, sorted(found)
