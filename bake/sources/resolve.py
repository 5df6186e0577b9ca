"""Where base models come from: a model spec (folder, .gguf, pkg:PACKAGE/FILE, Hub id) resolved to a local folder.

Every source is turned into a local Hugging Face folder of safetensors first
(a Hub snapshot, a local folder as is, a GGUF file dequantized once into a
cache), so folding, verification and manifests all work on one kind of input.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bake.checkpoint import require_safetensors, staged_output
from bake.errors import BakeError, OutputExists
from bake.gguffile import gguf_value, is_gguf, read_gguf
from bake.sources.hub import download

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PKG = re.compile(r"^pkg:(?P<package>[A-Za-z_][\w]*)/(?P<file>.+)$")


def cache_dir() -> Path:
    """bake's cache (converted GGUF models, sampled backgrounds); ``BAKE_CACHE`` overrides."""
    return Path(os.environ.get("BAKE_CACHE") or Path.home() / ".cache" / "bake")


@dataclass
class ModelSource:
    """A base model resolved to a local HF folder, with what identifies it for provenance."""

    spec: str
    path: Path
    identity: dict[str, Any] = field(default_factory=dict)
    gguf_license: str | None = None
    gguf: Path | None = None
    """The GGUF file the folder was dequantized from (llama.cpp samples straight from it)."""

    @property
    def license(self) -> str | None:
        """The base model's licence: its GGUF metadata, else its model card's front-matter (for the baked card)."""
        if self.gguf_license or not (self.path / "README.md").is_file():
            return self.gguf_license
        from huggingface_hub import ModelCard  # startup

        try:
            return ModelCard.load(self.path / "README.md").data.license
        except (ValueError, OSError):  # a README without valid front-matter
            return None

    @property
    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())

    @property
    def key(self) -> str:
        """A short stable hash of the identity, for cache keys."""
        return hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=16)
def _digest(path: Path, _version: tuple[int, int, int]) -> str:
    return sha256_file(path)


def file_digest(path: Path) -> str:
    """``sha256_file``, hashed once per file and version of it (mtime, size, inode) in this process: a run resolves
    its GGUF base three times, and hashing it took 0.3-0.7 s each."""
    stat = path.stat()
    return _digest(path.resolve(), (stat.st_mtime_ns, stat.st_size, stat.st_ino))


def package_file(spec: str) -> Path:
    """``pkg:PACKAGE/FILE`` → the file inside an installed package, without importing it."""
    m = _PKG.match(spec)
    assert m, spec
    found = importlib.util.find_spec(m["package"])
    if found is None or not found.submodule_search_locations:
        raise BakeError(f"package {m['package']!r} is not installed: pip install {m['package'].replace('_', '-')}")
    path = Path(list(found.submodule_search_locations)[0]) / m["file"]
    if not path.is_file():
        raise BakeError(f"{spec}: no file {m['file']!r} in package {m['package']!r}: check the file name")
    return path


def resolve_model(spec: str, revision: str | None = None, base_dir: Path | None = None) -> ModelSource:
    """Turn a model spec (folder, ``.gguf`` file, ``pkg:PACKAGE/FILE``, Hub id) into a local folder."""
    if _PKG.match(spec):
        return _from_gguf(spec, package_file(spec))
    path = Path(spec).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if is_gguf(path):
        if not path.is_file():
            raise BakeError(f"GGUF file {spec!r} not found: check the path")
        return _from_gguf(spec, path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BakeError(f"{spec!r} is a folder without config.json: give a Hugging Face model folder")
        require_safetensors(path)
        config = (path / "config.json").read_bytes()
        return ModelSource(
            spec,
            path.resolve(),
            {"kind": "local", "path": str(path.resolve()), "config_sha256": hashlib.sha256(config).hexdigest()},
        )
    if path.exists() or not _HUB_ID.match(spec):
        raise BakeError(
            f"model {spec!r} not found: give a local Hugging Face folder, a .gguf file, pkg:PACKAGE/FILE or a Hub id"
        )
    return _from_hub(spec, revision)


def _from_hub(repo_id: str, revision: str | None) -> ModelSource:
    # bake/*: a baked base keeps its own vectors and undo data, which a bake on top of it carries on.
    path = download(
        repo_id,
        revision,
        ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*", "README.md", "bake/*"],
    )
    require_safetensors(path)
    return ModelSource(repo_id, path, {"kind": "hub", "repo_id": repo_id, "commit": path.name})


def _from_gguf(spec: str, gguf: Path) -> ModelSource:
    """Dequantize a GGUF file once into a cached safetensors folder (float32, as transformers reads it)."""
    digest = file_digest(gguf)
    identity = {"kind": "gguf", "file": gguf.name, "sha256": digest}
    target = cache_dir() / "gguf" / digest[:24]
    if (target / "config.json").is_file():
        return ModelSource(spec, target, identity, _gguf_license(gguf, target), gguf)
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise BakeError(f"reading GGUF files needs the {needed!r} package: pip install 'bake[gguf]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer  # startup

    reader = read_gguf(gguf)  # a broken file is refused in one line here, not by a traceback from transformers
    try:  # a cache entry is always bake's own: a broken one is replaced
        with staged_output(target, force=True, ours=lambda p: True) as staging:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32, use_safetensors=True
            )
            # save_pretrained refuses a GGUF-quantized model; the weights are already dequantized.
            model.hf_quantizer = None
            model.config.__dict__.pop("quantization_config", None)
            model.config.__dict__.pop("_is_quantized", None)
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    except OutputExists:  # another run cached the same file meanwhile
        pass
    return ModelSource(spec, target, identity, _gguf_license(gguf, target, reader), gguf)


def _gguf_license(gguf: Path, target: Path, reader: Any = None) -> str | None:
    """The GGUF's ``general.license``, kept beside its dequantized folder: parsing the file's metadata (its whole
    vocabulary) took longer than the rest of a warm run's start."""
    kept = target.with_name(target.name + ".license.json")
    with contextlib.suppress(OSError, ValueError):
        return json.loads(kept.read_text())["license"]
    if importlib.util.find_spec("gguf") is None:  # a cached dequantized copy works without it
        return None
    value = gguf_value(reader or read_gguf(gguf), "general.license")
    value = value if isinstance(value, str) else None
    with contextlib.suppress(OutputExists), staged_output(kept, True, ours=lambda p: True, file=True) as tmp:
        tmp.write_text(json.dumps({"license": value}))  # a cache entry is bake's own
    return value
