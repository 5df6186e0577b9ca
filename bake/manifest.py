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
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import safe_open

from bake.checkpoint import Checkpoint, file_digest, inner_path, inside, plain_name
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


class FileHash(_Strict):
    """A weight shard as the fold wrote it: hashed while it was written, so a later change to any byte shows."""

    sha256: str
    size: int


class RemoteCode(_Open):
    """The constant-bias module a fold wrote (``bake.formats.hf.remote``): how it loads, and where it does not."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)
    file: SafeName
    sha256: str
    class_name: str = Field(alias="class")
    base_architecture: str
    portable: bool
    loads_with: str
    without_trust_remote_code: str
    not_applied_by: list[str]
    why: str
    note: str


class BiasRecord(_Open):
    """One folded vector. Fields in the order bake writes them (the file's key order survives a round trip)."""

    vector: str
    layer: int
    site: str
    tensor: str
    had_bias: bool
    scale: float | int = 1.0  # int kept an int: a config's integer multiplier re-serialises as written
    norm: float
    rounding_error: float | None = None  # HF checkpoints only (a GGUF bias is F32: no rounding)


class FoldRecord(_Open):
    """What the fold did. Fields a manifest may lack (older bakes) have defaults and stay absent when written back."""

    family: str
    relabel: dict[str, Any] | None = None
    remote_code: RemoteCode | None = None
    biases: list[BiasRecord]
    zero_biases_added: int = 0
    tensors_split: list[str] = []
    config_changes: dict[str, Any]
    config_removed: list[str] = []
    shards_rewritten: list[str] = []
    files_copied: list[str] = []
    undo: UndoRecord | None = None
    shards: dict[SafeName, FileHash] | None = None
    """Every weight shard of the output, hashed as written (``check`` compares every byte); absent in older bakes."""


class BaseRecord(_Open):
    spec: str
    identity: Any = None
    base_model_id: str | None = None
    license: str | None = None


class RecipeRecord(_Open):
    text: str
    base_dir: str


class SampleEngine(_Strict):
    """Which engine sampled a model-sample background (``vectors.entries[].data.background.engine``)."""

    name: Literal["transformers", "llama.cpp"]
    version: str


class VectorEntry(_Open):
    """One steering vector's provenance; ``positions`` is None in manifests written before the option existed
    (they measured every token, or the reply's tokens with chat: true)."""

    name: str
    positions: Positions | None = None


class _Entries(BaseModel):
    """What both manifests (checkpoint folder, GGUF) offer every reader."""

    @property
    def entries(self) -> list[dict[str, Any]]:
        """The recipe's steering entries as measured (``bake.collection.measure``); none for a bare vector file."""
        return self.vectors.get("entries", [])

    def as_dict(self) -> dict[str, Any]:
        """The JSON-ready manifest: exactly the fields it was built or read with, in their order."""
        return self.model_dump(exclude_unset=True)


class BakeRecord(_Open, _Entries):
    """One bake: a ``bake.json`` without its history (an entry of a later bake's ``history``)."""

    format: Literal["bake-manifest/1"]
    created: str
    versions: dict[str, str]
    base: BaseRecord
    recipe: RecipeRecord | None
    vectors: dict[str, Any]
    """The vector file's metadata (``VectorSet.meta``): ``entries`` and what the collection recorded."""
    vector_file: SafePath
    fold: FoldRecord
    portable: bool
    verification: dict[str, Any]
    """``bake.verify.compare``'s report."""
    preview: list[dict[str, Any]]

    @field_validator("vectors")
    @classmethod
    def _entries_valid(cls, vectors: dict[str, Any]) -> dict[str, Any]:
        """Each entry names its vector and, when recorded, a known ``positions`` (kept as read: a dict)."""
        for entry in vectors.get("entries", []):
            VectorEntry.model_validate(entry)
        return vectors


class Manifest(BakeRecord):
    """``bake.json`` of a Hugging Face checkpoint folder: the contract inspect, unbake, rebuild, push and the card
    read. Unknown top-level fields are refused."""

    model_config = ConfigDict(extra="forbid")
    history: list[BakeRecord]
    """The bakes below this one, oldest first (a bake on top of a baked model)."""
    evaluation: dict[str, Any] | None = None
    """``bake eval``'s figures (``bake.api.evaluate_checkpoint``), once it was run."""

    def unverified(self) -> list[str]:
        """What ``check`` cannot verify for this manifest (empty for a bake that recorded every shard's hash)."""
        if self.fold.shards is not None:
            return []
        by = self.versions.get("bake", "an unknown version")
        return [
            f"file hashes not recorded (baked by bake {by}, before bake recorded them): only the folded biases and "
            "config.json were checked, not the other weights"
        ]


class GGUFBase(_Open):
    spec: str
    file: str
    sha256: str
    base_model_id: str | None = None


class GGUFCopied(_Open):
    """How much of the source the GGUF copied, and digests of it (``bake.formats.gguf.export.check``)."""

    kv_count: int
    tensor_count: int
    metadata_sha256: str | None = None
    tensor_info_sha256: str | None = None
    tensor_data_sha256: str | None = None


class GGUFManifest(_Open, _Entries):
    """The ``bake.manifest`` metadata of a steered GGUF (one file, so it names no other file bake reads)."""

    format: Literal["bake-gguf-manifest/1"]
    created: str | None = None
    base: GGUFBase
    architecture: str
    recipe: RecipeRecord | None = None
    vectors: dict[str, Any]
    biases: list[BiasRecord]
    copied: GGUFCopied
    verification: dict[str, Any] | None = None
    """Stored apart, in ``bake.verification`` (written after the file was checked), never in ``bake.manifest``."""

    def unverified(self) -> list[str]:
        """Nothing: ``check`` digests every copied byte of a GGUF."""
        return []


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


def sample_engine(entries: list[dict[str, Any]], where: str) -> str | None:
    """The engine that sampled the background of a bake's steering ``entries`` (None: no sampled background; a
    bake from before the choice was transformers'), so a rebuild samples with the same one."""
    engines = set()
    for entry in entries:
        for info in entry.get("data", {}).values():
            if info.get("kind") == "model-sample":
                record = info.get("engine", {"name": "transformers", "version": "?"})
                engines.add(validate(record, f"{where}: vectors.entries.data.engine", SampleEngine).name)
    if len(engines) > 1:
        raise BakeError(f"{where}: the backgrounds were sampled by {sorted(engines)}: a bake uses one engine")
    return next(iter(engines), None)


def read(path: str | Path) -> Manifest:
    """The manifest of the folder ``path``, validated (schema, and every file it names stays inside the folder)."""
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise BakeError(f"{str(path)!r} has no {MANIFEST}: it was not written by bake (or the manifest was removed)")
    try:
        data = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BakeError(f"{str(manifest_path)!r} is not valid JSON: the manifest was edited or truncated") from None
    if not isinstance(data, dict):
        raise BakeError(f"{str(manifest_path)!r} is not a bake manifest: use --json to see it")
    manifest = validate(data, repr(str(manifest_path)))
    names = [manifest.vector_file, *(manifest.fold.shards or {})]
    if manifest.fold.remote_code:
        names.append(manifest.fold.remote_code.file)
    if manifest.fold.undo:
        undo = manifest.fold.undo
        names += [undo.folder, *([undo.originals] if undo.originals else []), *undo.shards, *undo.written]
        names += [s.file for s in undo.shards.values()]
    for name in names:
        inside(folder, name)
    return manifest


def dumps(manifest: Manifest | GGUFManifest) -> str:
    """The text of a manifest: the one place one is serialised, checked against its schema first. ``bake.json``
    is indented; a GGUF's ``bake.manifest`` is one line with sorted keys and no verification (stored apart)."""
    data = manifest.as_dict()
    if isinstance(manifest, GGUFManifest):
        data.pop("verification", None)
        validate(data, "the manifest bake was about to write", GGUFManifest)
        return json.dumps(data, sort_keys=True)
    validate(data, "the manifest bake was about to write")
    return json.dumps(data, indent=2) + "\n"


def is_bake_folder(path: Path) -> bool:
    """Whether ``path`` is a folder bake wrote (it holds a bake manifest): what ``--force`` may replace."""
    try:
        data = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return path.is_dir() and isinstance(data, dict) and data.get("format") == "bake-manifest/1"


def _shard_problems(path: Path, shards: dict[str, FileHash]) -> list[str]:
    """Every weight shard that is not, byte for byte, the one the fold wrote (and any shard it did not write)."""
    problems = []
    for name, baked in shards.items():
        file = inside(path, name)
        if not file.is_file():
            problems.append(f"{name} is missing: the checkpoint is incomplete")
        elif file.stat().st_size != baked.size:
            problems.append(
                f"{name} is {file.stat().st_size} bytes, baked as {baked.size}: the weights were changed after baking"
            )
        elif (now := file_digest(file)["sha256"]) != baked.sha256:
            problems.append(
                f"{name} differs from the file baked (sha256 {now[:12]}…, baked {baked.sha256[:12]}…): the weights "
                "were changed after baking"
            )
    problems += [
        f"{p.name} is not a shard bake wrote: a loader may read weights that were never checked"
        for p in sorted(path.glob("*.safetensors"))
        if p.name not in shards
    ]
    return problems


def check(path: str | Path, manifest: Manifest) -> list[str]:
    """Every way the weights and config differ from what the manifest says was baked (empty: they agree): each
    folded bias recomputed from the stored vectors, and every shard's sha256 where the bake recorded them."""
    path = Path(path)
    fold = manifest.fold
    problems = _shard_problems(path, fold.shards) if fold.shards is not None else []
    vectors = VectorSet.load(inside(path, manifest.vector_file))
    ckpt = Checkpoint.open(path)
    kept = fold.undo.originals if fold.undo else None
    originals = safe_open(inside(path, kept), "pt") if kept and (path / kept).is_file() else None
    for b in fold.biases:
        info = ckpt.find(b.tensor)
        if info is None:
            problems.append(f"{b.tensor} is missing from the weights")
            continue
        v = vectors.vectors.get(parse_name(b.vector))
        if v is None:
            problems.append(f"{b.vector} is missing from {manifest.vector_file}")
            continue
        if b.had_bias and (originals is None or b.tensor not in originals.keys()):
            problems.append(f"the original value of {b.tensor} is missing from {kept or 'bake/undo'}")
            continue
        before = originals.get_tensor(b.tensor).to(torch.float32) if b.had_bias else torch.zeros_like(v)
        expected = (before + v / b.scale).to(info.torch_dtype)
        stored = info.read()
        if not torch.equal(stored, expected):
            delta = float((stored.float() - expected.float()).abs().max())
            problems.append(
                f"{b.tensor} differs from the baked value by up to {delta:.3g}: the weights were changed after baking"
            )
    config = ckpt.config
    for key, value in fold.config_changes.items():
        if config.get(key) != value:
            problems.append(
                f"config.json {key} is {config.get(key)!r}, baked as {value!r}: a stock loader may drop the steering"
            )
    module = fold.remote_code
    if module:
        code = inside(path, module.file)
        if not code.is_file():
            problems.append(f"{module.file} is missing: transformers cannot apply the steering")
        elif hashlib.sha256(code.read_bytes()).hexdigest() != module.sha256:
            problems.append(
                f"{module.file} differs from the file baked (sha256 {module.sha256[:16]}…): the code was "
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
