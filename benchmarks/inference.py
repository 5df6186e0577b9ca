"""Inference benchmark: greedy tokens/s of the base, the baked checkpoint and the hook-steered base."""

from __future__ import annotations

import statistics

from common import case, log, med, table

TITLE = "Inference: greedy generation"
PROMPTS = [
    "Tell me about your day.",
    "How do I make a cup of tea?",
    "What do you think about Mondays?",
    "The bus was late again.",
]
MODES = ["base", "baked", "hooked"]


def inference(args) -> dict:
    """The three modes alternating, each run a fresh process, on the quickstart's baked SmolLM2."""
    quick = args.quick
    baked = args.cache / "smollm2-cheerful"
    log("[inference] baking the quickstart vector into SmolLM2 (once, cached)")
    case(kind="prepare_baked", out=str(baked))
    prompts = PROMPTS[:2] if quick else PROMPTS
    tokens = 8 if quick else 64
    repeat = args.repeat or (1 if quick else 3)
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(repeat):
        for mode in MODES[r % 3 :] + MODES[: r % 3]:
            log(f"[inference] {mode} run {r + 1}/{repeat}")
            runs[mode].append(case(kind="generate", mode=mode, baked=str(baked), prompts=prompts, tokens=tokens))
    speed = {m: [x["tokens"] / x["op_s"] for x in rs] for m, rs in runs.items()}
    base = statistics.median(speed["base"])
    hooked = runs["hooked"][0]["outputs"]
    return {
        "prompts": len(prompts),
        "tokens": tokens,
        "repeat": repeat,
        "modes": [
            {
                "mode": m,
                "tokens_per_s": statistics.median(speed[m]),
                "runs": speed[m],
                "ratio": statistics.median(speed[m]) / base,
                "peak_rss_mb": med(runs[m], "peak_rss_mb"),
                "same_as_hooked": None if m == "hooked" else runs[m][0]["outputs"] == hooked,
            }
            for m in MODES
        ],
    }


def render_inference(results: dict) -> str:
    rows = [
        [
            m["mode"],
            f"{m['tokens_per_s']:.1f}",
            ", ".join(f"{x:.1f}" for x in m["runs"]),
            f"**{m['ratio']:.3f}×**",
            f"{m['peak_rss_mb']:.0f}",
            "—" if m["same_as_hooked"] is None else ("yes" if m["same_as_hooked"] else "no"),
        ]
        for m in results["modes"]
    ]
    return (
        "SmolLM2-135M-Instruct in float32. **baked**: the quickstart recipe's vector (block 15, coefficient 1.25) "
        "folded by `bake.api.fold` and verified, i.e. a `down_proj.bias` in all 30 blocks; **hooked**: the base with "
        f"`bake.verify.steered` (a forward hook adding the vector). {results['prompts']} chat prompts, batch 1, "
        f"exactly {results['tokens']} new tokens each (`min_new_tokens` = `max_new_tokens`), after a 4-token warm-up; "
        f"each run a fresh process, modes alternating; median of {results['repeat']}.\n\n"
        + table(["model", "tokens/s (median)", "runs", "÷ base", "peak RSS MB", "same tokens as hooked"], rows)
    )
