"""Which llama.cpp architectures take a steering bias in a GGUF file, kept as data.

A GGUF is loaded by llama.cpp's loader for its ``general.architecture``. A bias the
loader creates carries a steering vector exactly: the graph adds it to the sublayer
output that joins the residual stream (``build_attn`` / ``build_ffn``,
src/llama-graph.cpp:2829, :1952), like the Hugging Face slots in
``bake.families.hf``. A tensor the loader does not create makes llama.cpp refuse
the whole file ("wrong number of tensors", src/llama-model-loader.cpp:1398), so those
architectures are refused before anything is computed, with what to do instead.

Read from llama.cpp 0c1e570, the copy llama-cpp-python 0.3.36 vendors and compiles
(what the tests run); every entry names the lines. Adding an architecture is one entry
here plus its test.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bake.errors import BakeError
from bake.families.hf import Site

LLAMA_CPP = "llama.cpp 0c1e570 (vendored by llama-cpp-python 0.3.36)"


@dataclass(frozen=True)
class GGUFArchitecture:
    """Where llama.cpp's loader for one ``general.architecture`` lets a constant join the residual stream."""

    sites: Mapping[Site, str]
    """Bias tensor per site, ``{layer}`` to fill in."""
    source: str
    """The llama.cpp lines where the loader creates the bias and the graph adds it."""
    always_present: bool
    """The loader requires the bias (every file has one, and steering is added to it) instead of accepting it
    optionally."""
    when: Mapping[Site, Mapping[str, Any]] = field(default_factory=dict)
    """Metadata values (keys without the ``<arch>.`` prefix) under which a site's bias exists."""
    scale: str | None = None
    """Metadata key by which the sublayer output, bias included, is multiplied before the residual add."""
    missing: Mapping[Site, str] = field(default_factory=dict)
    """Why a site has no bias."""


DEFAULTS = {"expert_count": 0}
"""What llama.cpp assumes when a file leaves a metadata key out."""

_PARALLEL = (
    "attention and MLP run in parallel on the block input, so there is no mid-block residual: use site 'resid_post'"
)
_BOTH = {"resid_post": "blk.{layer}.ffn_down.bias", "resid_mid": "blk.{layer}.attn_output.bias"}
_DENSE = {"resid_post": {"expert_count": 0}}  # MoE blocks have no ffn_down bias

GGUF_ARCHITECTURES: Mapping[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture(
        _BOTH,
        "optional: src/models/llama.cpp:57 (attn_output), :76 (ffn_down, dense blocks)",
        always_present=False,
        when=_DENSE,
    ),
    "granite": GGUFArchitecture(
        _BOTH,
        "optional: src/models/granite.cpp:82, :101 (dense blocks); the sublayer output is multiplied by "
        "residual_scale after its bias (:250-251, :310-311)",
        always_present=False,
        when=_DENSE,
        scale="residual_scale",
    ),
    "gpt2": GGUFArchitecture(_BOTH, "required: src/models/gpt2.cpp:41, :47", always_present=True),
    "bloom": GGUFArchitecture(_BOTH, "required: src/models/bloom.cpp:48, :54", always_present=True),
    "starcoder2": GGUFArchitecture(_BOTH, "required: src/models/starcoder2.cpp:41, :50", always_present=True),
    "gptneox": GGUFArchitecture(
        _BOTH,
        "required: src/models/gptneox.cpp:70, :76; parallel residual branch at :143",
        always_present=True,
        when={"resid_mid": {"use_parallel_residual": False}},
    ),
    "phi2": GGUFArchitecture(
        {"resid_post": "blk.{layer}.ffn_down.bias"},
        "required: src/models/phi2.cpp:33, :36; attention and MLP in parallel (:116-117)",
        always_present=True,
        missing={"resid_mid": _PARALLEL},
    ),
}

_NO_SLOT = "its loader creates no attn_output or ffn_down bias, so llama.cpp would refuse the file"
_POST_NORM = (
    "a norm sits between each sublayer and the residual stream, so no bias there adds a constant, and the loader has "
    "none"
)
_VIA_HF = (
    "bake a Hugging Face checkpoint (bake fold MODEL VECTORS -o DIR writes it as LlamaForCausalLM), convert it with "
    "llama.cpp's convert_hf_to_gguf.py and quantize it with llama-quantize"
)
_AT_RUNTIME = (
    "steer it at run time with llama.cpp's --control-vector, or bake a Hugging Face checkpoint for transformers"
)

REFUSED: Mapping[str, tuple[str, str]] = {
    "qwen2": (f"{_NO_SLOT} (src/models/qwen2.cpp:39-45)", _VIA_HF),
    "phi3": (f"{_NO_SLOT} (src/models/phi3.cpp:47-51)", _VIA_HF),
    "qwen3": (f"{_NO_SLOT} (src/models/qwen3.cpp:37-44)", _AT_RUNTIME),
    "gemma": (f"{_NO_SLOT} (src/models/gemma.cpp:28-33)", _AT_RUNTIME),
    "falcon": (f"{_NO_SLOT} (src/models/falcon.cpp:39-42)", _AT_RUNTIME),
    "gemma2": (f"{_POST_NORM} (attn_post_norm, ffn_post_norm: src/models/gemma2.cpp:46, :52)", _AT_RUNTIME),
    "gemma3": (f"{_POST_NORM} (attn_post_norm, ffn_post_norm: src/models/gemma3.cpp:61, :69)", _AT_RUNTIME),
    "olmo2": (f"{_POST_NORM} (attn_post_norm, ffn_post_norm: src/models/olmo2.cpp:45, :50)", _AT_RUNTIME),
    "gptj": (
        "llama.cpp has no model for it (not in llama_model_mapping, src/llama-model.cpp)",
        "use a Hugging Face checkpoint",
    ),
}
"""Architectures bake's families map to whose llama.cpp loader has no steering bias: (why, what to do instead)."""


def lookup(arch: str | None, where: str) -> GGUFArchitecture:
    """The entry for a file's ``general.architecture``, or a one-line refusal saying why and what to do instead."""
    if arch in GGUF_ARCHITECTURES:
        return GGUF_ARCHITECTURES[arch]
    if arch in REFUSED:
        why, instead = REFUSED[arch]
        raise BakeError(
            f"{where}: llama.cpp cannot take steering biases for GGUF architecture {arch!r}: {why}; instead, {instead}"
        )
    raise BakeError(
        f"{where}: GGUF architecture {arch!r} is not one bake has checked in llama.cpp's source (supported: "
        f"{', '.join(GGUF_ARCHITECTURES)}): bake a Hugging Face checkpoint instead"
    )


def bias_name(arch: str, layer: int, site: Site, metadata: Callable[[str], Any], where: str) -> str:
    """The bias llama.cpp adds at (layer, site) of this file (``metadata(key)`` reads ``<arch>.<key>``), or a
    refusal."""
    entry = lookup(arch, where)
    name = entry.sites.get(site)
    if name is None:
        raise BakeError(f"{where}: {arch} has no bias for site {site!r}: {entry.missing.get(site, 'no stock bias')}")
    for key, want in entry.when.get(site, {}).items():
        have = metadata(key)
        have = DEFAULTS.get(key) if have is None else have
        if have != want:
            raise BakeError(
                f"{where}: {arch}.{key} is {have!r}, and llama.cpp's {arch} loader has the {site} bias only "
                f"when it is {json.dumps(want)}: steer the other site or bake a Hugging Face checkpoint"
            )
    return name.format(layer=layer)


def gguf_table() -> str:
    """docs/gguf.md's table of GGUF architectures, from the data above (a test keeps the page in step)."""
    rows = [
        "| `general.architecture` | after block L (`resid_post`) | after attention (`resid_mid`) | llama.cpp 0c1e570 |",
        "|---|---|---|---|",
    ]
    for arch, a in GGUF_ARCHITECTURES.items():
        cells = []
        for site in ("resid_post", "resid_mid"):
            name = a.sites.get(site)
            text = f"`{name.format(layer='L')}`" if name else "none"
            if name and a.when.get(site):
                text += " when " + ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in a.when[site].items())
            if name and a.scale:
                text += f" (÷ `{a.scale}`)"
            cells.append(text)
        rows.append(f"| `{arch}` | {cells[0]} | {cells[1]} | {a.source} |")
    rows += [f"| `{arch}` | refused | refused | {why} |" for arch, (why, _) in REFUSED.items()]
    return "\n".join(rows)
