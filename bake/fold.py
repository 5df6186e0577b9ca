"""Fold steering vectors into bias tensors of a checkpoint (the tensor edits only).

A constant added to the residual stream at a site equals a bias on the linear
that feeds the residual there (``architectures``). Arithmetic is done in
float32 and cast back to the checkpoint's dtype (as peft's merge does), and a
non-finite result is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bake.architectures import Family, Site, family_for
from bake.checkpoint import Checkpoint, copy_side_files, write_checkpoint
from bake.errors import BakeError
from bake.models import DTYPES
from bake.vectorfile import VectorSet, tensor_name


@dataclass
class FoldPlan:
    changed: dict[str, torch.Tensor] = field(default_factory=dict)
    added: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)


def text_config(path: Path):
    """The transformers config of the language model part (normalises GPT-2's n_embd etc.)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path).get_text_config()
    except (ValueError, KeyError, OSError) as e:
        raise BakeError(f"{str(path)!r}: transformers cannot read its config.json ({e}): upgrade transformers or fix the file") from None


def block_prefix(ckpt: Checkpoint, family: Family, module: str) -> str:
    """How the checkpoint names the blocks (``model.layers`` or, in older files, ``layers``)."""
    parts = family.blocks.split(".")
    for i in range(len(parts)):
        prefix = ".".join(parts[i:])
        if ckpt.find(f"{prefix}.0.{module}.weight") is not None:
            return prefix
    raise BakeError(f"{str(ckpt.path)!r}: no tensor {family.blocks}.0.{module}.weight: is this really a {family.name} checkpoint?")


def plan_fold(ckpt: Checkpoint, vectors: VectorSet, out_dtype: torch.dtype | None = None) -> FoldPlan:
    """Work out every tensor and config change that bakes ``vectors`` into ``ckpt``."""
    config = ckpt.config
    family = family_for(config.get("model_type", ""))
    cfg = text_config(ckpt.path)
    vectors.check_model(cfg.hidden_size, cfg.num_hidden_layers)
    plan = FoldPlan(config=dict(config))
    sites: set[Site] = {site for _, site in vectors.vectors}
    for (layer, site), v in sorted(vectors.vectors.items()):
        slot = family.slot(site)
        prefix = block_prefix(ckpt, family, slot.linear)
        weight = ckpt.find(f"{prefix}.{layer}.{slot.linear}.weight")
        name = f"{prefix}.{layer}.{slot.linear}.bias"
        info = ckpt.find(name)
        dtype = out_dtype or weight.torch_dtype
        before = info.read().to(torch.float32) if info is not None else torch.zeros_like(v)
        if before.shape != v.shape:
            raise BakeError(f"{name} has shape {tuple(before.shape)} but the vector has {tuple(v.shape)}: wrong model?")
        exact = before + v
        stored = exact.to(dtype)
        if not torch.isfinite(stored).all():
            raise BakeError(f"folding {tensor_name(layer, site)} into {name} overflows {dtype}: lower the coefficient or use float32")
        (plan.changed if info is not None else plan.added)[name] = stored
        plan.records.append(
            {
                "vector": tensor_name(layer, site),
                "layer": layer,
                "site": site,
                "tensor": name,
                "had_bias": info is not None,
                "norm": float(v.norm()),
                "rounding_error": float((stored.to(torch.float32) - exact).abs().max()),
            }
        )
    for site in sorted(sites):
        slot = family.slot(site)
        plan.config.update(slot.flags)
        prefix = block_prefix(ckpt, family, slot.linear)
        for layer in range(cfg.num_hidden_layers):
            for linear in slot.zero_biases:
                name = f"{prefix}.{layer}.{linear}.bias"
                if ckpt.find(name) is None and name not in plan.added:
                    weight = ckpt.find(f"{prefix}.{layer}.{linear}.weight")
                    plan.added[name] = torch.zeros(weight.shape[0], dtype=out_dtype or weight.torch_dtype)
    if out_dtype is not None:
        name = next(k for k, v in DTYPES.items() if v == out_dtype)
        plan.config["dtype"] = name
        if "torch_dtype" in plan.config:
            plan.config["torch_dtype"] = name
    return plan


def fold_checkpoint(source: Path, vectors: VectorSet, out: Path, out_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Write ``source`` with ``vectors`` baked in into the empty folder ``out``; never touches ``source``.

    Returns what was done, for the manifest.
    """
    ckpt = Checkpoint.open(source)
    plan = plan_fold(ckpt, vectors, out_dtype)
    rewritten = write_checkpoint(ckpt, out, plan.changed, plan.added, plan.config, cast=out_dtype)
    copied = copy_side_files(source, out, skip={"config.json", "README.md", "bake.json"})
    return {
        "family": family_for(plan.config["model_type"]).name,
        "biases": plan.records,
        "zero_biases_added": len(plan.added) - sum(not r["had_bias"] for r in plan.records),
        "config_changes": {k: v for k, v in plan.config.items() if ckpt.config.get(k) != v},
        "shards_rewritten": rewritten,
        "files_copied": copied,
    }
