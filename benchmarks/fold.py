"""Fold benchmark: bake's streaming fold (copy, and hard-link) vs ``cp -r`` of the same folder."""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path

from common import case, log, med, table

TITLE = "Fold: streaming fold vs copying the folder"
CASES = {
    "`cp -r`": dict(kind="cp"),
    "bake fold (`fold_checkpoint`)": dict(kind="fold", link=False),
    "bake fold, `link=True` (hard links)": dict(kind="fold", link=True),
}


def _clean(path: Path) -> None:
    """Remove a case's output, flush the disk and let it settle, so this writeback does not land in the next
    case's timing."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()
    time.sleep(2)


def fold(args) -> dict:
    """The three cases alternating, order rotated every round, after an untimed warm-up copy."""
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
    runs: dict[str, list[dict]] = {name: [] for name in CASES}
    names = list(CASES)
    log("[fold] warm-up copy (not counted)")
    case(kind="cp", source=str(source), out=str(target))
    _clean(target)
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order every round
            log(f"[fold] {name} run {r + 1}/{repeat}")
            runs[name].append(case(source=str(source), out=str(target), **CASES[name]))
            _clean(target)
    floor = case(kind="floor")
    with_fsync = lambda rs: statistics.median(x["op_s"] + x["fsync_s"] for x in rs)  # noqa: E731
    cp, fd, fl = (runs[n] for n in names)
    return {
        "size_gb": size / 1e9,
        "shards": len(shards),
        "largest_mb": largest / 1e6,
        "repeat": repeat,
        "cases": [
            {
                "case": name,
                "s_median": med(rs, "op_s"),
                "s_min": min(x["op_s"] for x in rs),
                "s_runs": [x["op_s"] for x in rs],
                "fsync_s_median": with_fsync(rs),
                "process_s_median": med(rs, "process_s"),
                "peak_rss_mb": med(rs, "peak_rss_mb"),
            }
            for name, rs in runs.items()
        ],
        "floor": {"process_s": floor["process_s"], "peak_rss_mb": floor["peak_rss_mb"]},
        "ratios": {
            "medians": med(fd, "op_s") / med(cp, "op_s"),
            "minima": min(x["op_s"] for x in fd) / min(x["op_s"] for x in cp),
            "fsync": with_fsync(fd) / with_fsync(cp),
            "process": med(fd, "process_s") / med(cp, "process_s"),
            "link": med(fl, "op_s") / med(cp, "op_s"),
            "rss_over_largest_shard": med(fd, "peak_rss_mb") * 2**20 / largest,
            "rss_over_floor_mb": med(fd, "peak_rss_mb") - floor["peak_rss_mb"],
        },
    }


def render_fold(results: dict) -> str:
    rows = [
        [
            c["case"],
            f"{c['s_median']:.2f}",
            f"{c['s_min']:.2f}",
            ", ".join(f"{x:.2f}" for x in c["s_runs"]),
            f"{c['fsync_s_median']:.2f}",
            f"{c['process_s_median']:.2f}",
            f"{c['peak_rss_mb']:.0f}",
        ]
        for c in results["cases"]
    ]
    floor = results["floor"]
    rows.append(
        [
            "Python + torch + transformers + bake imported, no work (the RSS floor)",
            *[""] * 4,
            f"{floor['process_s']:.2f}",
            f"{floor['peak_rss_mb']:.0f}",
        ]
    )
    q = results["ratios"]
    return (
        f"Synthetic random-weight Llama ({results['size_gb']:.2f} GB bf16 in {results['shards']} shards, largest "
        f"{results['largest_mb']:.0f} MB), generated once shard by shard. A vector at block N/2 (resid_post) makes the "
        "fold add `mlp_bias` and one `down_proj.bias` per block in an extra shard; every original shard is copied "
        "unchanged. The source is warm in the page cache for every run (one untimed `cp -r` first); each run is a "
        "fresh process writing to the same disk, then its output is deleted and `sync` runs, then a 2 s pause "
        f"(untimed); the three cases alternate with the order rotated every round; median of {results['repeat']}. "
        "**s**: the operation as a user waits for it (data may still be in the page cache); **+ fsync**: until its "
        "output files are on disk; **process s**: the whole process, Python start, imports and the fsync included "
        "(bake's verification, which `bake fold` runs after the fold, is not included).\n\n"
        + table(
            ["case", "s (median)", "s (min)", "runs s", "+ fsync s (median)", "process s (median)", "peak RSS MB"], rows
        )
        + "\n"
        + table(
            ["ratio", "value", "target"],
            [
                ["bake fold ÷ cp -r, s (medians)", f"**{q['medians']:.2f}×**", "≤ 1.2×"],
                ["bake fold ÷ cp -r, s (minima)", f"{q['minima']:.2f}×", "≤ 1.2×"],
                ["bake fold ÷ cp -r, + fsync", f"{q['fsync']:.2f}×", "≤ 1.2×"],
                ["bake fold ÷ cp -r, process s", f"{q['process']:.2f}×", ""],
                ["bake fold link=True ÷ cp -r, s", f"{q['link']:.3f}×", ""],
                [
                    "bake fold peak RSS ÷ largest shard",
                    f"{q['rss_over_largest_shard']:.2f}×",
                    "bounded by changed tensors, not shards",
                ],
                ["bake fold peak RSS − floor", f"{q['rss_over_floor_mb']:.0f} MB", ""],
            ],
        )
    )
