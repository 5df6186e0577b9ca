"""The quickstart figures the README quotes: docs/figures.json from a real run's bake.json, and the table from it.

    bake run recipes/quickstart.yaml -o out/cheerful && python docs/figures.py out/cheerful   # record and render
    python docs/figures.py --render     # README.md's table from the committed figures.json only (no model)

tests/test_readme.py checks that the README's table is this rendering of figures.json, and that the quickstart it
runs reproduces figures.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures.json"
README = ROOT / "README.md"
BEGIN, END = "<!-- figures.json -->", "<!-- end figures.json -->"


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
            BEGIN,
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
            END,
        ]
    )


def splice(text: str, block: str) -> str:
    """``text`` with its figures block replaced by ``block``."""
    head, rest = text.split(BEGIN, 1)
    return head + block + rest.split(END, 1)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baked", nargs="?", type=Path, help="a quickstart bake (folder with bake.json) to record")
    parser.add_argument("--render", action="store_true", help="only rewrite README.md from figures.json")
    args = parser.parse_args()
    if args.baked is not None and not args.render:
        figures = record(json.loads((args.baked / "bake.json").read_text()))
        FIGURES.write_text(json.dumps(figures, indent=2) + "\n")
    README.write_text(splice(README.read_text(), render(json.loads(FIGURES.read_text()))))


if __name__ == "__main__":
    main()
