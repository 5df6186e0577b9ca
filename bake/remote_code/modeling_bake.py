"""Steering vectors baked in by bake as a constant-bias module (transformers remote code).

bake (https://pypi.org/project/bake/) writes this file, unchanged, into every checkpoint
whose architecture has no stock bias slot where a steering vector joins the residual
stream. Everything model-specific is in the checkpoint's config.json, e.g.::

    "architectures": ["BakeSteeredGemma3ForCausalLM"],
    "auto_map": {"AutoModelForCausalLM": "modeling_bake.BakeSteeredGemma3ForCausalLM"},
    "bake_steering": {
        "format": "bake-steering/1",
        "base_architecture": "Gemma3ForCausalLM",
        "blocks": "model.layers",
        "points": [{"layer": 6, "site": "resid_post", "hook": "", "tensor": "model.layers.6.bake_steering"}]
    }

``BakeSteered<Base>`` is the stock transformers class ``<Base>`` plus, for each point, a
persistent buffer ``bake_steering`` (hidden size, the model's dtype) on the module whose
output joins the residual stream there (``hook``, a path relative to block ``layer`` of
``blocks``; "" is the block itself), and a forward hook adding that buffer to the module's
output (to its first element when the output is a tuple). The buffers are ordinary
checkpoint tensors, saved and loaded with the weights.

Load with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``. Without
``trust_remote_code=True`` transformers loads the stock ``<Base>`` and ignores the buffers
(it lists them as unexpected keys): that model is NOT steered. vLLM, TGI and llama.cpp do
not run this file and do not apply the steering.
"""

import torch
import transformers

PREFIX = "BakeSteered"
BUFFER = "bake_steering"
FORMAT = "bake-steering/1"


def _add_steering(module, _args, output):
    """Forward hook: the module's output plus its steering buffer."""
    vector = getattr(module, BUFFER)
    if isinstance(output, tuple):
        return (output[0] + vector.to(output[0].dtype),) + tuple(output[1:])
    return output + vector.to(output.dtype)


def _install(model, config, base_name):
    spec = getattr(config, "bake_steering", None)
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ValueError(f"config.bake_steering is missing or not {FORMAT!r}: this checkpoint was not written by bake")
    if spec["base_architecture"] != base_name:
        raise ValueError(f"config.bake_steering names {spec['base_architecture']!r} but the class subclasses {base_name!r}")
    blocks = model.get_submodule(spec["blocks"])
    hidden = config.get_text_config().hidden_size
    for point in spec["points"]:
        layer = point["layer"]
        if not 0 <= layer < len(blocks):
            raise ValueError(f"steering point at layer {layer} but the model has {len(blocks)} blocks")
        module = blocks[layer].get_submodule(point["hook"]) if point["hook"] else blocks[layer]
        if hasattr(module, BUFFER):
            raise ValueError(f"two steering points share the module {spec['blocks']}.{layer}.{point['hook']}")
        module.register_buffer(BUFFER, torch.zeros(hidden), persistent=True)
        module.register_forward_hook(_add_steering)


def _steered_class(name, base):
    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        _install(self, config, base.__name__)

    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name,
                                "__doc__": f"{base.__name__} with bake's steering vectors added (see config.bake_steering)."})


_CLASSES = {}


def __getattr__(name):
    """``BakeSteered<Base>ForCausalLM``: made on first use from the stock class ``<Base>ForCausalLM``."""
    if name.startswith(PREFIX) and name.endswith("ForCausalLM"):
        base = getattr(transformers, name[len(PREFIX):], None)
        if isinstance(base, type) and issubclass(base, transformers.PreTrainedModel):
            if name not in _CLASSES:
                _CLASSES[name] = _steered_class(name, base)
            return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
