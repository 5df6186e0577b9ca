"""Every measured figure the docs quote, rendered from a committed JSON file written by the code that measured it.

A page holds a figures block as

    <!-- figures:NAME -->
    ...the rendering of NAME, never edited by hand...
    <!-- end figures:NAME -->

and ``renderings()`` says what each NAME renders, from which file:

- ``quickstart`` (README.md): docs/figures.json, from a real quickstart bake's bake.json;
- ``gguf`` (docs/gguf.md): docs/gguf.json, from the real SmolLM2 GGUF comparison in tests/test_gguf_export.py;
- ``benchmarks.SECTION`` (benchmarks/README.md), ``benchmarks.summary`` and ``benchmarks.streaming-70b`` (the 70B
  extrapolation, docs/big-models.md): benchmarks/results.json, from benchmarks/run.py;
- ``evaluation-*`` (docs/evaluation.md): docs/evaluation.json, from docs/evaluation_figures.py;
- ``paper-*`` (docs/paper.md): recipes/paper/results.json, from recipes/paper/run.py; its ``paper-genres*`` and
  ``paper-toxicity*``: recipes/paper/compare.json, from recipes/paper/compare.py (bake compare).

    python docs/figures.py --render            # rewrite every block from the committed JSON only (no model)
    bake run recipes/quickstart.yaml -o out/cheerful && python docs/figures.py out/cheerful   # record, render
    python docs/figures.py --gguf              # re-measure docs/gguf.json (llama.cpp; minutes), render
    python benchmarks/run.py --only fold && python docs/figures.py --render

tests/test_readme.py checks that every block on every page is its rendering and that every rendering has its block
(``problems()``). The quickstart and GGUF figures are re-measured by the tests that record them
(test_quickstart_reproduces_the_readme_figures, test_llama_cpp_figures_match_docs_gguf_json), which check the fresh
figures against the committed JSON; benchmark figures are as fresh as each section's date in results.json says.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures.json"
GGUF = ROOT / "docs" / "gguf.json"
README = ROOT / "README.md"
MARKER = re.compile(r"<!-- (?P<end>end )?figures:(?P<name>[\w.-]+) -->")


def pages() -> list[Path]:
    """The pages that may hold figures blocks."""
    return [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


# ---------------------------------------------------------------- quickstart (README.md)


def record(manifest: dict[str, Any]) -> dict[str, Any]:
    """The figures of one quickstart bake, from its bake.json."""
    ver = manifest["verification"]
    (entry,) = manifest["vectors"]["entries"]
    keep = ("dtype", "prompts", "max_abs_logit_diff", "atol", "greedy_tokens", "greedy_identical", "steering_effect")
    return {
        "base": manifest["base"].get("base_model_id") or manifest["base"]["spec"],
        "verification": {k: ver[k] for k in keep},
        "vector": {k: entry[k] for k in ("layer", "coefficient", "relative_norm")},
        "versions": manifest["versions"],
    }


def render(figures: dict[str, Any]) -> str:
    """The README's "Measured" block, from figures.json alone."""
    ver, vec = figures["verification"], figures["vector"]
    versions = ", ".join(f"{k} {figures['versions'][k]}" for k in ("torch", "transformers"))
    return "\n".join(
        [
            f"On the quickstart ({figures['base']}, {ver['dtype']}, CPU), from the run's `bake.json` via",
            f"`docs/figures.json` ({versions}):",
            "",
            "| measure | value |",
            "|---|---|",
            f"| max \\|Δlogit\\| baked (reloaded from disk) vs hook-steered base, {ver['prompts']} probe prompts "
            f"| {ver['max_abs_logit_diff']:.2e} (tolerance {ver['atol']:g}) |",
            f"| greedy continuations, {ver['greedy_tokens']} tokens "
            f"| {'identical' if ver['greedy_identical'] else 'differ'} |",
            "| max \\|Δlogit\\| baked vs unsteered base (the steering is really there) | "
            f"{ver['steering_effect']:.3g} |",
            f"| vector norm / mean residual norm at block {vec['layer']} (coefficient {vec['coefficient']:g}) "
            f"| {vec['relative_norm']:.3f} |",
            "",
            "Effects and costs measured by `bake eval`: [recipes/README.md](recipes/README.md) and",
            "[docs/evaluation.md](docs/evaluation.md).",
        ]
    )


# ---------------------------------------------------------------- GGUF in llama.cpp (docs/gguf.md)


def render_gguf(g: dict[str, Any]) -> str:
    """docs/gguf.md's llama.cpp table, from gguf.json alone (written by tests/test_gguf_export.py)."""
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    wrong = g["wrong"]
    return "\n".join(
        [
            f"Measured on {g['model']} (`tests/test_gguf_export.py`, recorded in `docs/gguf.json`: a mean-centred",
            f"vector after block {g['post_layer']} and one after block {g['mid_layer']}'s attention, "
            f"{g['positions']} positions of {g['prompts']} probe prompts,",
            f"llama-cpp-python {g['llama_cpp_python']} on a CPU with {g['cpu']}, {g['threads']} thread):",
            "",
            "| measure | value |",
            "|---|---|",
            "| max / mean \\|Δlogit\\|, steered GGUF in llama.cpp vs hook-steered dequantized model "
            f"| {g['steered_gap']['max']:#.3g} / {g['steered_gap']['mean']:#.3g} |",
            "| the same, unsteered GGUF vs plain dequantized model (the quantization baseline) "
            f"| {g['unsteered_gap']['max']:#.3g} / {g['unsteered_gap']['mean']:#.3g} |",
            f"| top-1 token agreement, steered / unsteered pair | {pct(g['top1']['steered'])} / "
            f"{pct(g['top1']['unsteered'])} |",
            "| mean \\|Δlogit\\| steered vs unsteered GGUF in llama.cpp "
            f"(hooks: {g['change']['hooks']:#.3g}) | {g['change']['llama_cpp']:#.3g} |",
            f"| llama.cpp's change vs the hooks' change, relative error | {pct(g['change']['relative_error'])} |",
            "| after-block bias vs the unsteered GGUF plus the same vector as a llama.cpp control vector: "
            f"max / mean \\|Δlogit\\|, top-1 | {g['control_vector']['max']:#.2g} / {g['control_vector']['mean']:#.2g}, "
            f"{pct(g['control_vector']['top1'])} |",
            "| original tensors and metadata entries byte-identical to the source "
            f"| all {g['identical']['tensors']} tensors, all {g['identical']['metadata']} entries |",
            "",
            "A wrong bake does not pass (steered gap ÷ unsteered gap, max / mean; the check allows 2): the same",
            f"vectors at {wrong['scaled']['scale']:g}x gave {wrong['scaled']['max']:.1f} / "
            f"{wrong['scaled']['mean']:.1f}, the two vectors swapped (each at the",
            f"other's layer and site) {wrong['swapped']['max']:.1f} / {wrong['swapped']['mean']:.1f}.",
        ]
    )


def record_gguf() -> None:
    """Re-measure docs/gguf.json: the figures test of tests/test_gguf_export.py, told to write instead of compare."""
    env = {**os.environ, "BAKE_RECORD_FIGURES": "1", "PYTHONPATH": str(ROOT)}
    test = "tests/test_gguf_export.py::test_llama_cpp_figures_match_docs_gguf_json"
    # -m slow: the suite's default selection leaves the slow tests out, this one among them
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow", test]
    subprocess.run(command, cwd=ROOT, env=env, check=True)


# ---------------------------------------------------------------- benchmarks (benchmarks/README.md, big-models.md)


@cache
def script(relative: str) -> ModuleType:
    """A measuring script beside the docs (benchmarks/run.py, docs/evaluation_figures.py, recipes/paper/*.py),
    imported by path: none of their folders is a package."""
    spec = importlib.util.spec_from_file_location("bake_figures_" + relative.replace("/", "_")[:-3], ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def benchmarks() -> ModuleType:
    """benchmarks/run.py (SECTIONS, render_section, RESULTS)."""
    return script("benchmarks/run.py")


def render_benchmark_summary(results: dict[str, Any]) -> str:
    """docs/big-models.md's summary of the collection, fold and inference sections of benchmarks/results.json."""
    coll, fold, inf = (results[n] for n in ("collection", "fold", "inference"))
    smol = [r for r in coll["results"]["rows"] if r["model"].startswith("SmolLM2")]
    rss = [r["rss_ratio"] for r in smol]
    diff = max(r["mean_diff"] for r in coll["results"]["rows"])
    f, q = fold["results"], fold["results"]["ratios"]
    link = next(c for c in f["cases"] if "link=True" in c["case"])
    modes = {m["mode"]: m for m in inf["results"]["modes"]}
    when = sorted({e["date"] for e in (coll, fold, inf)})
    source = any(e.get("source") for e in (coll, fold, inf))
    return "\n".join(
        [
            f"  The figures of [`benchmarks/README.md`](../benchmarks/README.md#results) ({', '.join(when)}"
            + ("; transcribed into results.json from an earlier README, not re-measured since" if source else "")
            + "):",
            "",
            f"  - **collection**: the forward pass is {smol[0]['speed_ratio']:.1f}× faster at block "
            f"{smol[0]['layer']} of SmolLM2 and {smol[1]['speed_ratio']:.1f}× at",
            f"    block {smol[1]['layer']} than the usual full forward with `output_hidden_states=True`, with "
            f"{min(rss):.2f}–{max(rss):.2f}×",
            "    its peak memory, for the same means ("
            + ("exactly equal" if diff == 0 else f"within {diff:.0e} of the largest")
            + ");",
            f"  - **fold**: a {f['size_gb']:.1f} GB bf16 checkpoint takes **{q['medians']:.2f}×** the time of `cp -r` "
            f"(medians of {f['repeat']};",
            f"    {q['fsync']:.2f}× including fsync, "
            + ("within" if max(q["medians"], q["fsync"]) <= 1.2 else "above")
            + f" the 1.2× target; the fastest single runs: {q['minima']:.2f}×), with",
            f"    peak memory {q['rss_over_floor_mb']:.0f} MB above the bare Python+torch import, "
            f"{q['rss_over_largest_shard']:.2f}× the largest shard;",
            f"    `link=True` takes {link['s_median']:.2f} s. The fold copies with `copy_file_range`, as `cp` does;",
            f"  - **inference**: the baked model generates at {modes['baked']['ratio']:.3f}× the base model's speed",
            "    and gives "
            + ("the hook-steered model's tokens" if modes["baked"]["same_as_hooked"] else "other tokens than hooks")
            + f"; the hooked base runs at {modes['hooked']['ratio']:.3f}× the base's speed.",
        ]
    )


# ---------------------------------------------------------------- the blocks


def renderings() -> dict[str, str]:
    """Every figures block by name, each rendered from its committed JSON alone."""
    bench = benchmarks()
    results = json.loads(bench.RESULTS.read_text())
    blocks = {
        "quickstart": render(json.loads(FIGURES.read_text())),
        "gguf": render_gguf(json.loads(GGUF.read_text())),
        **{f"benchmarks.{name}": bench.render_section(name, entry) for name, entry in results.items()},
    }
    if {"collection", "fold", "inference"} <= results.keys():
        blocks["benchmarks.summary"] = render_benchmark_summary(results)
    if "streaming" in results:
        blocks["benchmarks.streaming-70b"] = bench.streaming.render_extrapolation(results["streaming"]["results"])
    evaluation = script("docs/evaluation_figures.py")
    if evaluation.RESULTS.is_file():
        measured = json.loads(evaluation.RESULTS.read_text())
        blocks.update({name: render(measured) for name, render in evaluation.BLOCKS.items()})
    for measured_by in ("recipes/paper/run.py", "recipes/paper/compare.py"):
        paper = script(measured_by)
        blocks.update(paper.sections(json.loads(paper.RESULTS.read_text())))
    return blocks


def marked(text: str) -> list[tuple[str, int, int]]:
    """The figures blocks of a page: (name, start, end) of each body; ValueError on an unpaired or nested marker."""
    found, open_ = [], None
    for m in MARKER.finditer(text):
        if not m["end"]:
            if open_ is not None:
                raise ValueError(f"figures:{m['name']} starts inside figures:{open_['name']}")
            open_ = m
        elif open_ is None or open_["name"] != m["name"]:
            raise ValueError(f"end figures:{m['name']} has no matching start")
        else:
            found.append((m["name"], open_.end() + 1, text.rfind("\n", 0, m.start()) + 1))  # whole lines
            open_ = None
    if open_ is not None:
        raise ValueError(f"figures:{open_['name']} has no end marker")
    return found


def splice(text: str, blocks: dict[str, str]) -> str:
    """``text`` with every figures block replaced by its rendering; a block nothing renders is left for
    ``problems()`` to name."""
    for name, start, end in reversed(marked(text)):
        if name in blocks:
            text = text[:start] + blocks[name].rstrip("\n") + "\n" + text[end:]
    return text


def problems(on: list[Path] | None = None) -> list[str]:
    """What is wrong with the figures blocks ``on`` these pages (default: all): stale, rendered from nothing,
    shown twice, unpaired markers, or a rendering shown on none of them."""
    blocks, seen, found = renderings(), {}, []
    for page in pages() if on is None else on:
        text, rel = page.read_text(), page.relative_to(ROOT) if page.is_relative_to(ROOT) else page
        try:
            spans = marked(text)
        except ValueError as e:
            found.append(f"{rel}: {e}")
            continue
        for name, start, end in spans:
            if name in seen:
                found.append(f"{rel}: figures:{name} is already shown in {seen[name]}")
            seen[name] = rel
            if name not in blocks:
                found.append(f"{rel}: figures:{name} is rendered from nothing (not in docs/figures.py renderings())")
            elif text[start:end] != blocks[name].rstrip("\n") + "\n":
                found.append(f"{rel}: figures:{name} is stale: run python docs/figures.py --render")
    found += [f"figures:{name} is shown on no page: add its block" for name in blocks if name not in seen]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baked", nargs="?", type=Path, help="a quickstart bake (folder with bake.json) to record")
    parser.add_argument("--render", action="store_true", help="only rewrite the blocks from the committed JSON")
    parser.add_argument("--gguf", action="store_true", help="re-measure docs/gguf.json first (needs llama-cpp-python)")
    args = parser.parse_args()
    if args.baked is not None and not args.render:
        FIGURES.write_text(json.dumps(record(json.loads((args.baked / "bake.json").read_text())), indent=2) + "\n")
    if args.gguf and not args.render:
        record_gguf()
    blocks = renderings()
    for page in pages():
        text = page.read_text()
        if (new := splice(text, blocks)) != text:
            page.write_text(new)
            print(f"rewrote {page.relative_to(ROOT)}")
    for problem in problems():
        print(problem, file=sys.stderr)


if __name__ == "__main__":
    main()
