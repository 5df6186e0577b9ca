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
from typing import Any

import torch
from safetensors import safe_open

from bake.checkpoint import Checkpoint
from bake.errors import BakeError
from bake.vectorfile import VectorSet, parse_name

MANIFEST = "bake.json"


def read(path: str | Path) -> dict[str, Any]:
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise BakeError(f"{str(path)!r} has no {MANIFEST}: it was not written by bake (or the manifest was removed)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise BakeError(f"{str(manifest_path)!r} is not valid JSON: the manifest was edited or truncated") from None
    if not isinstance(manifest, dict):
        raise BakeError(f"{str(manifest_path)!r} is not a bake manifest: use --json to see it")
    return manifest


def check(path: str | Path, manifest: dict[str, Any]) -> list[str]:
    """Every way the weights and config differ from what the manifest says was baked (empty: they agree)."""
    path = Path(path)
    problems = []
    try:
        vectors = VectorSet.load(path / manifest["vector_file"])
        biases = manifest["fold"]["biases"]
        config_changes = manifest["fold"]["config_changes"]
    except (KeyError, TypeError) as e:
        raise BakeError(f"{str(path)!r}: the manifest lacks {e}: it is incomplete") from None
    ckpt = Checkpoint.open(path)
    kept = manifest["fold"].get("undo", {}).get("originals")
    originals = safe_open(path / kept, "pt") if kept and (path / kept).is_file() else None
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
            problems.append(f"{b['tensor']} differs from the baked value by up to {delta:.3g}: the weights were changed after baking")
    config = ckpt.config
    for key, value in config_changes.items():
        if config.get(key) != value:
            problems.append(f"config.json {key} is {config.get(key)!r}, baked as {value!r}: a stock loader may drop the steering")
    module = manifest["fold"].get("remote_code")
    if module:
        code = path / module["file"]
        if not code.is_file():
            problems.append(f"{module['file']} is missing: transformers cannot apply the steering")
        elif hashlib.sha256(code.read_bytes()).hexdigest() != module["sha256"]:
            problems.append(f"{module['file']} differs from the file baked (sha256 {module['sha256'][:16]}…): the code was changed after baking")
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
