"""bake's vector file: the interchange format between computing and folding.

A safetensors file whose tensors are named ``layer.<L>`` (added after block L)
or ``layer.<L>.mid`` (added after block L's attention), each a float32 vector
of the model's hidden size, coefficient already applied: exactly what gets
added. JSON metadata lives under the safetensors metadata key ``bake``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from bake.checkpoint import staged_output
from bake.errors import BakeError
from bake.families.hf import Site

_NAME = re.compile(r"^layer\.(\d+)(\.mid)?$")
Point = tuple[int, Site]


def tensor_name(layer: int, site: Site) -> str:
    return f"layer.{layer}" + (".mid" if site == "resid_mid" else "")


def parse_name(name: str) -> Point:
    m = _NAME.match(name)
    if not m:
        raise BakeError(f"vector file tensor {name!r} is not named layer.<L> or layer.<L>.mid: rename it")
    return int(m[1]), "resid_mid" if m[2] else "resid_post"


def is_vector_file(path: Path) -> bool:
    """Whether ``path`` is a vector file bake wrote (safetensors with ``bake`` metadata): what ``--force`` may
    replace."""
    try:
        with safe_open(path, framework="pt") as f:
            return "bake" in (f.metadata() or {})
    except (SafetensorError, OSError):
        return False


@dataclass
class VectorSet:
    """Vectors keyed by (layer, site), plus free-form provenance metadata."""

    vectors: dict[Point, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vectors = {p: v.detach().to(torch.float32).reshape(-1).contiguous() for p, v in self.vectors.items()}
        for (layer, site), v in self.vectors.items():
            if not torch.isfinite(v).all():
                raise BakeError(f"vector {tensor_name(layer, site)} contains NaN or inf: recompute it")

    @property
    def hidden_size(self) -> int:
        sizes = {v.numel() for v in self.vectors.values()}
        if len(sizes) != 1:
            raise BakeError(f"vectors have different sizes {sorted(sizes)}: one file is for one model")
        return sizes.pop()

    def check_model(self, hidden_size: int, num_layers: int, where: str = "vector file") -> None:
        """Refuse vectors that cannot belong to this model."""
        if self.hidden_size != hidden_size:
            raise BakeError(
                f"{where}: vectors have size {self.hidden_size} but the model's hidden size is {hidden_size}: "
                "use vectors computed for this model"
            )
        for layer, _ in self.vectors:
            if not 0 <= layer < num_layers:
                raise BakeError(
                    f"{where}: layer {layer} is outside the model's blocks 0..{num_layers - 1}: pick a layer in range"
                )

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write atomically and without replacing anything but, with ``force``, a vector file (``staged_output``)."""
        path = Path(path)
        tensors = {tensor_name(*p): v for p, v in sorted(self.vectors.items())}
        with staged_output(path, force, ours=is_vector_file, file=True) as tmp:
            save_file(tensors, tmp, metadata={"bake": json.dumps(self.meta, sort_keys=True)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> VectorSet:
        path = Path(path)
        if not path.is_file():
            raise BakeError(f"vector file {str(path)!r} not found: check the path")
        try:
            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("bake", "{}"))
                names = {name: parse_name(name) for name in f.keys()}
                vectors = {point: f.get_tensor(name) for name, point in names.items()}
        except (SafetensorError, json.JSONDecodeError, OSError) as e:
            raise BakeError(
                f"{str(path)!r} is not a readable safetensors vector file ({e.__class__.__name__})"
            ) from None
        if not isinstance(meta, dict):
            raise BakeError(
                f"{str(path)!r}: its 'bake' metadata is {type(meta).__name__} JSON, not an object: "
                "write the file with bake vector or VectorSet.save"
            )
        if len(vectors) != len(names):  # layer.2 and layer.02 name the same point: refuse rather than drop one
            same = [n for n, p in names.items() if list(names.values()).count(p) > 1]
            raise BakeError(f"{str(path)!r} holds {' and '.join(sorted(same))} for the same point: keep one of them")
        if not vectors:
            raise BakeError(f"vector file {str(path)!r} holds no vectors")
        for p, v in vectors.items():
            if v.dim() != 1 or not v.is_floating_point():
                raise BakeError(f"vector {tensor_name(*p)} in {str(path)!r} is not a 1-D float vector")
        try:
            return cls(vectors, meta)
        except BakeError as e:
            raise BakeError(f"{str(path)!r}: {e}") from None
