"""The model card (README.md) of a baked checkpoint, built from its manifest."""

from __future__ import annotations

import json
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from bake.architectures import family_named, portability

TAGS = ["steering", "bake", "activation-steering"]
REMOTE_TAGS = ["custom_code"]  # the Hub's tag for repositories whose model needs trust_remote_code


def _remote_block(remote: dict[str, Any]) -> str:
    """The warning a constant-bias-module checkpoint carries at the top of its card."""
    return f"""
> **Not portable.** This checkpoint loads only with `trust_remote_code=True` in
> transformers: `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.
> Without it, transformers loads the stock `{remote['base_architecture']}`, lists the
> `bake_steering` tensors as unexpected keys and runs the model **unsteered**.
> {', '.join(remote['not_applied_by'][:-1])} and {remote['not_applied_by'][-1]} will not apply the steering: do not serve this checkpoint with them.

{remote['why']} The vectors are therefore carried by a small constant-bias module:
`{remote['file']}` (sha256 `{remote['sha256'][:16]}…`, written by bake) defines
`{remote['class']}`, the stock `{remote['base_architecture']}` plus one buffer
`bake_steering` per steering point, added by a forward hook to the output of the module
that joins the residual stream there (`config.json` → `bake_steering` says where). Every
original weight is unchanged; the buffers are extra tensors in `model-bake-steering.safetensors`.
"""


def _vector_rows(manifest: dict[str, Any]) -> list[str]:
    rows = ["| name | layer | site | method | coefficient | norm | norm / mean residual norm | texts (tokens) |", "|---|---|---|---|---|---|---|---|"]
    for e in manifest["vectors"].get("entries", []):
        counts = ", ".join(f"{role} {c['texts']} ({c['tokens']})" for role, c in e["counts"].items())
        rows.append(
            f"| {e['name']} | {e['layer']} | {e['site']} | {e['method']} | {e['coefficient']:g} | {e['norm']:.3g} | "
            f"{e['relative_norm']:.3g} | {counts} |"
        )
    return rows


def _where_it_runs(family_name: str) -> str:
    family = family_named(family_name)
    return ("Loads in " + portability(family) + ". \"(source)\" means read from the vLLM 0.33.0 and llama.cpp "
            "0c1e570 sources, not tested.") if family else "Not recorded for this family."


def render(manifest: dict[str, Any]) -> str:
    """README.md text: YAML front-matter for the Hub, then what was steered and how it was checked."""
    base = manifest["base"]
    fold = manifest["fold"]
    remote = fold.get("remote_code")
    data = ModelCardData(
        base_model=base.get("base_model_id"),
        tags=TAGS + (REMOTE_TAGS if remote else []),
        library_name="transformers",
        pipeline_tag="text-generation",
    )
    ver = manifest["verification"]
    biases = "\n".join(f"- `{b['tensor']}` ← vector `{b['vector']}` (norm {b['norm']:.4g})" for b in fold["biases"])
    changes = ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in fold["config_changes"].items()) or "none"
    if fold.get("config_removed"):
        changes += "; removed: " + ", ".join(f"`{k}`" for k in fold["config_removed"])
    relabel = fold.get("relabel")
    relabel_block = (
        f"\n## Architecture relabelled\n\nThe base model is a `{relabel['from']}` model. {relabel['why'][0].upper()}{relabel['why'][1:]}, "
        f"so this checkpoint is written as `{relabel['architecture']}` (`model_type: {relabel['to']}`), whose stock "
        "code has the bias slot. Verification compared it with the original class steered by hooks.\n"
        if relabel else ""
    )
    if remote:
        intro = f"""This checkpoint has activation-steering vectors **baked into it** by
[bake](https://pypi.org/project/bake/): a constant vector added to the residual
stream. Its family ({fold['family']}) has no stock bias that could carry it, so it
needs the small module below and `trust_remote_code=True`.
{_remote_block(remote)}"""
        loader, load_kwargs = "`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`", ", trust_remote_code=True"
    else:
        intro = f"""This checkpoint has activation-steering vectors **folded into its weights** by
[bake](https://pypi.org/project/bake/): a constant vector added to the residual
stream, stored as a bias. It needs no hooks, no extra code and no
`trust_remote_code`; it loads and runs like its base model ({fold['family']} family)."""
        loader, load_kwargs = "plain `AutoModelForCausalLM.from_pretrained`", ""
    zero_block = "" if remote and not fold["zero_biases_added"] else (
        f" {fold['zero_biases_added']} zero bias tensors were\nadded because that flag makes loaders create them "
        "(zeros, not uninitialised memory)."
    )
    recipe = manifest.get("recipe")
    recipe_block = f"\n## Recipe\n\n```yaml\n{recipe['text'].rstrip()}\n```\n" if recipe else ""
    body = f"""
# Steered {base.get('base_model_id') or base['spec']}

{intro}

## Steering

{chr(10).join(_vector_rows(manifest))}

The bias acts at **every position**, the prompt and the first token included,
so each vector was measured at every counted token of its texts (the first
position, padding and special tokens excluded), i.e. where it will act.

Tensors written:
{biases}

Config changes: {changes}.{zero_block}
{relabel_block}{recipe_block}
## Verification

The checkpoint was reloaded from disk with {loader}
and compared with the base model steered by forward hooks, in {ver['dtype']}:

| measure | value |
|---|---|
| probe prompts | {ver['prompts']} |
| max abs logit difference | {ver['max_abs_logit_diff']:.3e} (tolerance {ver['atol']:.0e}) |
| greedy continuations ({ver['greedy_tokens']} tokens) | {'identical' if ver['greedy_identical'] else 'different'} |
| steering effect (max abs logit change vs base) | {ver['steering_effect']:.3g} |
| result | {'passed' if ver['passed'] else 'FAILED'} |

## Where the steering loads

{_where_it_runs(fold['family'])}

## How to load

```python
from transformers import pipeline
pipe = pipeline("text-generation", model="PATH_OR_REPO_ID"{load_kwargs})
print(pipe("Tell me about your day.", max_new_tokens=40)[0]["generated_text"])
```

Provenance (recipe, data hashes, package versions, vector norms) is in `bake.json`;
the exact vectors are in `bake/vectors.safetensors` (`bake inspect` reads both).
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").content
