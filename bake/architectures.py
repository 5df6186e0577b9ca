"""Where each model family lets a constant join the residual stream, kept as data.

A steering vector added to the residual stream at a *site* equals a bias on the
linear layer whose output is added to the residual there with nothing in
between. This module is the only place that knows those layers: adding a
family is one `Family` entry (plus its test), never an if-chain elsewhere.

Sites:
- ``resid_post``: after block L (the default; vector-file tensor ``layer.<L>``).
- ``resid_mid``: after block L's attention sublayer, before its MLP
  (vector-file tensor ``layer.<L>.mid``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from bake.errors import BakeError

Site = Literal["resid_post", "resid_mid"]
SITES: tuple[Site, ...] = ("resid_post", "resid_mid")


@dataclass(frozen=True)
class Slot:
    """The bias that realises a site, and what a stock loader needs to keep it."""

    linear: str
    """Module path, relative to a block, of the linear whose bias carries the vector."""
    hook: str
    """Module path, relative to a block, whose output (first element) is what joins the
    residual at this site; "" means the block itself. Verification steers here."""
    flags: Mapping[str, Any] = field(default_factory=dict)
    """Config entries that make stock loaders create (and so load) the bias."""
    zero_biases: tuple[str, ...] = ()
    """Linears, relative to every block, whose bias the flags also switch on. Missing
    ones are written as explicit zeros: loaders elsewhere allocate them uninitialised."""


@dataclass(frozen=True)
class Family:
    """One architecture family: where its blocks live and its slot per site."""

    name: str
    model_types: tuple[str, ...]
    blocks: str
    """Attribute path of the block ModuleList from the *ForCausalLM model."""
    sites: Mapping[Site, Slot]
    notes: str = ""

    def slot(self, site: Site) -> Slot:
        if site not in self.sites:
            other = [s for s in self.sites if s != site]
            alt = f"use site {other[0]!r} instead" if other else "no other site is available"
            raise BakeError(f"{self.name} has no exact bias slot for site {site!r}: {alt}.")
        return self.sites[site]


_LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")

FAMILIES: tuple[Family, ...] = (
    Family(
        name="GPT-2",
        model_types=("gpt2",),
        blocks="transformer.h",
        sites={
            "resid_post": Slot(linear="mlp.c_proj", hook=""),
            "resid_mid": Slot(linear="attn.c_proj", hook="attn"),
        },
        notes="Every linear already has a bias; the vector is added to the existing one.",
    ),
    Family(
        name="Llama",
        model_types=("llama",),
        blocks="model.layers",
        sites={
            "resid_post": Slot(
                linear="mlp.down_proj", hook="", flags={"mlp_bias": True}, zero_biases=_LLAMA_MLP
            ),
            "resid_mid": Slot(
                linear="self_attn.o_proj",
                hook="self_attn",
                flags={"attention_bias": True},
                zero_biases=_LLAMA_ATTN,
            ),
        },
        notes="Llama, SmolLM2 and other `llama` checkpoints: `mlp_bias` also creates gate/up "
        "biases, written as zeros.",
    ),
)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str) -> Family:
    """The family of a config's ``model_type``, or a refusal naming what is supported."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise BakeError(
        f"model_type {model_type!r} has no supported bias slot in bake: supported model types "
        f"are {', '.join(supported_model_types())}."
    )
