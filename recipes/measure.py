"""Measure every recipe on the default model; write recipes/results.json and recipes/README.md from it.

    python recipes/measure.py             # bake + `bake eval` every recipe (about 10 minutes on 2 CPU cores)
    python recipes/measure.py --check     # CI: re-measure, fail if a figure moved or README.md is stale
    python recipes/measure.py --render    # README.md from the committed results.json only (no model)

Each recipe is baked as `bake run` bakes it (vectors, fold, reload and verification against
the hook-steered base; no preview) into a temporary folder, then measured by `bake eval`
(`bake.api.evaluate_checkpoint`) with its own `evaluate:` section: the figures and greedy
replies of the baked checkpoint, not of hooks. Everything is seeded and greedy, so a rerun on
the same machine repeats exactly; `--check` allows a small tolerance for other CPUs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bake.api import compute_vectors, evaluate_checkpoint, fold
from bake.evaluation.evaluate import COSTS
from bake.recipe import LABELS, load_recipe
from bake.vectorfile import VectorSet

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
README = HERE / "README.md"
# The background comparison: the same cheerful data measured against a model-sampled and a written background.
SAMPLED, WRITTEN = "quickstart", "cheerful-neutral-background"
SAMPLES_SHOWN = 2
# --check: a figure may move this much on another CPU (a greedy reply that flips moves a mean by 1/prompts).
RTOL, ATOL = 0.05, 0.02
UNCOMPARED = {"seconds", "samples", "word_list", "torch"}
NAMES = {
    "vader": "VADER",
    "toxicity": "toxicity",
    "wordlist": "word rate",
    "length": "words/reply",
    "classifier": "classifier",
    "logprob_gain": "log-prob gain",
    "activation_shift": "d′",
}


def recipe_files() -> list[Path]:
    return sorted(HERE.glob("*.yaml"))


def intent(text: str) -> str:
    """A recipe's first comment line: what it is for."""
    return next(line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#"))


def measure(path: Path, work: Path) -> tuple[dict[str, Any], VectorSet]:
    """Bake one recipe (verified) and evaluate the baked checkpoint: its figures, and the vectors baked."""
    recipe = load_recipe(path)
    start = time.perf_counter()
    vectors = compute_vectors(recipe)
    out = work / path.stem
    result = fold(
        recipe.model,
        vectors,
        out,
        dtype=recipe.dtype,
        verify=recipe.verify,
        base_model_id=recipe.base_model_id,
        revision=recipe.revision,
        recipe=recipe,
    )
    baked = time.perf_counter() - start
    evaluation = evaluate_checkpoint(out)
    entries = [
        {k: e[k] for k in ("name", "layer", "method", "coefficient", "relative_norm", "unscaled_norm")}
        for e in result.manifest.entries
    ]
    return {
        "file": path.name,
        "intent": intent(recipe.text),
        "entries": entries,
        "verification": {k: result.verification[k] for k in ("passed", "max_abs_logit_diff")},
        "seconds": {"bake": round(baked, 1), "eval": round(time.perf_counter() - start - baked, 1)},
        "evaluation": {k: v for k, v in evaluation.items() if k != "created"},
    }, vectors


def background_comparison(sampled: VectorSet, written: VectorSet) -> dict[str, float]:
    """How far the written background moves the cheerful vector: the angle between the two vectors, and
    the gap between the two background means relative to the vector (both unscaled by their coefficients)."""
    (vs,), (vw,) = (
        [v.double() / e["coefficient"] for v, e in zip(s.vectors.values(), s.meta["entries"])]
        for s in (sampled, written)
    )
    return {"cosine": float(vs @ vw / (vs.norm() * vw.norm())), "background_gap": float((vs - vw).norm() / vs.norm())}


def run_all() -> dict[str, Any]:
    results, vectors = {}, {}
    with tempfile.TemporaryDirectory(prefix="bake-recipes-") as work:
        for path in recipe_files():
            print(f"[measure] {path.name}", file=sys.stderr, flush=True)
            results[path.stem], vectors[path.stem] = measure(path, Path(work))
    return {
        "model": load_recipe(recipe_files()[0]).model,
        "torch": torch.__version__,
        "backgrounds": background_comparison(vectors[SAMPLED], vectors[WRITTEN]),
        "recipes": results,
    }


def fmt(value: Any) -> str:
    """Three decimals below 1 (rates, KL, log-probabilities), three significant digits above."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1 else f"{value:.3g}"
    return str(value)


def one_line(text: str) -> str:
    return " ".join(text.split())


def order(name: str) -> tuple:
    """The quickstart first, the background variant last, the rest by name."""
    return (name != SAMPLED, name == WRITTEN, name)


def change(ev: dict[str, Any], key: str) -> str:
    return f"{fmt(ev['base'].get(key))} → **{fmt(ev['steered'].get(key))}**" if key in ev["steered"] else "–"


def render(data: dict[str, Any]) -> str:
    """recipes/README.md, from results.json alone."""
    recipes = data["recipes"]
    lines = [
        "# Recipes",
        "",
        "<!-- Generated by `python recipes/measure.py` from results.json: edit the recipes or the script, not this "
        "file. -->",
        "",
        f"Every recipe bakes the default model (`{data['model']}`, SmolLM2-135M-Instruct) and was measured by",
        "`python recipes/measure.py`: each recipe is baked and verified as `bake run` does it, then the baked",
        "checkpoint is measured against the base by `bake eval` with the recipe's own `evaluate:` section",
        "(held-out prompts and held-out target texts, greedy replies, seeded). CI re-measures them all",
        "(`--check`) and fails if a figure moves. Each recipe's comments say its intent, its data and how its",
        "layer and coefficient were chosen; `calibration/` holds the `bake sweep` tables behind those choices.",
        "",
        "**Effect**: the recipe's headline measure, base → baked. **KL**: KL(base ‖ baked) per token on neutral",
        "text, nats (the budget is 0.5). **ppl**: perplexity on neutral text. **rep.**: repeated-trigram rate of",
        "the replies. **log-prob gain**: nats per token of held-out target texts. **d′**: held-out target vs",
        "neutral texts along the vector, in pooled standard deviations.",
        "",
        "| recipe | behaviour | held out | layer | coef. | ‖v‖ / ‖h‖ | effect | KL | ppl | rep. | log-prob gain | d′ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(recipes, key=order):
        r = recipes[name]
        ev, e, info = r["evaluation"], r["entries"][0], r["evaluation"]["data"]
        head = ev["headline"]
        lines.append(
            f"| [`{name}`]({r['file']}) | {r['intent']} | {info['prompts']} prompts × {info['tokens']} tokens, "
            f"{info.get('target_texts', 0)} texts | {e['layer']} | {fmt(float(e['coefficient']))} | "
            f"{fmt(e['relative_norm'])} | {NAMES.get(head, head)}: {change(ev, head)} | {fmt(ev['steered']['kl'])} | "
            f"{change(ev, 'perplexity')} | {change(ev, 'repetition')} | {fmt(ev['steered'].get('logprob_gain'))} | "
            f"{fmt(ev['steered'].get('activation_shift'))} |"
        )
    lines += ["", "Other effects measured (base → baked):", ""]
    for name in sorted(recipes, key=order):
        ev = recipes[name]["evaluation"]
        rest = [k for k in ev["steered"] if k not in (*COSTS, ev["headline"], "logprob_gain", "activation_shift")]
        if rest:
            lines.append(f"- `{name}`: " + "; ".join(f"{LABELS.get(k, k)} {change(ev, k)}" for k in rest))
    sampled, written, bg = recipes[SAMPLED]["evaluation"], recipes[WRITTEN]["evaluation"], data["backgrounds"]
    lines += [
        "",
        "## Background: sampled by the model vs written",
        "",
        f"The same cheerful data at layer {recipes[SAMPLED]['entries'][0]['layer']}, centred on two backgrounds: "
        f"`{SAMPLED}` subtracts the mean over text SmolLM2 samples itself, `{WRITTEN}` the mean over "
        "`data/neutral.txt` (433 project-written sentences). Each coefficient was chosen the same way "
        "(the largest whose KL stays within 0.5).",
        "",
        "| background | coef. | ‖v‖ / ‖h‖ | KL | ppl | rep. | VADER | log-prob gain | d′ |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| (base) | | | 0 | {fmt(sampled['base']['perplexity'])} | {fmt(sampled['base']['repetition'])} | "
        f"{fmt(sampled['base']['vader'])} | 0 | |",
    ]
    for name, ev in ((SAMPLED, sampled), (WRITTEN, written)):
        e = recipes[name]["entries"][0]
        lines.append(
            f"| `{name}` | {fmt(float(e['coefficient']))} | {fmt(e['relative_norm'])} | {fmt(ev['steered']['kl'])} | "
            f"{fmt(ev['steered']['perplexity'])} | {fmt(ev['steered']['repetition'])} | "
            f"{fmt(ev['steered'].get('vader'))} | {fmt(ev['steered'].get('logprob_gain'))} | "
            f"{fmt(ev['steered'].get('activation_shift'))} |"
        )
    s, w = sampled["steered"], written["steered"]
    lines += [
        "",
        f"The two vectors share a direction only in part: cosine **{bg['cosine']:.3f}** between them, and the two "
        f"background means differ by {bg['background_gap']:.2f} of the sampled-background vector's norm. The same "
        f"rule gives both coefficient {fmt(float(recipes[WRITTEN]['entries'][0]['coefficient']))}, but the written "
        "background's vector is "
        f"{recipes[WRITTEN]['entries'][0]['relative_norm'] / recipes[SAMPLED]['entries'][0]['relative_norm']:.2f}× as "
        f"long and costs more for the same sentiment: KL {fmt(w['kl'])} against {fmt(s['kl'])}, perplexity "
        f"{fmt(w['perplexity'])} against {fmt(s['perplexity'])}, held-out cheerful text log-probability "
        f"{fmt(w['logprob_gain'])} against {fmt(s['logprob_gain'])} nats/token, for VADER {fmt(w['vader'])} against "
        f"{fmt(s['vader'])}. A likely reason: subtracting plain written sentences also leaves in the vector how the "
        "model's chat replies differ from them, which the model-sampled background, being the model's own text, "
        "removes. (Word rates are left out here: each recipe derives its word list against its own background.)",
        "",
        "## Samples",
        "",
        f"The first {SAMPLES_SHOWN} held-out prompts of each recipe, greedy, base and baked (from the same `bake "
        "eval`).",
        "",
    ]
    for name in sorted(recipes, key=order):
        lines += [f"### `{name}`", ""]
        for sample in recipes[name]["evaluation"]["samples"][:SAMPLES_SHOWN]:
            lines += [
                f"> {one_line(sample['prompt'])}",
                "",
                f"- **base**: {one_line(sample['base'])}",
                f"- **baked**: {one_line(sample['steered'])}",
                "",
            ]
    return "\n".join(lines).rstrip("\n").replace("\n\n\n", "\n\n") + "\n"


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Figures of ``new`` that differ from ``old`` beyond the tolerance. Replies and word lists are not
    compared (a greedy reply may flip on another CPU; the figures that summarise the replies are)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = [f"{where}/{k}: in one measurement only" for k in sorted((old.keys() ^ new.keys()) - UNCOMPARED)]
        return out + [
            d
            for k in sorted((old.keys() & new.keys()) - UNCOMPARED)
            for d in differences(old[k], new[k], f"{where}/{k}")
        ]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{where}[{i}]")]
    if isinstance(old, float) or isinstance(new, float):
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (old, new))
        if numbers and math.isclose(old, new, rel_tol=RTOL, abs_tol=ATOL):
            return []
    return [] if old == new else [f"{where}: {old!r} committed, {new!r} now"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="re-measure and compare with results.json and README.md")
    mode.add_argument("--render", action="store_true", help="only write README.md from results.json")
    args = parser.parse_args()
    if args.render:
        README.write_text(render(json.loads(RESULTS.read_text())))
        return
    data = run_all()
    if not args.check:
        RESULTS.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        README.write_text(render(data))
        return
    committed = json.loads(RESULTS.read_text())
    problems = differences(committed, data)
    if README.read_text() != render(committed):
        problems.append("recipes/README.md is not rendered from results.json: run python recipes/measure.py --render")
    for p in problems:
        print(f"MISMATCH {p}")
    if problems:
        sys.exit(
            f"{len(problems)} difference(s) from the committed recipe measurements: run python recipes/measure.py and "
            "commit"
        )
    print(f"recipes/results.json reproduced ({len(data['recipes'])} recipes), README.md current")


if __name__ == "__main__":
    main()
