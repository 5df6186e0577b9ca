"""Streaming benchmark: block-by-block collection on a checkpoint bigger than memory, against accelerate's
per-forward disk offload and the in-memory truncated path, and what the measured costs give for a 70B model."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from common import case, f, load1, log, meminfo, table

TITLE = "Streaming collection: a checkpoint bigger than memory"
BATCH_TOKENS = 128
"""Padded tokens per batch: small enough that the token counts make several batches, which accelerate's offload
reads every block for and streaming does not."""
TOKENS = (128, 256)
"""Two token counts (real text): few, so that 8B-like blocks at three depths run in well under an hour on two shared
cores; the cost is linear in them (the growth table shows it), which the extrapolation uses."""
LLAMA_70B = dict(blocks=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=128256)
"""Llama 2/3 70B's shapes, for the extrapolation."""
GPU_TFLOPS = 50.0
"""Assumed, not measured (no GPU here): the bf16 matmul rate a 24 GB GPU sustains on these shapes."""
MEAN_TOLERANCE = {"memory": 1e-10, "accelerate": 1e-3}
"""How close each way's mean must be to streaming's (max |Δ| / max |mean|): the in-memory path is the same
arithmetic; accelerate's runs transformers' own forward, float32 too, so it agrees to float32 rounding, well within
the 1e-3 the collection section allows."""


def _drop_cached(folder: Path) -> None:
    """Drop the page cache of ``folder``'s files (``posix_fadvise(DONTNEED)``: this process's files only, no root),
    so every case reads the weights it reads first from the disk."""
    os.sync()
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _block_params(hidden: int, intermediate: int, heads: int, kv_heads: int) -> int:
    """A Llama block's parameters: q, k, v, o, gate, up, down and two norms."""
    kv = kv_heads * hidden // heads
    return 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden


def _relative_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b)) / max(abs(y) for y in b)


def _row(way: str, layer: int, r: dict, mean_diff: float | None) -> dict:
    return {
        "way": way,
        "layer": layer,
        "tokens": r["tokens"],
        "batches": r["batches"],
        "s": r["s"],
        "process_s": r["process_s"],
        "block_read_s": r.get("block_read_s"),
        "load_s": r.get("load_s"),
        "peak_rss_mb": r["peak_rss_mb"],
        "read_gb": r["rchar"] / 1e9,
        "disk_gb": r["read_bytes"] / 1e9,
        "loaded_gb": r["loaded_bytes"] / 1e9 if "loaded_bytes" in r else None,
        "mean_diff": mean_diff,
        "load1": r["load1"],
        **(
            {
                "padded_tokens": r["padded_tokens"],
                "block_read_gb": r["block_rchar"] / 1e9,
                "block_bytes": r["block_bytes"],
                "hidden_bytes": r["hidden_bytes"],
                "in_memory_bytes": r["in_memory_bytes"],
            }
            if way == "streaming"
            else {}
        ),
    }


def streaming(args) -> dict:
    """Streaming at three depths with the smaller token count and at the shallowest with the larger one;
    accelerate's disk offload at the shallowest depth with both; the in-memory path wherever it fits."""
    quick = args.quick
    name = "llama-8b-blocks-quick" if quick else "llama-8b-blocks"
    source = Path(case(kind="checkpoint", name=name, cache=str(args.cache))["path"])
    size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    config = case(kind="depth", model=str(source))
    n_layers = config["layers"]
    depths = (n_layers // 8, n_layers * 3 // 8, n_layers * 3 // 4)
    few, many = TOKENS
    offload = args.cache / "accelerate-offload"
    rows = []
    for layer, tokens in [*((d, few) for d in depths), (depths[0], many)]:
        ways: dict[str, dict] = {}
        for way in ("streaming", "memory", "accelerate"):
            if way == "memory" and not (
                ways["streaming"]["in_memory_bytes"] * 1.25 + 2**30 < meminfo("MemAvailable") * 2**30
            ):
                continue
            if way == "accelerate" and layer != depths[0]:
                continue
            log(f"[streaming] L={layer} {tokens} tokens {way} (load {load1():.2f})")
            _drop_cached(source)
            shutil.rmtree(offload, ignore_errors=True)
            ways[way] = case(
                kind="offload" if way == "accelerate" else "stream",
                model=str(source),
                tokens=tokens,
                layer=layer,
                way=way,
                batch_tokens=BATCH_TOKENS,
                offload_folder=str(offload),
            ) | {"load1": load1()}
            shutil.rmtree(offload, ignore_errors=True)
        base = ways["streaming"]["mean"]
        for way, r in ways.items():
            diff = None if way == "streaming" else _relative_diff(r["mean"], base)
            if diff is not None and diff > MEAN_TOLERANCE[way]:
                raise SystemExit(f"L={layer}: {way} and streaming means differ by {diff:.1e} of max|mean|")
            rows.append(_row(way, layer, r, diff))
    return {
        "layers": n_layers,
        "size_gb": size / 1e9,
        "batch_tokens": BATCH_TOKENS,
        "mem_total_gib": meminfo("MemTotal"),
        "block_params": rows[0]["block_bytes"] // 4,
        "rows": rows,
    }


def render_streaming(results: dict) -> str:
    rows = [
        [
            r["way"],
            r["layer"],
            r["tokens"],
            r["batches"],
            f"{r['s']:.1f}",
            f(r["tokens"] / r["s"]),
            "" if r["block_read_s"] is None else f"{r['block_read_s']:.1f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{(r['block_bytes'] + r['hidden_bytes'] + (1 << 30)) / 2**20:.0f}" if r["way"] == "streaming" else "",
            f"{r['read_gb']:.2f}" if r["loaded_gb"] is None else f"{r['loaded_gb']:.2f}",
            f"{r['disk_gb']:.2f}",
            "" if r["mean_diff"] is None else f"{r['mean_diff']:.0e}",
            f"{r['load1']:.1f}",
        ]
        for r in results["rows"]
    ]
    header = [
        "way",
        "L",
        "tokens",
        "batches",
        "s",
        "tokens/s",
        "block reads s",
        "peak RSS MB",
        "goal RSS MB",
        "GB of weights read",
        "GB from disk",
        "Δmean vs streaming",
        "load",
    ]
    streamed = [r for r in results["rows"] if r["way"] == "streaming"]
    memory_gib = {r["layer"]: r["in_memory_bytes"] / 2**30 for r in streamed}
    growth = [
        [
            r["layer"],
            r["tokens"],
            f"{r['block_read_s'] / (r['layer'] + 1):.2f}",
            f"{r['block_read_gb'] / r['block_read_s']:.2f}",
            f"{1e3 * (r['s'] - r['block_read_s']) / ((r['layer'] + 1) * r['padded_tokens']):.2f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{memory_gib[r['layer']]:.1f}",
        ]
        for r in streamed
    ]
    return (
        f"Synthetic random-weight Llama with 8B-like blocks ({results['layers']} blocks of "
        f"{results['block_params'] / 1e6:.0f}M parameters, {results['size_gb']:.1f} GB bf16 on disk, "
        f"{'more' if results['size_gb'] * 1e9 > results['mem_total_gib'] * 2**30 else 'less'} than the machine's "
        f"{results['mem_total_gib']:.1f} GiB), generated once shard by shard; the mean residual after block "
        f"L, float32 compute, batches of at most {results['batch_tokens']} padded tokens, each case a fresh process "
        "after the checkpoint's pages are dropped from the page cache (`posix_fadvise(DONTNEED)`), so first reads "
        "come from the disk. **streaming**: `bake.collection.streaming.collect_sets(..., 'streaming')`, one block at a "
        "time, each weight read once. **memory**: the truncated in-memory path (`load_model(layers=L+1)` + `collect`), "
        "run only where blocks 0..L fit MemAvailable with the margin. **accelerate**: transformers' `from_pretrained` "
        'with blocks 0..L on `"disk"` (accelerate\'s per-forward offload; weights served from the safetensors '
        "shards) and a forward hook on block L, run at the shallowest depth only: it loads every block again for "
        "every batch, so its weights read grow with the batches (the column counts what its weights map hands out; "
        "a re-read served by the page cache costs a copy and a cast, not a disk read, while blocks 0..L fit in the "
        "page cache). **block reads s**: streaming's time in `load_block` (read() of each tensor and the cast to "
        "float32). **goal RSS**: one float32 block + the hidden states (float32, padded) + 1 GiB, whatever L. **GB of "
        "weights read**: streaming and memory, bytes through read() calls (memory maps its shards, so its figure is "
        "small; its disk column is what it read); accelerate, the stored bytes its weights map loaded. **Δmean**: "
        "max |Δ| / max |mean| against streaming (asserted ≤ 1e-10 for memory, ≤ 1e-3 for accelerate). **load**: the "
        "1-minute load average when the case ended (other helpers share the machine).\n\n"
        + table(header, rows)
        + "\nHow streaming's cost grows: the block reads take the same time per block at every depth (a block's "
        "weights, whatever the tokens) and the compute about the same time per token per block, so the time is "
        "(L+1) × (read one block + tokens × compute per token), and peak RSS stays flat in L while the in-memory "
        "path's need grows with it:\n\n"
        + table(
            [
                "L",
                "tokens",
                "s reading per block",
                "GB/s reading",
                "ms compute per padded token per block",
                "peak RSS MB",
                "in-memory path would need GiB",
            ],
            growth,
        )
    )


def render_extrapolation(results: dict) -> str:
    """docs/big-models.md's arithmetic for Llama-70B, from the streaming section's measured rows alone (indented to
    sit in that page's list)."""
    streamed = [r for r in results["rows"] if r["way"] == "streaming"]
    read_s_per_gb = sum(r["block_read_s"] for r in streamed) / sum(r["block_read_gb"] for r in streamed)
    compute_s = sum(r["s"] - r["block_read_s"] for r in streamed)
    token_blocks = sum((r["layer"] + 1) * r["padded_tokens"] for r in streamed)
    s_per_param_token = compute_s / (token_blocks * results["block_params"])
    overhead = max(r["peak_rss_mb"] * 2**20 - r["block_bytes"] - r["hidden_bytes"] for r in streamed)
    load = sum(r["load1"] for r in streamed) / len(streamed)
    big = LLAMA_70B
    params = _block_params(big["hidden"], big["intermediate"], big["heads"], big["kv_heads"])
    block_gb = 2 * params / 1e9
    block_read = block_gb * read_s_per_gb
    per_token_block = s_per_param_token * params
    widest = max(streamed, key=lambda r: r["tokens"])
    pad = widest["padded_tokens"] / widest["tokens"]
    embed_f32 = 4 * big["vocab"] * big["hidden"]
    machine = 24e9 - (1 << 30)  # a 24 GB machine less the 1 GiB streaming leaves the OS
    lines, worst = [], 0.0
    for tokens in (widest["tokens"], 10_000):
        padded = tokens * pad
        rss = overhead + max(4 * params, embed_f32) + 4 * big["hidden"] * padded
        worst = max(worst, rss)
        batches = math.ceil(padded / results["batch_tokens"])
        for layer in (40, big["blocks"] - 1):
            n = layer + 1
            compute = n * padded * per_token_block
            gpu_compute = n * 2 * params * padded / (GPU_TFLOPS * 1e12)
            lines.append(
                [
                    layer,
                    f"{tokens:,}",
                    f"{n * block_gb:.0f}",
                    f"{rss / 2**30:.1f}",
                    f"{(n * block_read + compute) / 3600:.1f}",
                    f"{n * block_read / 3600:.2f} + {gpu_compute / 3600:.2f}",
                    f"{n * 4 * params * 1.25 / 2**30:.0f}",
                    f"{batches} × {n * block_gb:.0f}",
                    f"{(batches * n * block_read + compute) / 3600:.1f}",
                ]
            )
    text = "\n".join(
        [
            "Extrapolated by `benchmarks/streaming.py` from the measured streaming rows of",
            "[`benchmarks/README.md`](../benchmarks/README.md#results) (this machine: 2 shared CPU cores at a mean",
            f"load of {load:.1f}, local disk), for Llama-70B ({big['blocks']} blocks of {params / 1e6:.0f}M "
            f"parameters, {block_gb:.2f} GB bf16 each):",
            "",
            f"- reading: {read_s_per_gb:.2f} s per GB read and cast to float32 (all streaming block reads ÷ their "
            f"bytes, cold page cache), so {block_read:.1f} s per 70B block;",
            f"- compute: {1e12 * s_per_param_token:.0f} s per 10¹² parameter × token (the time less the reads, ÷ "
            f"padded tokens × blocks × {results['block_params'] / 1e6:.0f}M), so {per_token_block:.2f} s per token per "
            "70B block;",
            "- memory: the largest measured RSS less its float32 block and hidden states is "
            f"{overhead / 2**30:.2f} GiB (Python, torch, the forward's temporaries at these batches); a 70B run adds "
            f"the larger of one float32 block ({4 * params / 2**30:.1f} GiB) and the float32 embeddings while "
            f"embedding ({embed_f32 / 2**30:.1f} GiB), and the hidden states (padded tokens × {big['hidden']} × 4 "
            "bytes);",
            f"- batches of {results['batch_tokens']} padded tokens as measured (padding ×{pad:.2f}); 10,000 tokens "
            "is beyond the measured counts, on the linear growth shown above (larger batches cut accelerate's "
            "re-reads in proportion).",
            "",
            table(
                [
                    "L",
                    "tokens",
                    "GB read once",
                    "peak RSS GiB",
                    "streaming, CPU, h",
                    "streaming, one 24 GB GPU, h (reads + compute)",
                    "in-memory path needs GiB",
                    "accelerate reads, batches × GB",
                    "accelerate, CPU, h",
                ],
                lines,
            ).rstrip("\n"),
            "",
            f"Peak RSS is at most {worst / 2**30:.1f} GiB at any depth, "
            + ("within" if worst <= machine else "beyond")
            + f" the {machine / 2**30:.1f} GiB a 24 GB machine leaves after 1 GiB for the system, so a 70B model "
            + ("bakes there" if worst <= machine else "does not bake there")
            + " by streaming, in a time linear in L+1 and in the tokens. The in-memory path would need the GiB shown; "
            "accelerate's offload reads blocks 0..L again for every batch (from the disk once they exceed the page "
            "cache), so its reading time is the batches times streaming's. The GPU column is not measured: the "
            f"measured reading time plus the matmuls at an assumed {GPU_TFLOPS:.0f} TFLOPS (bf16), one block and the "
            "hidden states on the device; bake's streaming runs its blocks on the CPU today, so this is what moving "
            "each block to the GPU would give: bound by the disk.",
        ]
    )
    return "\n".join(f"  {line}" if line else "" for line in text.splitlines())
