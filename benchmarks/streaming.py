"""Streaming benchmark: block-by-block collection on a checkpoint bigger than memory."""

from __future__ import annotations

from pathlib import Path

from common import case, f, log, meminfo, table

TITLE = "Streaming collection: a checkpoint bigger than memory"


def streaming(args) -> dict:
    """Three depths and two token counts; the in-memory truncated path beside it wherever that fits."""
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
            if s["in_memory_bytes"] * 1.25 + 2**30 < meminfo("MemAvailable") * 2**30:
                log(f"[streaming] L={layer} {tokens} tokens in memory")
                ways["memory"] = m = case(
                    kind="stream", model=str(source), tokens=tokens, layer=layer, way="memory", batch_tokens=4096
                )
                diff = max(abs(x - y) for x, y in zip(s["mean"], m["mean"])) / max(abs(x) for x in m["mean"])
                if diff > 1e-10:
                    raise SystemExit(f"L={layer}: streaming and in-memory means differ by {diff:.1e} of max|mean|")
            rows += [
                {
                    "way": way,
                    "layer": layer,
                    "tokens": r["tokens"],
                    "s": r["s"],
                    "peak_rss_mb": r["peak_rss_mb"],
                    "goal_rss_mb": (r["block_bytes"] + r["hidden_bytes"] + (1 << 30)) / 2**20
                    if way == "streaming"
                    else None,
                    "read_gb": r["rchar"] / 1e9,
                    "disk_gb": r["read_bytes"] / 1e9,
                    "in_memory_gib": r["in_memory_bytes"] / 2**30,
                }
                for way, r in ways.items()
            ]
    return {"layers": n_layers, "size_gb": size / 1e9, "rows": rows}


def render_streaming(results: dict) -> str:
    rows = [
        [
            r["way"],
            r["layer"],
            r["tokens"],
            f"{r['s']:.1f}",
            f(r["tokens"] / r["s"]),
            f"{r['peak_rss_mb']:.0f}",
            "" if r["goal_rss_mb"] is None else f"{r['goal_rss_mb']:.0f}",
            f"{r['read_gb']:.2f}",
            f"{r['disk_gb']:.2f}",
            f"{r['in_memory_gib']:.1f}",
        ]
        for r in results["rows"]
    ]
    header = [
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
    ]
    return (
        f"Synthetic random-weight Llama with 8B-like blocks ({results['layers']} blocks, {results['size_gb']:.1f} GB "
        "bf16 on disk), generated once shard by shard. **streaming**: "
        "`bake.collection.streaming.collect_sets(..., 'streaming')`, one block at a time in float32; **memory**: the "
        "truncated in-memory path (`load_model(layers=L+1)` + `collect`), run only where blocks 0..L fit MemAvailable "
        "with the margin. Means asserted equal to 1e-10 where both ran. **goal RSS**: one float32 block + the hidden "
        "states (float32, padded) + 1 GiB, whatever L. **GB read()**: bytes through read() calls (each block tensor "
        "once); **GB from disk**: what the page cache missed.\n\n" + table(header, rows)
    )
