"""The plan of one fold: every tensor and config change, shared by the fold (which fills it), the constant-bias
module (which adds to it) and unbake's undo data (which records what it replaced)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bake.checkpoint import Checkpoint
from bake.errors import BakeError


@dataclass
class FoldPlan:
    """Every change to make: tensors replaced, added and removed, and the new config."""

    ckpt: Checkpoint
    out_dtype: torch.dtype | None
    config: dict[str, Any]
    changed: dict[str, torch.Tensor] = field(default_factory=dict)
    added: dict[str, torch.Tensor] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)
    splits: dict[str, list[str]] = field(default_factory=dict)
    """Fused tensors split into parts (relabelling), so unbake can join them again."""
    records: list[dict[str, Any]] = field(default_factory=list)
    relabel: dict[str, str] | None = None
    remote: dict[str, Any] | None = None
    """The constant-bias module written (``bake.formats.hf.remote``), when a site has no stock slot."""

    def has(self, name: str) -> bool:
        return name in self.added or (name not in self.removed and self.ckpt.find(name) is not None)

    def weight(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype a tensor will have in the output (after splits and casts)."""
        if name in self.added:
            return tuple(self.added[name].shape), self.added[name].dtype
        info = self.ckpt.find(name)
        if info is None:
            raise BakeError(f"{str(self.ckpt.path)!r} has no tensor {name}: is the checkpoint complete?")
        return info.shape, self.out_dtype or info.torch_dtype

    def add_zero_bias(self, module: str) -> None:
        if not self.has(f"{module}.bias"):
            shape, dtype = self.weight(f"{module}.weight")
            self.added[f"{module}.bias"] = torch.zeros(shape[0], dtype=dtype)
