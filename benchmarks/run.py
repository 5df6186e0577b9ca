"""bake's benchmarks: collection, fold, inference and streaming, measured side by side in one run.

    python benchmarks/run.py                       # full run
    python benchmarks/run.py --quick --results /tmp/quick.json   # smoke run with small sizes
    python benchmarks/run.py --only fold,inference
    python docs/figures.py --render                # then benchmarks/README.md's Results from results.json

Every measured case runs in its own fresh process (``case.py``), so one case's peak RSS cannot leak into another's.
Each section's figures go to ``--results`` (default benchmarks/results.json) with the machine, command, date and
load average they were measured under; a run updates only the sections it ran and keeps the others. The rendered
sections also go to stdout; progress goes to stderr. Synthetic checkpoints are cached in ``--cache`` (default
/tmp/bake-bench; delete it to reclaim the disk).

A section is ``def NAME(args) -> dict`` (JSON-able measured figures, nothing printed) and
``def render_NAME(results: dict) -> str`` (markdown from that dict alone), usually in benchmarks/NAME.py with the
shared helpers of benchmarks/common.py, registered in SECTIONS below with its title. Its rendering appears in a doc
between ``<!-- figures:benchmarks.NAME -->`` and ``<!-- end figures:benchmarks.NAME -->`` (docs/figures.py).

This process never imports torch: a child's ru_maxrss counts the parent image it was forked from, so the parent must
stay small.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the section modules, when imported by docs/figures.py

import collection  # noqa: E402
import common  # noqa: E402
import fold  # noqa: E402
import inference  # noqa: E402
import sampling  # noqa: E402
import streaming  # noqa: E402
import sweep  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results.json"


class Section(NamedTuple):
    title: str
    measure: Callable[[argparse.Namespace], dict[str, Any]]
    render: Callable[[dict[str, Any]], str]


SECTIONS: dict[str, Section] = {
    "collection": Section(collection.TITLE, collection.collection, collection.render_collection),
    "fold": Section(fold.TITLE, fold.fold, fold.render_fold),
    "inference": Section(inference.TITLE, inference.inference, inference.render_inference),
    "streaming": Section(streaming.TITLE, streaming.streaming, streaming.render_streaming),
    "sampling": Section(sampling.TITLE, sampling.sampling, sampling.render_sampling),
    "sweep": Section(sweep.TITLE, sweep.sweep, sweep.render_sweep),
}


def render_section(name: str, entry: dict[str, Any]) -> str:
    """One section of benchmarks/README.md's Results: title, where the figures come from, then the figures."""
    section = SECTIONS[name]
    return f"### {section.title}\n\n{common.render_machine(entry)}\n{section.render(entry['results'])}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, one run each: a smoke test of the benchmarks"
    )
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated sections (default: all of {','.join(SECTIONS)})"
    )
    parser.add_argument("--repeat", type=int, default=0, help="runs per case (default: 3, fold 6; --quick: 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per case (default: torch's, one per core); 1 is steadier on a busy shared machine",
    )
    parser.add_argument(
        "--cache", type=Path, default=Path("/tmp/bake-bench"), help="where synthetic checkpoints and outputs go"
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help=f"the JSON the figures go to (default: {RESULTS})"
    )
    args = parser.parse_args()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}: choose from {','.join(SECTIONS)}")
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # inherited by every case
    command = " ".join(["python", "benchmarks/run.py", *sys.argv[1:]])
    machine = common.machine(args.cache)
    for name in (n for n in SECTIONS if n in chosen):
        started, before = time.perf_counter(), common.load1()
        results = SECTIONS[name].measure(args)
        entry = {
            "command": command,
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "quick": args.quick,
            "machine": machine,
            "load": {"start": before, "end": common.load1()},
            "minutes": (time.perf_counter() - started) / 60,
            "results": results,
        }
        recorded = json.loads(args.results.read_text()) if args.results.exists() else {}
        recorded[name] = entry
        ordered = {n: recorded[n] for n in [*SECTIONS, *sorted(set(recorded) - set(SECTIONS))] if n in recorded}
        args.results.write_text(json.dumps(ordered, indent=2, ensure_ascii=False) + "\n")
        print(render_section(name, entry), flush=True)
    common.log(f"wrote {args.results}; python docs/figures.py --render puts it into benchmarks/README.md")


if __name__ == "__main__":
    main()
