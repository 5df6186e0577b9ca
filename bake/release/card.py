"""The model card (README.md) of a baked checkpoint, built from its manifest."""

from __future__ import annotations

import json
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from bake.families.hf import Wrapper, family_named, portability_table
from bake.manifest import Manifest, RemoteCode
from bake.recipe import LABELS

TAGS = ["steering", "bake", "activation-steering"]
REMOTE_TAGS = ["custom_code"]  # the Hub's tag for repositories whose model needs trust_remote_code


def _remote_block(remote: RemoteCode) -> str:
    """The warning a constant-bias-module checkpoint carries at the top of its card."""
    engines = f"{', '.join(remote.not_applied_by[:-1])} and {remote.not_applied_by[-1]}"
    return f"""
> **Not portable.** This checkpoint loads only with `trust_remote_code=True` in
> transformers: `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.
> Without it, transformers loads the stock `{remote.base_architecture}`, lists the
> `bake_steering` tensors as unexpected keys and runs the model **unsteered**. vLLM applies
> the steering only with `trust_remote_code=True` (`LLM(path, trust_remote_code=True)`).
> {engines} will not apply the steering: do not serve this checkpoint with them.

{remote.why} The vectors are therefore carried by a small constant-bias module:
`{remote.file}` (sha256 `{remote.sha256[:16]}…`, written by bake) defines
`{remote.class_name}`, the stock `{remote.base_architecture}` plus one constant parameter
`bake_steering.bias` per steering point, added by a forward hook to the output of the module
that joins the residual stream there (`config.json` → `bake_steering` says where). Every
original weight is unchanged; the biases are extra tensors in `model-bake-steering.safetensors`.
"""


_POSITIONS = {"all": "every token", "last": "last token", "reply": "reply tokens"}


def _positions(entry: dict[str, Any]) -> str:
    """Which positions were averaged (a manifest older than the option: every token, or the reply with chat)."""
    positions = entry.get("positions")
    if positions is None:
        chat = any(info.get("chat") for info in entry.get("data", {}).values())
        positions = "reply" if chat else "all"
    return _POSITIONS[positions]


def _vector_rows(manifest: Manifest) -> list[str]:
    rows = [
        "| name | layer | site | method | measured at | coefficient | norm | norm / mean residual norm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in manifest.entries:
        rows.append(
            f"| {e['name']} | {e['layer']} | {e['site']} | {e['method']} | {_positions(e)} | {e['coefficient']:g} | "
            f"{e['norm']:.3g} | {e['relative_norm']:.3g} |"
        )
    for e in manifest.entries:
        if "layer_auto" in e:
            a = e["layer_auto"]
            rows.append(
                f"\n`{e['name']}`'s layer was chosen by `layer: auto`: {a['chosen']} of {a['layers']}, the most "
                f"{a['headline']} ({a['goal']}) within KL {a['max_kl']:g} in one sweep (`bake.json`: `layer_auto`)."
            )
    return rows


def _data_rows(manifest: Manifest) -> list[str]:
    """Every text set a vector was measured on: enough to tell whether a rebuild used the same data."""
    rows = ["| vector | role | source | texts | tokens counted | sha256 |", "|---|---|---|---|---|---|"]
    for e in manifest.entries:
        for role, info in e["data"].items():
            source = "sampled from the model" if info["kind"] == "model-sample" else info["kind"]
            rows.append(
                f"| {e['name']} | {role} | {source} | {info['texts']} | {e['counts'][role]['tokens']} | "
                f"`{info['sha256'][:16]}…` |"
            )
    return rows


def _evaluation_block(manifest: Manifest) -> str:
    """The figures of ``bake eval`` (``manifest.evaluation``), when it was run."""
    ev = manifest.evaluation
    if not ev:
        return ""
    fmt = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
    rows = [f"| {LABELS.get(k, k)} | {fmt(ev['base'].get(k))} | {fmt(v)} |" for k, v in ev["steered"].items()]
    budget = "within" if ev["within_budget"] else "**over**"
    return (
        f"\n## Evaluation\n\nMeasured by `bake eval` ({ev['created']}) on {ev['data']['prompts']} held-out prompts "
        f"({ev['data']['tokens']} greedy tokens each) and {ev['data']['neutral_texts']} neutral texts; the KL is "
        f"{budget} the budget of {ev['max_kl']:g}. Details and sample replies are in `bake.json` (`evaluation`).\n\n"
        "| measure | base | steered |\n|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def _compare_block(manifest: Manifest) -> str:
    """The methods ``evaluate.compare.on_run`` compared at the KL budget, and its verdict, for each entry it ran on."""
    blocks = []
    for e in manifest.entries:
        c = e.get("compare")
        if not c:
            continue
        headline = c["headline"]
        rows = [f"| {r['method']} | {r['coefficient']:.3g} | {r['kl']:.3g} | {r[headline]:.3g} |" for r in c["rows"]]
        verdict = c["verdict"] or f"no method clearly beats {e['method']} on {headline}"
        blocks.append(
            f"`{e['name']}`: each method at the largest coefficient whose KL is within {c['max_kl']:g} "
            f"(base {headline}: {c['base']:.3g}). {verdict[0].upper() + verdict[1:]}.\n\n"
            f"| method | coefficient | KL | {LABELS.get(headline, headline)} |\n|---|---|---|---|\n" + "\n".join(rows)
        )
    return "\n## Method comparison\n\n" + "\n\n".join(blocks) + "\n" if blocks else ""


def _history_block(manifest: Manifest) -> str:
    if not manifest.history:
        return ""
    rows = [
        f"{i + 1}. {', '.join(e['name'] for e in h.entries) or 'a vector file'} "
        f"(baked {h.created}, layers {', '.join(str(b.layer) for b in h.fold.biases)})"
        for i, h in enumerate(manifest.history)
    ]
    return (
        "\n## History\n\nThis checkpoint was baked on top of an already baked one; earlier bakes, oldest first:\n\n"
        + "\n".join(rows)
        + "\n\n`bake unbake` removes the latest bake exactly and restores the one below it.\n"
    )


def _remote_engines(remote: RemoteCode) -> str:
    """Which servers run the constant-bias module, as the fold recorded it."""
    refused = " and ".join(remote.not_applied_by)
    vllm = "" if "vLLM" in remote.not_applied_by else "vLLM runs it with `trust_remote_code=True`; "
    return f"{vllm}{refused} do not run the constant-bias module: do not serve this checkpoint with them."


def _loading_block(repo: str, family_name: str, remote: RemoteCode | None) -> str:
    """How to run it in transformers, vLLM and llama.cpp, as far as each applies the steering."""
    if remote:
        return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo}")
```

{_remote_engines(remote)}
"""
    family = family_named(family_name)
    llama_cpp = family is not None and family.llama_cpp.startswith(("loads it", "tested"))
    wrapper = family.wrapper if family is not None else None
    gguf = (
        f"""
**llama.cpp** (convert once; the biases map by name to `blk.N.ffn_down.bias` / `blk.N.attn_output.bias`):

```bash
python convert_hf_to_gguf.py {repo.split("/")[-1]} --outfile steered.gguf
llama-cli -m steered.gguf -p "Tell me about your day."
```
"""
        if llama_cpp
        else f"\nllama.cpp: {family.llama_cpp if family else 'not checked'} for this family.\n"
    )
    transformers = (
        f"""from transformers import AutoProcessor, {wrapper.architecture}
model = {wrapper.architecture}.from_pretrained("{repo}")
processor = AutoProcessor.from_pretrained("{repo}")"""
        if wrapper
        else f"""from transformers import pipeline
pipe = pipeline("text-generation", model="{repo}")
print(pipe([{{"role": "user", "content": "Tell me about your day."}}], max_new_tokens=40)[0]["generated_text"])"""
    )
    return f"""**transformers**

```python
{transformers}
```

**vLLM** (OpenAI-compatible server; the steering is in the weights, no flags):

```bash
vllm serve {repo}
curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
  -d '{{"model": "{repo}", "messages": [{{"role": "user", "content": "Tell me about your day."}}]}}'
```
{gguf}"""


def _where_it_runs(family_name: str) -> str:
    family = family_named(family_name)
    if family is None:
        return "Not recorded for this family."
    return (
        portability_table([family]) + '\n\n"(source)" means read from the vLLM 0.33.0 and llama.cpp 0c1e570 '
        'sources, not run; "tested" means verified by bake\'s tests.'
    )


def _written_as(relabel: dict[str, str], wrapper: Wrapper | None) -> str:
    """What a relabel rewrote: the checkpoint, or a wrapper's language model inside its stock class."""
    if wrapper:
        return (
            f"its language model (`text_config`) is written as `model_type: {relabel['to']}` inside the stock "
            f"`{wrapper.architecture}`"
        )
    return f"this checkpoint is written as `{relabel['architecture']}` (`model_type: {relabel['to']}`)"


def render(manifest: Manifest, repo_id: str | None = None) -> str:
    """README.md text: YAML front-matter for the Hub, then what was steered, on what data, how it was checked
    and how to run it (``repo_id``: the Hub repository it is pushed to, for the loading snippets)."""
    base = manifest.base
    fold = manifest.fold
    remote = fold.remote_code
    family = family_named(fold.family)
    wrapper = family.wrapper if family is not None else None
    data = ModelCardData(
        base_model=base.base_model_id,
        license=base.license,
        tags=TAGS + (REMOTE_TAGS if remote else []),
        library_name="transformers",
        pipeline_tag=wrapper.pipeline_tag if wrapper else "text-generation",
    )
    ver = manifest.verification
    biases = "\n".join(f"- `{b.tensor}` ← vector `{b.vector}` (norm {b.norm:.4g})" for b in fold.biases)
    changes = ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in fold.config_changes.items()) or "none"
    if fold.config_removed:
        changes += "; removed: " + ", ".join(f"`{k}`" for k in fold.config_removed)
    relabel = fold.relabel
    relabel_block = (
        f"\n## Architecture relabelled\n\nThe base model is a `{relabel['from']}` model. "
        f"{relabel['why'][0].upper()}{relabel['why'][1:]}, so {_written_as(relabel, wrapper)}, whose stock code "
        "has the bias slot. "
        "Verification compared it with the original class steered by hooks.\n"
        if relabel
        else ""
    )
    if remote:
        intro = f"""This checkpoint has activation-steering vectors **baked into it** by
[bake](https://pypi.org/project/bake/): a constant vector added to the residual
stream. Its family ({fold.family}) has no stock bias that could carry it, so it
needs the small module below and `trust_remote_code=True`.
{_remote_block(remote)}"""
        loader = "`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`"
    else:
        intro = f"""This checkpoint has activation-steering vectors **folded into its weights** by
[bake](https://pypi.org/project/bake/): a constant vector added to the residual
stream, stored as a bias. It needs no hooks, no extra code and no
`trust_remote_code`; it loads and runs like its base model ({fold.family} family)."""
        loader = f"plain `{wrapper.architecture if wrapper else 'AutoModelForCausalLM'}.from_pretrained`"
    zero_block = (
        ""
        if remote and not fold.zero_biases_added
        else (
            f" {fold.zero_biases_added} zero bias tensors were\nadded because that flag makes loaders create them "
            "(zeros, not uninitialised memory)."
        )
    )
    recipe = manifest.recipe
    recipe_block = f"\n## Recipe\n\n```yaml\n{recipe.text.rstrip()}\n```\n" if recipe else ""
    entries = manifest.entries
    data_block = (
        (
            "\n## Data\n\nWhat each vector was measured on (sha256 over the texts, in order):\n\n"
            + "\n".join(_data_rows(manifest))
            + "\n"
        )
        if entries
        else ""
    )
    body = f"""
# Steered {base.base_model_id or base.spec}

{intro}

## Steering

{chr(10).join(_vector_rows(manifest)) if entries else "Vectors from a vector file (no recipe); see `bake.json`."}

The bias acts at **every position**, the prompt and the first token included.
"Measured at" says which tokens of its texts each vector was averaged over (the
first position, padding and special tokens always excluded): every token (where
it will act), the reply's tokens (chat), or each text's last token (where a
function vector is read; it still acts everywhere).
"Norm / mean residual norm" compares the vector with the typical size of the
residual stream it is added to.

Tensors written:
{biases}

Config changes: {changes}.{zero_block}
{relabel_block}{data_block}{_compare_block(manifest)}
## Verification

The checkpoint was reloaded from disk with {loader}
and compared with the base model steered by forward hooks, in {ver["dtype"]}:

| measure | value |
|---|---|
| probe prompts | {ver["prompts"]} |
| max abs logit difference | {ver["max_abs_logit_diff"]:.3e} (tolerance {ver["atol"]:.0e}) |
| greedy continuations ({ver["greedy_tokens"]} tokens) | {"identical" if ver["greedy_identical"] else "different"} |
| steering effect (max abs logit change vs base) | {ver["steering_effect"]:.3g} |
| result | {"passed" if ver["passed"] else "FAILED"} |
{_evaluation_block(manifest)}{_history_block(manifest)}
## Where the steering loads

{_where_it_runs(fold.family)}

## How to load

{_loading_block(repo_id or "PATH_OR_REPO_ID", fold.family, remote)}{recipe_block}
## Provenance

`bake.json` holds the recipe, the base model's identity, data hashes, package
versions and every figure above; `bake/vectors.safetensors` holds the exact
vectors, and the sha256 of every weight file. `bake inspect` checks the weights
against them (it names any edited file or bias), and `bake unbake` restores the
base model bit for bit from `bake/undo/`.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").content
