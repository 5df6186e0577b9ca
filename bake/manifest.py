"""Reading a baked checkpoint's manifest and checking it against the weights actually on disk.

A re-saved, edited or half-copied checkpoint can carry a manifest that no longer
describes its weights; ``check`` recomputes every folded bias from the stored
vectors (and the original values the fold overwrote) and compares bit for bit.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError
from safetensors import safe_open

from bake.checkpoint import Checkpoint, inner_path, inside, plain_name
from bake.errors import BakeError
from bake.recipe import Positions
from bake.vectorfile import VectorSet, parse_name

MANIFEST = "bake.json"


SafeName = Annotated[str, AfterValidator(plain_name)]
SafePath = Annotated[str, AfterValidator(inner_path)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Open(BaseModel):
    """A record whose other fields are provenance bake does not act on (kept, not checked)."""

    model_config = ConfigDict(extra="allow")


class ShardUndo(_Strict):
    file: SafeName
    rewritten: bool


class UndoRecord(_Strict):
    folder: SafePath
    originals: SafePath | None
    shards: dict[SafeName, ShardUndo]
    added: list[str]
    splits: dict[str, list[str]]
    written: list[SafeName]
    cast: bool


class RemoteCode(_Open):
    file: SafeName
    sha256: str


class BiasRecord(_Open):
    vector: str
    tensor: str
    had_bias: bool
    scale: float = 1.0


class FoldRecord(_Open):
    family: str
    biases: list[BiasRecord]
    config_changes: dict[str, Any]
    remote_code: RemoteCode | None = None
    undo: UndoRecord | None = None


class BaseRecord(_Open):
    spec: str
    identity: Any = None
    base_model_id: str | None = None


class RecipeRecord(_Open):
    text: str
    base_dir: str


class VectorEntry(_Open):
    """One steering vector's provenance; ``positions`` is None in manifests written before the option existed
    (they measured every token, or the reply's tokens with chat: true)."""

    name: str
    positions: Positions | None = None


class VectorsRecord(_Open):
    entries: list[VectorEntry] = []


class Manifest(BaseModel):
    """``bake.json`` of a Hugging Face checkpoint folder: the contract inspect, unbake, rebuild, push and the card
    read."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["bake-manifest/1"]
    created: str
    versions: dict[str, str]
    base: BaseRecord
    recipe: RecipeRecord | None
    vectors: VectorsRecord
    vector_file: SafePath
    fold: FoldRecord
    portable: bool
    verification: dict[str, Any]
    preview: list[dict[str, Any]]
    history: list[dict[str, Any]]
    evaluation: dict[str, Any] | None = None


class GGUFManifest(_Open):
    """The ``bake.manifest`` metadata of a steered GGUF (one file, so it names no other file bake reads)."""

    format: Literal["bake-gguf-manifest/1"]
    base: dict[str, Any]
    architecture: str
    vectors: dict[str, Any]
    biases: list[BiasRecord]
    copied: dict[str, Any]


def validate(data: Any, where: str, model: type[BaseModel] = Manifest) -> BaseModel:
    """``data`` checked against the manifest schema; a problem is one line naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "(top level)"
        raise BakeError(
            f"{where}: {field}: {err['msg']}: it is not a bake manifest bake can use (edited, or not "
            "from bake); use --json to see it"
        ) from None


def read(path: str | Path) -> dict[str, Any]:
    """The manifest of the folder ``path``, validated (schema, and every file it names stays inside the folder)."""
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise BakeError(f"{str(path)!r} has no {MANIFEST}: it was not written by bake (or the manifest was removed)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BakeError(f"{str(manifest_path)!r} is not valid JSON: the manifest was edited or truncated") from None
    if not isinstance(manifest, dict):
        raise BakeError(f"{str(manifest_path)!r} is not a bake manifest: use --json to see it")
    typed = validate(manifest, repr(str(manifest_path)))
    names = [typed.vector_file]
    if typed.fold.remote_code:
        names.append(typed.fold.remote_code.file)
    if typed.fold.undo:
        undo = typed.fold.undo
        names += [undo.folder, *([undo.originals] if undo.originals else []), *undo.shards, *undo.written]
        names += [s.file for s in undo.shards.values()]
    for name in names:
        inside(folder, name)
    return manifest


def dumps(manifest: dict[str, Any]) -> str:
    """The text of ``bake.json``: the one place a manifest is written, checked against the schema first."""
    validate(manifest, "the manifest bake was about to write")
    return json.dumps(manifest, indent=2) + "\n"


def is_bake_folder(path: Path) -> bool:
    """Whether ``path`` is a folder bake wrote (it holds a bake manifest): what ``--force`` may replace."""
    try:
        data = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return path.is_dir() and isinstance(data, dict) and data.get("format") == "bake-manifest/1"


def check(path: str | Path, manifest: dict[str, Any]) -> list[str]:
    """Every way the weights and config differ from what the manifest says was baked (empty: they agree)."""
    path = Path(path)
    problems = []
    try:
        vectors = VectorSet.load(inside(path, manifest["vector_file"]))
        biases = manifest["fold"]["biases"]
        config_changes = manifest["fold"]["config_changes"]
    except (KeyError, TypeError) as e:
        raise BakeError(f"{str(path)!r}: the manifest lacks {e}: it is incomplete") from None
    ckpt = Checkpoint.open(path)
    kept = manifest["fold"].get("undo", {}).get("originals")
    originals = safe_open(inside(path, kept), "pt") if kept and (path / kept).is_file() else None
    for b in biases:
        info = ckpt.find(b["tensor"])
        if info is None:
            problems.append(f"{b['tensor']} is missing from the weights")
            continue
        v = vectors.vectors.get(parse_name(b["vector"]))
        if v is None:
            problems.append(f"{b['vector']} is missing from {manifest['vector_file']}")
            continue
        if b["had_bias"] and (originals is None or b["tensor"] not in originals.keys()):
            problems.append(f"the original value of {b['tensor']} is missing from {kept or 'bake/undo'}")
            continue
        before = originals.get_tensor(b["tensor"]).to(torch.float32) if b["had_bias"] else torch.zeros_like(v)
        expected = (before + v / b.get("scale", 1.0)).to(info.torch_dtype)
        stored = info.read()
        if not torch.equal(stored, expected):
            delta = float((stored.float() - expected.float()).abs().max())
            problems.append(
                f"{b['tensor']} differs from the baked value by up to {delta:.3g}: the weights were changed after "
                "baking"
            )
    config = ckpt.config
    for key, value in config_changes.items():
        if config.get(key) != value:
            problems.append(
                f"config.json {key} is {config.get(key)!r}, baked as {value!r}: a stock loader may drop the steering"
            )
    module = manifest["fold"].get("remote_code")
    if module:
        code = inside(path, module["file"])
        if not code.is_file():
            problems.append(f"{module['file']} is missing: transformers cannot apply the steering")
        elif hashlib.sha256(code.read_bytes()).hexdigest() != module["sha256"]:
            problems.append(
                f"{module['file']} differs from the file baked (sha256 {module['sha256'][:16]}…): the code was "
                "changed after baking"
            )
    return problems


def package_versions(*packages: str) -> dict[str, str]:
    """Installed versions of ``packages`` for a manifest's provenance (ones not installed are left out)."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
