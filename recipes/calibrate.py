"""Choose a recipe's layer and coefficient from a `bake sweep`, by one fixed rule; write calibration/NAME.md.

    python recipes/calibrate.py formal concise             # sweeps (about 3 minutes each on 2 CPU cores)
    python recipes/calibrate.py formal --sweep out/sweep   # an existing `bake sweep` output instead

The rule: among the swept settings whose KL(base ‖ steered) on neutral text is within the
recipe's `evaluate.max_kl` and whose replies repeat no more than max(0.1, 2 × base) of their
word trigrams, the one with the best headline effect (the first scorer: highest, or lowest for
`length`). The recipe's `layer:` and `coefficient:` are then set to the choice by hand, and its
comments cite the figures. Nothing here is run by CI: the chosen recipes are (recipes/measure.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from bake.evaluation.sweep import sweep
from bake.recipe import load_recipe

HERE = Path(__file__).resolve().parent
LAYERS, COEFFICIENTS = [6, 9, 12, 15], [0.5, 1.0, 1.5, 2.0]
LOWER_IS_BETTER = {"length", "toxicity"}


def choose(record: dict[str, Any]) -> dict[str, Any]:
    """The rule above, on a sweep.json record."""
    headline = next(
        k
        for k in record["rows"][0]
        if k not in ("layer", "coefficient", "norm", "relative_norm", "kl", "perplexity", "repetition")
    )
    cap = max(0.1, 2 * record["base"]["repetition"])
    fits = [r for r in record["rows"] if r["kl"] <= record["max_kl"] and r["repetition"] <= cap]
    if not fits:
        raise SystemExit(
            f"no swept setting keeps KL within {record['max_kl']} and repetition within {cap:.3g}: sweep smaller "
            "coefficients"
        )
    sign = -1 if headline in LOWER_IS_BETTER else 1
    best = max(fits, key=lambda r: (sign * r[headline], -r["kl"]))
    return {
        "headline": headline,
        "repetition_cap": cap,
        **{k: best[k] for k in ("layer", "coefficient", "kl", "repetition", headline)},
    }


def write(name: str, sweep_dir: Path, command: str) -> dict[str, Any]:
    record = json.loads((sweep_dir / "sweep.json").read_text())
    chosen = choose(record)
    data = record["data"]
    text = "\n".join(
        [
            f"# Calibration of `{name}.yaml`",
            "",
            f"`{command}` on the default model: {data['prompts']} held-out prompts × {data['tokens']} greedy tokens "
            f"({'chat' if data['chat'] else 'plain continuation'}), KL and perplexity on {data['neutral_texts']} "
            "neutral texts.",
            "",
            f"Rule (`recipes/calibrate.py`): KL ≤ {record['max_kl']:g} and repetition ≤ "
            f"{chosen['repetition_cap']:.3g}, then the "
            f"{'lowest' if chosen['headline'] in LOWER_IS_BETTER else 'highest'} `{chosen['headline']}`. **Chosen: "
            f"layer {chosen['layer']}, coefficient {chosen['coefficient']:g}** (KL {chosen['kl']:.3g}, repetition "
            f"{chosen['repetition']:.3g}, {chosen['headline']} {chosen[chosen['headline']]:.3g}).",
            "",
            (sweep_dir / "sweep.md").read_text().strip(),
            "",
        ]
    )
    (HERE / "calibration").mkdir(exist_ok=True)
    (HERE / "calibration" / f"{name}.md").write_text(text)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", help="recipe names (recipes/NAME.yaml)")
    parser.add_argument("--sweep", type=Path, help="an existing `bake sweep` output folder (one recipe only)")
    args = parser.parse_args()
    if args.sweep and len(args.names) != 1:
        parser.error("--sweep takes one recipe name")
    layers, coefficients = ",".join(map(str, LAYERS)), ",".join(f"{c:g}" for c in COEFFICIENTS)
    for name in args.names:
        command = f"bake sweep recipes/{name}.yaml --layers {layers} --coefficients {coefficients}"
        if args.sweep:
            chosen = write(name, args.sweep, command)
        else:
            with tempfile.TemporaryDirectory() as work:
                sweep(load_recipe(HERE / f"{name}.yaml"), Path(work) / "sweep", LAYERS, COEFFICIENTS)
                chosen = write(name, Path(work) / "sweep", command)
        print(f"{name}: layer {chosen['layer']}, coefficient {chosen['coefficient']:g}")


if __name__ == "__main__":
    main()
