"""The paper's genre and toxicity experiments (Jorgensen et al. 2023, arXiv 2312.03813), via ``bake compare``.

    python recipes/paper/compare.py                        # measure all; write recipes/paper/compare.json, the page
    python recipes/paper/compare.py --recipes fantasy      # re-measure some recipes, keep the others' records
    python recipes/paper/compare.py --render               # docs/paper.md's blocks from compare.json alone

Each recipe (the three genre recipes, recipes/paper/toxicity/toxicity.yaml) goes through ``bake.evaluation.sweep.
compare``: mean-centred, uncentred mean, ActAdd and contrast on the recipe's data and layer, each at the largest
coefficient whose KL on neutral text is within the recipe's ``evaluate.max_kl``, scored by the recipe's scorers on its
held-out prompts. ``verdicts`` says, from the numbers alone, where mean-centring wins, ties or loses.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = HERE / "compare.json"
PAGE = ROOT / "docs" / "paper.md"
RECIPES = {
    "fantasy": ROOT / "recipes" / "fantasy.yaml",
    "scifi": ROOT / "recipes" / "scifi.yaml",
    "sports": ROOT / "recipes" / "sports.yaml",
    "toxicity": HERE / "toxicity" / "toxicity.yaml",
}
GENRES = ["fantasy", "scifi", "sports"]
METHODS = ["mean-centred", "mean", "actadd", "contrast"]
KEEP = (
    "coefficient",
    "relative_norm",
    "kl",
    "perplexity",
    "repetition",
    "wordlist",
    "toxicity",
    "vader",
    "logprob_gain",
    "activation_shift",
)
# The paper's qualitative results (GPT-2 family, scored with a toxicity classifier), in words: its figures are not
# transcribed here.
PAPER = {
    "genres": "mean-centred vectors steer story continuations toward the target genre (more genre words) better "
    "than the uncentred vectors it is compared with",
    "toxicity": "mean-centring lowers the toxicity of the continuations while keeping them coherent, better than "
    "the uncentred vectors it is compared with",
}

Adapt = Callable[[dict[str, Any]], dict[str, Any]]


def _keep(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in KEEP if k in row}


def measure_recipe(path: Path, out: Path, adapt: Adapt | None = None) -> dict[str, Any]:
    """``bake compare`` on one recipe (``adapt`` rewrites its parsed YAML first: a tiny model for the tests)."""
    sys.path.insert(0, str(ROOT))
    from bake.evaluation.sweep import compare
    from bake.recipe import parse_recipe

    data = yaml.safe_load(path.read_text())
    recipe = parse_recipe(yaml.safe_dump(adapt(data) if adapt else data), path.parent, str(path))
    started = time.time()
    report = compare(recipe, out, force=True)
    record = json.loads((out / "compare.json").read_text())
    spec = recipe.evaluate.compare
    return {
        "recipe": str(path.relative_to(ROOT)),
        "layer": record["layer"],
        "max_kl": record["max_kl"],
        "goal": recipe.evaluate.goal,
        "headline": report.data.headline,
        "prompt_pair": [spec.positive_prompt, spec.negative_prompt],
        "negative": spec.negative.file if spec.negative else None,
        "data": record["data"],
        "skipped_methods": record["skipped_methods"],
        "skipped": record["skipped"],
        "base": _keep(report.base),
        "rows": {r["method"]: _keep(r) for r in report.rows},
        "seconds": round(time.time() - started),
    }


def measure(names: list[str], adapt: Adapt | None = None) -> dict[str, Any]:
    """Compare on each named recipe."""
    import torch

    results: dict[str, Any] = {"recipes": {}}
    results["versions"] = {p: importlib.metadata.version(p) for p in ("torch", "transformers")}
    with tempfile.TemporaryDirectory(prefix="bake-paper-compare-") as work:
        for name in names:
            torch.manual_seed(0)
            results["recipes"][name] = measure_recipe(RECIPES[name], Path(work) / name, adapt)
            print(f"{name}: {results['recipes'][name]['seconds']} s", file=sys.stderr)
    return results


# --- verdicts -----------------------------------------------------------------------------------------------------


def standing(record: dict[str, Any]) -> dict[str, str]:
    """Mean-centred against each other method on the headline scorer, in the goal's direction: 'beats' when it
    clearly beats the other (bake's own rule, ``bake.evaluation.sweep.clearly_beats``), 'loses to' the other way
    round, else 'ties with' (neither moving it counts as a tie)."""
    sweep = _sweep()
    h = record["headline"]
    gain = {m: sweep.toward(record["goal"]) * (r[h] - record["base"][h]) for m, r in record["rows"].items()}
    ours = gain["mean-centred"]
    out = {}
    for method, theirs in gain.items():
        if method == "mean-centred":
            continue
        if sweep.clearly_beats(ours, theirs):
            out[method] = "beats"
        elif sweep.clearly_beats(theirs, ours):
            out[method] = "loses to"
        else:
            out[method] = "ties with"
    return out


def _f(x: float) -> str:
    return f"{x:.3g}"


def verdicts(results: dict[str, Any], names: list[str]) -> list[str]:
    """One line per recipe: where mean-centring wins, ties and loses, with the figures; then the count."""
    lines, counts = [], {"beats": 0, "ties with": 0, "loses to": 0}
    for name in names:
        record = results["recipes"].get(name)
        if record is None:
            continue
        h, rows = record["headline"], record["rows"]
        st = standing(record)
        for s in st.values():
            counts[s] += 1
        parts = [f"{s} {m} ({_f(rows[m][h])})" for m, s in st.items()]
        lines.append(
            f"- **{name}** ({h}, {record['goal']}; base {_f(record['base'][h])}): mean-centred "
            f"{_f(rows['mean-centred'][h])} {', '.join(parts)}."
        )
    n = sum(counts.values())
    lines.append(
        f"- Over these {n} comparisons mean-centring wins {counts['beats']}, ties {counts['ties with']} and loses "
        f"{counts['loses to']} (a tie: within a factor {_sweep().CLEAR:g} of the other's change from the base)."
    )
    return lines


def _sweep():
    """bake.evaluation.sweep, whose rule for "clearly beats" bake run's compare note uses too (imported late: the
    page renders without torch loaded until then)."""
    sys.path.insert(0, str(ROOT))
    from bake.evaluation import sweep

    return sweep


# --- the page -----------------------------------------------------------------------------------------------------


def _table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(
        ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]
    )


def _settings(results: dict[str, Any], names: list[str]) -> str:
    parts = []
    for name in names:
        r = results["recipes"].get(name)
        if r is None:
            parts.append(f"{name}: not measured (`python recipes/paper/compare.py --recipes {name}`)")
            continue
        d = r["data"]
        pos, neg = r["prompt_pair"]
        parts.append(
            f"{name}: `{r['recipe']}`, layer {r['layer']}, KL budget {r['max_kl']:g}, {d['prompts']} held-out prompts "
            f"x {d['tokens']} greedy tokens, ActAdd {pos!r} - {neg!r}, contrast against `{r['negative']}`, "
            f"{r['seconds']} s"
        )
    v = results["versions"]
    return "; ".join(parts) + f" (torch {v['torch']}, transformers {v['transformers']})."


def _cell(row: dict[str, Any] | None, key: str) -> str:
    return "not run" if row is None or key not in row else _f(row[key])


def render_genres(results: dict[str, Any]) -> str:
    names = [g for g in GENRES if g in results["recipes"]]
    recs = [results["recipes"][g] for g in names]
    head = ["method", *(f"{g}: word rate / perplexity / KL" for g in names)]
    rows = [["base", *(f"{_f(r['base']['wordlist'])} / {_f(r['base']['perplexity'])} / 0" for r in recs)]]
    for m in METHODS:
        rows.append(
            [m]
            + [
                " / ".join(_cell(r["rows"].get(m), k) for k in ("wordlist", "perplexity", "kl"))
                + (f" (x{_f(r['rows'][m]['coefficient'])})" if m in r["rows"] else "")
                for r in recs
            ]
        )
    other = ["method", *(f"{g}: log-prob gain / activation shift" for g in names)]
    more = [
        [m] + [" / ".join(_cell(r["rows"].get(m), k) for k in ("logprob_gain", "activation_shift")) for r in recs]
        for m in METHODS
    ]
    return "\n\n".join([_settings(results, GENRES), _table(head, rows), _table(other, more)])


def render_toxicity(results: dict[str, Any]) -> str:
    r = results["recipes"].get("toxicity")
    if r is None:
        return "Not measured yet: `python recipes/paper/compare.py --recipes toxicity`."
    keys = ["coefficient", "kl", "perplexity", "repetition", "toxicity", "vader", "logprob_gain", "activation_shift"]
    rows = [["base", *(_f(r["base"][k]) if k in r["base"] else "" for k in keys)]]
    rows += [[m, *(_cell(r["rows"].get(m), k) for k in keys)] for m in METHODS]
    better = "lower" if r["goal"] == "lower" else "higher"
    note = f"Better: toxicity {better} (`evaluate.goal: {r['goal']}`), VADER higher, KL and perplexity lower."
    return "\n\n".join([_settings(results, ["toxicity"]), _table(["method", *keys], rows), note])


def sections(results: dict[str, Any]) -> dict[str, str]:
    paper = {k: f"- The paper (GPT-2): {v}." for k, v in PAPER.items()}
    return {
        "paper-genres": render_genres(results),
        "paper-genres-verdict": "\n".join([*verdicts(results, GENRES), paper["genres"]]),
        "paper-toxicity": render_toxicity(results),
        "paper-toxicity-verdict": "\n".join([*verdicts(results, ["toxicity"]), paper["toxicity"]]),
    }


def _figures():
    """docs/figures.py (splice: how every figures block is replaced), imported by path: docs is no package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bake_docs_figures", ROOT / "docs" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render(results: dict[str, Any], page: str) -> str:
    """``page`` with this script's blocks replaced from ``results``."""
    return _figures().splice(page, sections(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="write docs/paper.md from compare.json only")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()
    if not args.render:
        for name in args.recipes:  # merged into the file after each recipe: a long run keeps what it finished
            results = measure([name])
            old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"recipes": {}}
            results["recipes"] = {**old["recipes"], **results["recipes"]}
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    PAGE.write_text(render(json.loads(RESULTS.read_text()), PAGE.read_text()))


if __name__ == "__main__":
    main()
