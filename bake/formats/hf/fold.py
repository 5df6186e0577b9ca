"""Fold steering vectors into bias tensors of a checkpoint (the tensor edits only).

A constant added to the residual stream at a site equals a bias on the module
that feeds the residual there (``architectures``). Arithmetic is done in
float32 and cast back to the checkpoint's dtype (as peft's merge does), and a
non-finite result is refused. Families without a stock slot but with an exact
stock equivalent (Mistral, Qwen2, Phi-3 → Llama) are relabelled first. Sites with
no stock slot at all are refused, or with ``allow_remote_code`` carried by a
constant-bias module (``bake.formats.hf.remote``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bake.checkpoint import Checkpoint, copy_side_files, write_checkpoint
from bake.errors import BakeError
from bake.families.hf import Family, Slot, head_dim
from bake.formats.hf import remote
from bake.formats.hf.plan import FoldPlan
from bake.formats.hf.undo import save_undo
from bake.manifest import FoldRecord
from bake.sources import trust
from bake.sources.load import DTYPES, family_at, text_config
from bake.vectorfile import VectorSet, tensor_name

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def block_prefix(ckpt: Checkpoint, family: Family) -> str:
    """How the checkpoint names the blocks (``model.layers`` or, in older files, ``layers``; in a multimodal
    wrapper ``language_model.model.layers`` or ``model.language_model.layers``)."""
    names = list(ckpt.names())
    candidates = family.stored_blocks()
    for prefix in candidates:
        if any(n.startswith(prefix + ".0.") for n in names):
            return prefix
    raise BakeError(
        f"{str(ckpt.path)!r}: no tensor named {candidates[0]}.0.*: is this really a {family.name} checkpoint?"
    )


def _relabel(plan: FoldPlan, family: Family, cfg: PretrainedConfig, prefix: str) -> None:
    """Rewrite config (a wrapper's text config) and tensors as the stock family that computes the same function."""
    relabel = family.relabel
    text = family.text_section(plan.config)
    reason = relabel.refuse(cfg)
    if reason:
        raise BakeError(
            f"{family.name} has no bias slot and cannot be relabelled exactly as {relabel.architecture}: {reason}."
        )
    for key in relabel.drop_keys + ("auto_map",):
        text.pop(key, None)
    text.update(relabel.set_keys)
    text.update(
        model_type=relabel.to,
        architectures=[relabel.architecture],
        rope_parameters=cfg.rope_parameters,
        head_dim=head_dim(cfg),
    )
    for layer in range(cfg.num_hidden_layers):
        for fused, (parts, sizes) in relabel.splits.items():
            name = f"{prefix}.{layer}.{fused}.weight"
            info = plan.ckpt.find(name)
            pieces = info.read().split(sizes(cfg), dim=0)
            plan.splits[name] = [f"{prefix}.{layer}.{part}.weight" for part in parts]
            for part, piece in zip(plan.splits[name], pieces):
                plan.added[part] = piece.to(plan.out_dtype or piece.dtype).clone()
            plan.removed.add(name)
        for module in relabel.zero_biases:
            plan.add_zero_bias(f"{prefix}.{layer}.{module}")
    plan.relabel = {
        "from": family.model_types[0],
        "to": relabel.to,
        "architecture": relabel.architecture,
        "why": relabel.why,
    }


def _bias_tensor(plan: FoldPlan, slot: Slot, block: str) -> tuple[str, str]:
    """(bias, weight) tensor names of the first of the slot's modules this block has (DeepSeek-V2: dense or MoE)."""
    for module in (slot.bias, *slot.or_bias):
        name, weight = f"{block}.{slot.tensor(module)}", f"{block}.{module}.weight"
        if plan.has(name) or plan.has(weight):
            return name, weight
    raise BakeError(f"{str(plan.ckpt.path)!r} has no tensor {block}.{slot.bias}.weight: is the checkpoint complete?")


def plan_fold(
    ckpt: Checkpoint, vectors: VectorSet, out_dtype: torch.dtype | None = None, allow_remote_code: bool = False
) -> FoldPlan:
    """Work out every tensor and config change that bakes ``vectors`` into ``ckpt``.

    A site without a stock bias slot is refused, unless ``allow_remote_code``: its
    vectors then go into a constant-bias module (sites with a slot still use the bias).
    """
    trust.refuse_steered_source(ckpt.config, repr(str(ckpt.path)))
    cfg = text_config(ckpt.path)
    family = family_at(ckpt.path)
    vectors.check_model(cfg.hidden_size, cfg.num_hidden_layers)
    find_slot = family.slot if allow_remote_code else family.bias_slot
    slots = {site: find_slot(site, cfg) for _, site in vectors.vectors}
    plan = FoldPlan(ckpt, out_dtype, copy.deepcopy(ckpt.config))  # a wrapper's text config is a nested dict
    prefix = block_prefix(ckpt, family)
    if family.relabel:
        _relabel(plan, family, cfg, prefix)
    without_slot = []
    for (layer, site), v in sorted(vectors.vectors.items()):
        slot = slots[site]
        if slot.bias is None:
            without_slot.append((layer, site, v))
            continue
        name, weight = _bias_tensor(plan, slot, f"{prefix}.{layer}")
        info = ckpt.find(name)
        dtype = (plan.out_dtype or info.torch_dtype) if info is not None else plan.weight(weight)[1]
        before = info.read().to(torch.float32) if info is not None else torch.zeros_like(v)
        if before.shape[-1:] != v.shape:  # one row per expert (gpt-oss) or one bias
            raise BakeError(f"{name} has shape {tuple(before.shape)} but the vector has {tuple(v.shape)}: wrong model?")
        delta = v / getattr(cfg, slot.scale) if slot.scale else v
        exact = before + delta
        stored = exact.to(dtype)
        if not torch.isfinite(stored).all():
            raise BakeError(
                f"folding {tensor_name(layer, site)} into {name} overflows {dtype}: "
                "lower the coefficient or use float32"
            )
        (plan.changed if info is not None else plan.added)[name] = stored
        plan.records.append(
            {
                "vector": tensor_name(layer, site),
                "layer": layer,
                "site": site,
                "tensor": name,
                "had_bias": info is not None,
                "scale": getattr(cfg, slot.scale) if slot.scale else 1.0,
                "norm": float(v.norm()),
                "rounding_error": float((stored.to(torch.float32) - exact).abs().max()),
            }
        )
    for slot in slots.values():
        family.text_section(plan.config).update(slot.flags)
        for layer in range(cfg.num_hidden_layers):
            for module in slot.zero_biases:
                plan.add_zero_bias(f"{prefix}.{layer}.{module}")
            for module in slot.zero_biases_if_present:
                if plan.has(f"{prefix}.{layer}.{module}.weight"):
                    plan.add_zero_bias(f"{prefix}.{layer}.{module}")
    if family.vllm_architecture:
        plan.config["architectures"] = [family.vllm_architecture]  # a constant-bias module below names its own
    if without_slot:
        remote.add_module(plan, family, cfg, prefix, without_slot)
    if out_dtype is not None:
        name = next(k for k, v in DTYPES.items() if v == out_dtype)
        plan.config["dtype"] = name
        if "torch_dtype" in plan.config:
            plan.config["torch_dtype"] = name
    return plan


def fold_checkpoint(
    source: Path,
    vectors: VectorSet,
    out: Path,
    out_dtype: torch.dtype | None = None,
    link: bool = False,
    allow_remote_code: bool = False,
) -> FoldRecord:
    """Write ``source`` with ``vectors`` baked in into the empty folder ``out``; never touches ``source``.

    ``link`` hard-links unchanged shards instead of copying them; ``allow_remote_code``
    lets sites without a stock bias slot use a constant-bias module (``bake.formats.hf.remote``).
    What the output no longer holds is kept in ``bake/undo`` (``bake.formats.hf.undo``).
    Returns what was done, for the manifest (with every shard's sha256, hashed as written).
    """
    ckpt = Checkpoint.open(source)
    plan = plan_fold(ckpt, vectors, out_dtype, allow_remote_code)
    placed, rewritten, digests = write_checkpoint(
        ckpt, out, plan.changed, plan.added, plan.config, cast=out_dtype, removed=plan.removed, link=link
    )
    written = [trust.MODELING_FILE] if plan.remote else []
    copied = copy_side_files(source, out, skip={"config.json", "README.md", "bake.json", *written})
    if plan.remote:
        remote.write_code(out)
    undo = save_undo(plan, placed, rewritten, out, written)
    new_biases = sum(not r["had_bias"] and not r.get("remote_code") for r in plan.records)
    return FoldRecord(
        family=family_at(source).name,
        relabel=plan.relabel,
        remote_code=plan.remote,
        biases=plan.records,
        zero_biases_added=sum(k.endswith(".bias") for k in plan.added) - new_biases,
        tensors_split=sorted(plan.removed),
        config_changes={k: v for k, v in plan.config.items() if ckpt.config.get(k) != v},
        config_removed=sorted(k for k in ckpt.config if k not in plan.config),
        shards_rewritten=rewritten,
        files_copied=copied,
        undo=undo,
        shards=dict(sorted(digests.items())),
    )
