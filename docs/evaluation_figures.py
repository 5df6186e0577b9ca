"""docs/evaluation.md's measured blocks (sweep, coefficient: auto, compare on the quickstart), from
docs/evaluation.json, which a real run on SmolLM2 writes; nothing in them is typed by hand.

    python docs/evaluation_figures.py && python docs/figures.py --render   # measure on SmolLM2 (batched), render

``BLOCKS`` maps each block NAME of docs/evaluation.md to the function rendering it from the JSON alone; docs/figures.py
renders every figures block of every page, and tests/test_readme.py checks each is its rendering.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "evaluation.json"
DOC = ROOT / "docs" / "evaluation.md"
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
SWEEP = {"layers": [6, 9, 12, 15], "coefficients": [0.5, 1.0, 1.5, 2.0, 3.0]}
METHODS = {
    "mean-centred": "mean-centred",
    "mean": "mean (uncentred)",
    "actadd": "ActAdd ({positive} − {negative})",
    "contrast": "contrast (cheerful − gloomy)",
}
FIGURES = ("kl", "perplexity", "repetition", "vader", "wordlist", "logprob_gain", "activation_shift")


def _figures(row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: row[k] for k in keys if k in row}


def measure() -> dict[str, Any]:
    """Sweep, coefficient: auto and compare on the quickstart, as ``bake sweep``/``bake compare`` run them."""
    sys.path.insert(0, str(ROOT))
    import importlib.metadata

    from bake.api import compute_vectors
    from bake.evaluation.sweep import compare, sweep
    from bake.recipe import load_recipe, parse_recipe

    recipe = load_recipe(QUICKSTART)
    with tempfile.TemporaryDirectory() as tmp:
        swept = sweep(recipe, Path(tmp) / "sweep", SWEEP["layers"], SWEEP["coefficients"])
        compared = compare(recipe, Path(tmp) / "compare")
    auto_recipe = parse_recipe(
        QUICKSTART.read_text().replace("coefficient: 1.25", "coefficient: auto"), QUICKSTART.parent
    )
    (entry,) = compute_vectors(auto_recipe).meta["entries"]
    keys = ("layer", "coefficient", "relative_norm", *FIGURES)
    spec = recipe.evaluate.compare
    return {
        "recipe": "recipes/quickstart.yaml",
        "model": recipe.base_model_id,
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "transformers")},
        "data": {k: swept.data.info[k] for k in ("prompts", "tokens", "neutral_texts", "target_texts")},
        "sweep": {
            **SWEEP,
            "base": _figures(swept.base, FIGURES),
            "rows": [_figures(r, keys) for r in swept.rows],
        },
        "auto": {k: entry["auto"][k] for k in ("max_kl", "chosen", "kl", "perplexity", "base_perplexity", "grid")}
        | {"layer": entry["layer"]},
        "compare": {
            "layer": recipe.steering[0].layer,
            "max_kl": recipe.evaluate.max_kl,
            "prompt_pair": [spec.positive_prompt, spec.negative_prompt],
            "base": _figures(compared.base, FIGURES),
            "rows": [_figures(r, ("method", *keys)) for r in compared.rows],
        },
    }


def _g(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}g}" if abs(x) < 10 ** (digits + 1) else f"{x:.0f}"


def _cell(row: dict[str, Any]) -> str:
    return f"{row['vader']:.2f} / {_g(row['kl'])}"


def render_sweep(results: dict[str, Any]) -> str:
    """The layer x coefficient table (VADER / KL) and the figures the text around it quotes."""
    s, d = results["sweep"], results["data"]
    at = {(r["layer"], r["coefficient"]): r for r in s["rows"]}
    last = max(s["layers"])
    lines = [
        f"Measured on the quickstart ({results['model']}, {d['prompts']} built-in held-out prompts × {d['tokens']} "
        f"tokens, {d['neutral_texts']} neutral texts, the {d['target_texts']} held-out cheerful replies of "
        f"`data/cheerful.heldout.txt`; torch {results['versions']['torch']}, transformers "
        f"{results['versions']['transformers']}). `bake sweep recipes/quickstart.yaml --layers "
        f"{','.join(map(str, s['layers']))} --coefficients {','.join(f'{c:g}' for c in s['coefficients'])}`, "
        f"VADER of the replies / KL (base: VADER {s['base']['vader']:.3f}):",
        "",
        "| layer | " + " | ".join(f"{c:g}" for c in s["coefficients"]) + " |",
        "|---|" + "---|" * len(s["coefficients"]),
        *(f"| {layer} | " + " | ".join(_cell(at[layer, c]) for c in s["coefficients"]) + " |" for layer in s["layers"]),
        "",
        f"At layer {last} the held-out cheerful replies' log-probability changes by "
        + ", ".join(f"{at[last, c]['logprob_gain']:+.2f} nats/token at {c:g}" for c in s["coefficients"][:3])
        + f"; perplexity on neutral text goes {s['base']['perplexity']:.1f} → "
        + " → ".join(f"{at[last, c]['perplexity']:.1f} (c = {c:g})" for c in s["coefficients"][1::2])
        + f"; repetition {s['base']['repetition']:.3f} → "
        + " → ".join(f"{at[last, c]['repetition']:.3f}" for c in s["coefficients"])
        + ".",
    ]
    a = results["auto"]
    fits = [g for g in a["grid"] if g["coefficient"] > a["chosen"]]
    nxt = f" ({fits[0]['coefficient']:g} gives {fits[0]['kl']:.3g})" if fits else ""
    lines += [
        "",
        f"`coefficient: auto` with `max_kl: {a['max_kl']:g}` on the default grid picks **{a['chosen']:g}** at layer "
        f"{a['layer']} (KL {a['kl']:.3g}{nxt}; perplexity {a['base_perplexity']:.1f} → {a['perplexity']:.1f}).",
    ]
    return "\n".join(lines)


def render_compare(results: dict[str, Any]) -> str:
    """The methods at the same KL budget."""
    c = results["compare"]
    positive, negative = c["prompt_pair"]
    header = (
        "| method | coefficient | ‖v‖ / mean residual norm | KL | perplexity | repetition | VADER | word rate | "
        "log-prob gain | activation shift (d′) |"
    )
    b = c["base"]
    lines = [
        f"`bake compare recipes/quickstart.yaml` (layer {c['layer']}, KL budget {c['max_kl']:g}):",
        "",
        header,
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| base | | | 0 | {b['perplexity']:.1f} | {b['repetition']:.3f} | {b['vader']:.3f} | {b['wordlist']:.3f} "
        "| 0 | |",
    ]
    for r in c["rows"]:
        name = METHODS[r["method"]].format(positive=positive, negative=negative)
        lines.append(
            f"| {name} | {r['coefficient']:.3g} | {r['relative_norm']:.2g} | {r['kl']:.2g} | {r['perplexity']:.1f} "
            f"| {r['repetition']:.3f} | {r['vader']:.3f} | {r['wordlist']:.3f} | {r['logprob_gain']:.3f} "
            f"| {r['activation_shift']:.3g} |"
        )
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[dict[str, Any]], str]] = {
    "evaluation-sweep": render_sweep,
    "evaluation-compare": render_compare,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    RESULTS.write_text(json.dumps(measure(), indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}: now python docs/figures.py --render")


if __name__ == "__main__":
    main()
